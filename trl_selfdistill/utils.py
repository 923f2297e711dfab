"""Small checks and defaults shared by the trainers."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments


def shards_parameters(args: TrainingArguments) -> bool:
    """Whether DeepSpeed ZeRO-3 or FSDP splits every parameter across processes (so no process holds a whole layer)."""
    zero3 = args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3
    return zero3 or bool(args.fsdp)


def default_output_dir(model, method: str) -> str:
    """`<model name>-<method>`, the default output directory, named as TRL names its own (`Qwen3-0.6B-SFT`)."""
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
    return f"{name.rstrip('/').split('/')[-1]}-{method}"


def check_trainable_dtypes(model: torch.nn.Module, uses_grad_scaler: bool) -> None:
    """fp16 mixed precision scales and unscales gradients, which PyTorch refuses for float16 trainable weights."""
    if not uses_grad_scaler:
        return
    half = [name for name, param in model.named_parameters() if param.requires_grad and param.dtype == torch.float16]
    if half:
        raise ValueError(
            f"`fp16=True` trains with a gradient scaler, which cannot unscale float16 gradients, but {len(half)} "
            f"trainable parameters are float16 (e.g. {half[0]}). Load the model in float32 (`dtype='float32'` in "
            "`model_init_kwargs`), train LoRA adapters (PEFT keeps them in float32), or use `bf16=True`."
        )


def check_liger_kernel(args: TrainingArguments) -> None:
    """`use_liger_kernel=True` fails when training starts if Liger is missing: for SDFT, after the whole rewrite."""
    if args.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise ImportError(
            "`use_liger_kernel=True` needs the `liger-kernel` package (Triton kernels, GPUs only): "
            "`pip install liger-kernel`, or set `use_liger_kernel=False`."
        )


@dataclass
class CheckpointingByItsNewName:
    """TRL's default, activation checkpointing on, set through the name transformers 5.24 keeps.

    TRL 1.16 sets `gradient_checkpointing=True` by default, a name transformers 5.24 deprecates with a FutureWarning on
    every config built. Mixed in before `SFTConfig`, this sets `activation_checkpointing=True` instead when the user
    set neither name, so the warning is left to users who pass the old name themselves.
    """

    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing` (on by default)."}
    )

    def __post_init__(self):
        if self.gradient_checkpointing is None and self.activation_checkpointing is None:
            self.activation_checkpointing = True
        super().__post_init__()
