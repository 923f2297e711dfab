"""Small checks shared by the trainers."""

from __future__ import annotations

from transformers import TrainingArguments


def shards_parameters(args: TrainingArguments) -> bool:
    """Whether DeepSpeed ZeRO-3 or FSDP splits every parameter across processes (so no process holds a whole layer)."""
    zero3 = args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3
    return zero3 or bool(args.fsdp)
