"""Run by test_dynsdpb_fsdp.py on two CPU processes (gloo): DynSDPB's forward under FSDP2 against an unsharded model.

accelerate enables FSDP on GPUs only (on CPU it silently trains with plain data parallelism), so this shards the model
with `fully_shard` itself, in the layout of accelerate 1.16's `fsdp2_prepare_model`: one unit per decoder layer, the
input embeddings, the final norm and `lm_head` together (`reshard_after_forward=False`), then the root. Each process
trains its own micro-batch for three AdamW steps, as `DynSDPBTrainer.compute_loss` calls the model; an unsharded copy
trains on both micro-batches with the gradients averaged, as FSDP averages them. Each process writes what it measured.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from tiny_models import build_tiny_llama, build_tiny_tokenizer
from torch.distributed.fsdp import fully_shard

from trl_selfdistill.dynsdpb import head
from trl_selfdistill.dynsdpb.head import DistillationInputs, add_distillation_head, output_layer

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
tokenizer = build_tiny_tokenizer()
VOCAB, HIDDEN = len(tokenizer), 64

weights_inside_forward = []
distillation_terms = head._distillation_terms


def recording_distillation_terms(hidden, labels, layer, inputs):
    weights_inside_forward.append([type(layer.weight).__name__, list(layer.weight.shape)])
    return distillation_terms(hidden, labels, layer, inputs)


head._distillation_terms = recording_distillation_terms  # records, then runs the real thing


def build(lora: bool):
    model = build_tiny_llama(tokenizer)
    if lora:
        lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, lora_config)
    base = model.get_base_model() if lora else model
    add_distillation_head(base)
    return model, base


def shard(model, base, lm_head_alone: bool = False) -> None:
    for layer in base.model.layers:
        fully_shard(layer)
    if lm_head_alone:
        fully_shard(base.lm_head)
    else:
        fully_shard(base.model.embed_tokens)
        fully_shard([base.model.norm, base.lm_head], reshard_after_forward=False)
    fully_shard(model)


def micro_batch(process: int, step: int, lora: bool):
    """Rows 0-1 re-used (distilled towards a one-step-old teacher), rows 2-3 new (their logits returned to cache)."""
    generator = torch.Generator().manual_seed(100 * step + process)
    input_ids = torch.randint(3, VOCAB, (4, 12), generator=generator)
    labels = input_ids.clone()
    labels[:, :6] = -100  # the prompt
    reused = torch.tensor([True, True, False, False])
    num_distilled = int(((labels[:, 1:] != -100) & reused[:, None]).sum())
    teacher = torch.randn(num_distilled, HIDDEN if lora else VOCAB, generator=generator)
    inputs = DistillationInputs(
        distilled_rows=reused, teacher=teacher, teacher_is_hidden=lora, kl_weight=torch.full((num_distilled,), 1.0),
        temperature=torch.full((num_distilled,), 3.0), returned_rows=~reused, chunk_size=7,
        returned_logits_dtype=None if lora else torch.float32,
    )  # fmt: skip
    return input_ids, labels, inputs


def loss_and_outputs(model, input_ids, labels, inputs):
    outputs = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, dynsdpb=inputs)
    return (outputs.distill.sum() - outputs.log_probs.sum()) / (labels[:, 1:] != -100).sum(), outputs


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


results = {}
for adapter in ("full", "lora"):
    lora = adapter == "lora"
    reference, _ = build(lora)
    model, base = build(lora)
    model.load_state_dict(reference.state_dict())
    shard(model, base)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    reference_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=5e-3)
    steps = []
    for step in range(3):
        batch = micro_batch(rank, step, lora)
        loss, outputs = loss_and_outputs(model, *batch)
        loss.backward()
        with torch.no_grad():
            _, reference_outputs = loss_and_outputs(reference, *batch)
        reference_losses = []
        for process in range(world_size):
            reference_loss, _ = loss_and_outputs(reference, *micro_batch(process, step, lora))
            (reference_loss / world_size).backward()
            reference_losses.append(reference_loss.item())
        gradients = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        expected_gradients = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
        assert gradients.keys() == expected_gradients.keys()
        returned = outputs.returned_logits if not lora else outputs.returned_hidden
        expected_returned = reference_outputs.returned_logits if not lora else reference_outputs.returned_hidden
        steps.append({
            "loss": loss.item(),
            "expected_loss": reference_losses[rank],
            "gradient_difference": max(max_difference(gradients[n], expected_gradients[n]) for n in gradients),
            "zero_gradients": [n for n, g in gradients.items() if not g.abs().sum() > 0],
            "lm_head_gradients": [n for n in gradients if "lm_head" in n],
            "returned_difference": max_difference(returned, expected_returned),
            "returned_shape": list(returned.shape),
            "weight_outside_forward": list(output_layer(model).weight.to_local().shape),
        })  # fmt: skip
        optimizer.step(), optimizer.zero_grad(), reference_optimizer.step(), reference_optimizer.zero_grad()
    weights = dict(model.named_parameters())
    results[adapter] = {
        "steps": steps,
        "weight_difference": max(max_difference(weights[n].full_tensor(), p) for n, p in reference.named_parameters()),
        "weights_inside_forward": weights_inside_forward[-1],
    }

model, base = build(lora=False)
shard(model, base, lm_head_alone=True)
try:
    loss_and_outputs(model, *micro_batch(rank, 0, lora=False))
    results["lm_head_alone"] = "no error"
except ValueError as error:
    results["lm_head_alone"] = str(error)
(out / f"rank{rank}.json").write_text(json.dumps(results))
dist.barrier()
os._exit(0)  # without the gloo teardown, which on CPU now and then aborts a process after all the work is done
