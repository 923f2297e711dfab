"""The fine-tuning arms of the forgetting benchmark: one seed model, one task, trained several ways.

Every arm trains from the same settings (one [`SDFTDynSDPBConfig`], which holds the fields of every trainer): the same
data, optimizer updates, batch size, LoRA and seed. Each arm reads from it only the fields its own config has, then
sets what defines the arm (the DynSDPB mode). A trained arm leaves its adapter (or model) and a `benchmark_arm.json`
record in `<output_dir>/<arm>`; a finished arm is never trained again, and an interrupted one resumes from its last
checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from ..dynsdpb.config import DynSDPBConfig
from ..dynsdpb.trainer import DynSDPBTrainer
from ..sdft.config import SDFTConfig
from ..sdft.trainer import SDFTTrainer
from ..sdft_dynsdpb import SDFTDynSDPBConfig, SDFTDynSDPBTrainer

ARM_RECORD_FILE = "benchmark_arm.json"
SEED_MODEL = "seed"
"""The model before any fine-tuning: evaluated by every benchmark, trained by none."""


@dataclass(frozen=True)
class Arm:
    name: str
    label: str  # as the table and charts show it
    trainer_class: type
    config_class: type
    overrides: dict[str, Any] = field(default_factory=dict)


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("sft", "vanilla SFT", SFTTrainer, SFTConfig),
        Arm("sdft", "SDFT", SDFTTrainer, SDFTConfig),
        Arm("dynsdpb", "DynSDPB (dynamic)", DynSDPBTrainer, DynSDPBConfig, {"distill_mode": "dynamic"}),
        Arm("dlb", "DynSDPB (constant, DLB)", DynSDPBTrainer, DynSDPBConfig, {"distill_mode": "constant"}),
        Arm("sdft_dynsdpb", "SDFT data + DynSDPB loss", SDFTDynSDPBTrainer, SDFTDynSDPBConfig),
    )
}
"""The arms, in table order; `sdft_dynsdpb` is [`SDFTDynSDPBTrainer`] (SDFT's rewrite, then DynSDPB's loss)."""


def check_arms(names: list[str]) -> list[str]:
    """The arms to train, checked before anything is loaded."""
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        raise ValueError(f"Unknown benchmark arm(s) {unknown}; choose among {list(ARMS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"An arm is listed twice in {names}.")
    return list(names)


def arm_config(arm: Arm, shared: SDFTDynSDPBConfig, output_dir: str) -> SFTConfig:
    """The arm's own config: every field its class has, copied from `shared`, then the arm's overrides."""
    values = {
        f.name: getattr(shared, f.name)
        for f in dataclasses.fields(arm.config_class)
        if f.init and hasattr(shared, f.name)
    }
    values.update(arm.overrides, output_dir=output_dir)
    return arm.config_class(**values)


def check_arm_inputs(names: list[str], shared: SDFTDynSDPBConfig, train_dataset: Dataset) -> None:
    """Each arm's config built and its trainer's own pre-loading checks run on the data, before the first arm trains.

    Without this, a setting only one arm refuses (a dataset too small for DynSDPB's overlapping batches, a format SDFT
    cannot rewrite) would fail after the arms before it had trained.
    """
    for name in names:
        arm = ARMS[name]
        args = arm_config(arm, shared, shared.output_dir)
        if issubclass(arm.trainer_class, SDFTTrainer):
            SDFTTrainer._validate_sdft_before_loading(args, train_dataset, None)
        if issubclass(arm.trainer_class, DynSDPBTrainer):
            DynSDPBTrainer._validate_dynsdpb_before_loading(args, train_dataset, {})


def arm_record(arm_dir: str) -> dict[str, Any] | None:
    """What a finished arm recorded (train metrics, distillation report), or None if it has not finished."""
    path = os.path.join(arm_dir, ARM_RECORD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def train_arm(
    arm: Arm,
    model_name: str,
    shared: SDFTDynSDPBConfig,
    train_dataset: Dataset,
    output_dir: str,
    *,
    peft_config=None,
    quantization_config=None,
) -> dict[str, Any]:
    """Trains one arm into `output_dir` (resuming from its last checkpoint) unless it already finished there.

    Returns the arm's record: its train metrics, and the distillation report for the arms that rewrite.
    """
    record = arm_record(output_dir)
    if record is not None:
        return record
    args = arm_config(arm, shared, output_dir)
    trainer = arm.trainer_class(
        model=model_name,
        args=args,
        train_dataset=train_dataset,
        peft_config=peft_config,
        quantization_config=quantization_config,
    )
    checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    output = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(output_dir)
    record = {
        "arm": arm.name,
        "label": arm.label,
        "global_step": output.global_step,
        "train": output.metrics,
        "resumed_from": checkpoint,
    }
    if hasattr(trainer, "distillation_report"):
        record["distillation"] = trainer.distillation_report
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, ARM_RECORD_FILE), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
    del trainer  # the next arm loads its own copy of the model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record
