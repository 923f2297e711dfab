"""The fused DynSDPB loss against a reference computed from the model's ordinary full logits, value and gradients.

The reference is the loss as written in the method notes: the model's full-vocabulary logits from its ordinary forward
pass, the teacher's logits cached in the cache dtype, `u_i` and `d_i` from those logits, cross-entropy plus
`alpha_i T_i^2 KL` over the re-used rows, divided by the number of response tokens. The trainer instead computes it in
token chunks from hidden states, inside the forward pass, caching hidden states when the output layer is frozen. Both
must agree in value and in every trainable parameter's gradient: to float32 precision for float32 models, to bfloat16
precision for models trained the way users run them (bf16 weights, `bf16=True`, LoRA or 4-bit QLoRA).
"""

from __future__ import annotations

import math

import pytest
import torch
from recipes import RECIPES
from tiny_models import addition_rows, build_tiny_llama, build_tiny_tokenizer
from trl import SFTConfig, SFTTrainer

from trl_selfdistill import DynSDPBConfig, DynSDPBTrainer

# (recipe, dynsdpb_mode, tolerance on the loss and on the relative gradient error)
CASES = [
    ("fp32-full", "dynamic", 1e-5),
    ("fp32-full", "constant", 1e-5),
    ("bf16-full", "dynamic", 2e-2),
    ("bf16-lora", "dynamic", 2e-2),
    ("qlora-nf4-bf16", "constant", 2e-2),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny Llama fitted to the rows first: the dynamic weight `alpha d (1 - u)` of a random model is about zero."""
    path = tmp_path_factory.mktemp("fitted-llama")
    tokenizer = build_tiny_tokenizer()
    args = SFTConfig(
        output_dir=str(path / "sft"), learning_rate=1e-2, max_steps=40, per_device_train_batch_size=8, bf16=False,
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    sft = SFTTrainer(
        model=build_tiny_llama(tokenizer), args=args, train_dataset=addition_rows(), processing_class=tokenizer
    )
    sft.train()
    sft.model.save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    return str(path / "model")


def make_trainer(tmp_path, model_dir: str, recipe_name: str, mode: str) -> DynSDPBTrainer:
    recipe = RECIPES[recipe_name]
    args = DynSDPBConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        dynsdpb_mode=mode,
        # A float32 model is compared exactly, so its cache keeps float32 too.
        dynsdpb_teacher_cache_dtype="float32" if recipe.dtype == "float32" else "bfloat16",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        **recipe.args(),
    )
    return DynSDPBTrainer(model=model_dir, args=args, train_dataset=addition_rows(), **recipe.model_kwargs())


def full_logits(model, batch) -> torch.Tensor:
    """The ordinary forward pass's logits at the response positions of every row, float32, `[B, L-1, V]`."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()


def reference_loss(trainer, teacher_logits, student_logits, batch) -> torch.Tensor:
    alpha, temperature, mode = trainer.args.dynsdpb_alpha, trainer.args.dynsdpb_temperature, trainer.args.dynsdpb_mode
    labels = batch["labels"][:, 1:].to(student_logits.device)
    cache_dtype = getattr(torch, trainer.args.dynsdpb_teacher_cache_dtype)
    total, tokens = student_logits.new_zeros(()), 0
    rows = zip(batch["dynsdpb_index"].tolist(), batch["dynsdpb_reused"].tolist(), strict=True)
    for row, (index, reused) in enumerate(rows):
        mask = labels[row] != -100
        z, gold = student_logits[row][mask], labels[row][mask]
        total = total - torch.log_softmax(z, -1).gather(1, gold[:, None]).sum()
        tokens += len(gold)
        if reused:
            z_prev = teacher_logits[index].to(cache_dtype).float()
            p_prev = torch.softmax(z_prev, -1)
            u = (torch.special.entr(p_prev).sum(-1) / math.log(z.shape[-1])).mean()
            d = p_prev.gather(1, gold[:, None]).mean()
            a, t = (alpha * d * (1 - u), temperature * (1 + u)) if mode == "dynamic" else (alpha, temperature)
            p_t = torch.softmax(z_prev / t, -1)
            total = total + a * t**2 * (p_t * (p_t.log() - torch.log_softmax(z / t, -1))).sum()
    return total / tokens


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(("recipe", "mode", "tolerance"), CASES, ids=[f"{r}-{m}" for r, m, _ in CASES])
def test_fused_loss_and_gradients_match_the_full_logit_reference(tmp_path, model_dir, recipe, mode, tolerance):
    trainer = make_trainer(tmp_path, model_dir, recipe, mode)
    model = trainer.model
    model.train()
    batches = iter(trainer.get_train_dataloader())
    first, second = trainer._prepare_inputs(next(batches)), trainer._prepare_inputs(next(batches))
    # Each step in its own autocast region, as `training_step` runs them (autocast caches its casts of the weights).
    autocast = trainer.accelerator.autocast
    with autocast(), torch.no_grad():
        logits = full_logits(model, first)
    response = first["labels"][:, 1:] != -100
    teacher = {index: logits[row][response[row]] for row, index in enumerate(first["dynsdpb_index"].tolist())}
    with autocast():
        trainer.compute_loss(model, dict(first))  # caches the new rows' teachers

    with torch.no_grad():  # "one optimizer update": move the trainable weights
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    trainer.state.global_step = 1

    with autocast():
        loss = trainer.compute_loss(model, dict(second))
    loss.backward()
    fused_grads = gradients(model)
    with autocast():
        expected = reference_loss(trainer, teacher, full_logits(model, second), second)
    expected.backward()
    reference_grads = gradients(model)

    assert trainer._metrics["train"]["distill/loss"][-1] > 1e-4  # the distillation term is really there
    assert loss.item() == pytest.approx(expected.item(), rel=tolerance)
    assert fused_grads.keys() == reference_grads.keys() and fused_grads
    for name, grad in fused_grads.items():
        error = (grad - reference_grads[name]).norm() / reference_grads[name].norm().clamp(min=1e-12)
        assert error < tolerance, f"{name}: relative gradient error {error:.2e}"
