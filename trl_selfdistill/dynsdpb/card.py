"""DynSDPB's section of the model card: what it did in the run, and its settings."""

from __future__ import annotations

import dataclasses

from trl import SFTConfig

from .config import DynSDPBConfig


def dynsdpb_settings_section(args) -> str:
    """What DynSDPB did in this run, and its settings (the `DynSDPBConfig` fields that `SFTConfig` lacks).

    Only those, also for a config that holds another method's fields too (`SDFTDynSDPBConfig`): each has its section.
    """
    sft_fields = {field.name for field in dataclasses.fields(SFTConfig)}
    own = [field for field in dataclasses.fields(DynSDPBConfig) if field.init and field.name not in sft_fields]
    table = "\n".join(
        f"| `{field.name}` | `{getattr(args, field.name)}` | {field.metadata.get('help', '')} |" for field in own
    )
    batch, reused = args.per_device_train_batch_size, args.reuse_count
    weighting = (
        "a weight and temperature per sample that adapt to how uncertain and how discriminative those earlier "
        "predictions were"
        if args.dynsdpb_mode == "dynamic"
        else "a fixed weight and temperature, as in DLB (Shen et al., CVPR 2022)"
    )
    return (
        "## DynSDPB settings\n\n"
        f"In each per-device batch of {batch} samples, {reused} repeat the new samples of the same batch slot one "
        "optimizer step earlier. Their loss adds a distillation term (KL divergence) towards the logits the model "
        f"gave them then, with {weighting}.\n\n"
        "| setting | value | meaning |\n|---|---|---|\n"
        f"{table}\n"
    )
