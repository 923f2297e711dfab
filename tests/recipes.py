"""The precisions and adapters users train with, as trainer arguments for a tiny Llama saved on disk.

Users load models in bfloat16 (often 4-bit) and train with `bf16=True`; float32-only tests once hid a crash there. Each
recipe says how the model is loaded (`model_init_kwargs`, `quantization_config`), which mixed precision the trainer
uses, and whether LoRA adapters are trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from transformers import BitsAndBytesConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    dtype: str  # what the weights are loaded in
    mixed_precision: str  # "bf16", "fp16" or "no"
    lora: bool
    quantization: str | None = None  # "nf4" (QLoRA, bf16 compute) or "int8"
    extra_args: dict = field(default_factory=dict)

    def model_kwargs(self) -> dict:
        """What to pass to a trainer next to `model=<path>`: `peft_config` and `quantization_config`."""
        kwargs = {
            "peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if self.lora else None
        }
        if self.quantization == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        elif self.quantization == "int8":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        return kwargs

    def args(self) -> dict:
        """Training arguments of the recipe (on top of the test's own)."""
        return {
            "bf16": self.mixed_precision == "bf16",
            "fp16": self.mixed_precision == "fp16",
            "model_init_kwargs": {"dtype": self.dtype},
            **self.extra_args,
        }


RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe("fp32-full", "float32", "no", lora=False),
        Recipe("bf16-full", "bfloat16", "bf16", lora=False),
        Recipe("bf16-lora", "bfloat16", "bf16", lora=True),
        Recipe("qlora-nf4-bf16", "bfloat16", "bf16", lora=True, quantization="nf4"),
        Recipe("int8-lora", "bfloat16", "bf16", lora=True, quantization="int8"),
        Recipe("fp16-lora", "float16", "fp16", lora=True),
        Recipe("fp32-weights-fp16-mixed", "float32", "fp16", lora=False),
    )
}


def changed(before: dict[str, torch.Tensor], model) -> tuple[set[str], set[str]]:
    """Names of the trainable parameters that changed and of the frozen ones that changed since `before`."""
    trained, frozen = set(), set()
    for name, param in model.named_parameters():
        if not torch.equal(before[name], param.detach().float()):
            (trained if param.requires_grad else frozen).add(name)
    return trained, frozen


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone().float() for name, param in model.named_parameters()}


def tiny_training_args(tmp_path, **overrides) -> dict:
    """Training arguments of the tests' short runs; on a GPU machine they run on the GPU."""
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        logging_steps=1,
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return {**defaults, **overrides}
