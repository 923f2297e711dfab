"""The fine-tuning arms of the forgetting benchmark: one seed model, one task, trained several ways.

Every arm trains from the same settings (one [`SDFTDynSDPBConfig`], which holds the fields of every trainer): the same
data, optimizer updates, batch size, LoRA and seed. Each arm reads from it only the fields its own config has, then
sets what defines the arm (the DynSDPB mode). A trained arm leaves its adapter (or model) and a `benchmark_arm.json`
record in its directory (`<output_dir>/<arm>/seed-<seed>`), with the settings it was trained with. A finished arm is
trained again only when those settings changed; an interrupted one resumes from its last checkpoint when the
checkpoint was made with the same settings.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from ..dynsdpb.config import DynSDPBConfig
from ..dynsdpb.trainer import DynSDPBTrainer
from ..sdft.config import SDFTConfig
from ..sdft.trainer import SDFTTrainer
from ..sdft_dynsdpb import SDFTDynSDPBConfig, SDFTDynSDPBTrainer
from .jsonfiles import read_json, write_json

logger = logging.get_logger(__name__)

ARM_RECORD_FILE = "benchmark_arm.json"
ARM_SETTINGS_FILE = "benchmark_arm_settings.json"  # written when training starts: which checkpoints may be resumed
SEED_MODEL = "seed"
"""The model before any fine-tuning: evaluated by every benchmark, trained by none."""


@dataclass(frozen=True)
class Arm:
    name: str
    label: str  # as the table and charts show it
    trainer_class: type
    config_class: type
    overrides: dict[str, Any] = field(default_factory=dict)
    beside: str | None = None  # the arm it is compared with besides vanilla SFT (`vs_<beside>` in the report)
    # "task": the benchmark's training set; "native": the same questions with references in the model's own style
    data: str = "task"


# The paper's SDFT, whatever the shared config says of the follow-up options (own answers, lowest NLL).
PAPER_SDFT = {"sdft_candidates": ["rewrite"], "sdft_selection": "first"}

ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("sft", "vanilla SFT", SFTTrainer, SFTConfig),
        Arm("sft_native", "vanilla SFT, native references", SFTTrainer, SFTConfig, data="native"),
        Arm("sdft", "SDFT", SDFTTrainer, SDFTConfig, PAPER_SDFT),
        Arm(
            "sdft_own_answer",
            "SDFT, own answer first",
            SDFTTrainer,
            SDFTConfig,
            {"sdft_candidates": ["own_answer", "rewrite"]},
            beside="sdft",
        ),
        Arm(
            "sdft_lowest_nll",
            "SDFT, least surprising target",
            SDFTTrainer,
            SDFTConfig,
            {"sdft_candidates": ["own_answer", "rewrite"], "sdft_selection": "lowest_nll"},
            beside="sdft",
        ),
        Arm("dynsdpb", "DynSDPB (dynamic)", DynSDPBTrainer, DynSDPBConfig, {"dynsdpb_mode": "dynamic"}),
        Arm("dlb", "DynSDPB (constant, DLB)", DynSDPBTrainer, DynSDPBConfig, {"dynsdpb_mode": "constant"}),
        Arm("sdft_dynsdpb", "SDFT data + DynSDPB loss", SDFTDynSDPBTrainer, SDFTDynSDPBConfig),
    )
}
"""The arms, in table order; `sdft_dynsdpb` is [`SDFTDynSDPBTrainer`] (SDFT's rewrite, then DynSDPB's loss).

`sft_native` is vanilla SFT on the benchmark's *native* dataset: the same questions and answers with the references
written in the seed model's own style, where the task's references are in a foreign one (the forgetting experiment of
`hypotheses.py`: does a foreign style make SFT forget more, and does SDFT close that gap?).

`sdft_own_answer` trains on the seed model's own answer to the instruction when the checker passes it (else SDFT's
rewrite, else the reference); `sdft_lowest_nll` on the passing candidate (own answer, rewrite, reference) the seed
model finds least surprising. Both need a checker other than `none`, and are compared with `sdft` as well as with SFT.
"""
DEFAULT_ARMS = ["sft", "sdft", "dynsdpb", "dlb", "sdft_dynsdpb"]
"""The arms trained when none are named: those that run with any `sdft_checker` (the own-answer ones need one)."""


def register_variants(variants: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Adds arms defined as variants of others (a benchmark config's `arm_variants`) to `ARMS`; returns their names.

    `{"sdft_strict": {"of": "sdft", "label": "SDFT, strict checker", "overrides": {"sdft_checker": "math_strict"}}}`
    trains as its base arm (`of`) with `overrides` on top of the base's own, and is compared with its base
    (`vs_<base>` in the report) besides SFT: one run can then measure an option of a method against the method, on
    the same seeds, data and probes. Registering the same variant again is a no-op; another under a taken name fails.
    """
    names = []
    for name, definition in variants.items():
        unknown = sorted(set(definition) - {"of", "label", "overrides"})
        if unknown or "of" not in definition:
            raise ValueError(
                f"Arm variant `{name}`: give `of` (the arm it varies), optionally `label` and `overrides` (config "
                f"fields); got {sorted(definition)}."
            )
        base = ARMS.get(definition["of"])
        if base is None:
            raise ValueError(f"Arm variant `{name}` varies `{definition['of']}`, which is not an arm: {list(ARMS)}.")
        overrides = dict(definition.get("overrides") or {})
        fields = {f.name for f in dataclasses.fields(base.config_class)}
        strangers = sorted(set(overrides) - fields)
        if strangers:
            raise ValueError(
                f"Arm variant `{name}` overrides {strangers}, which {base.config_class.__name__} (the config of "
                f"`{base.name}`) does not have."
            )
        arm = dataclasses.replace(
            base,
            name=name,
            label=str(definition.get("label") or f"{base.label}, {name}"),
            overrides={**base.overrides, **overrides},
            beside=base.name,
        )
        if name in ARMS and ARMS[name] != arm:
            raise ValueError(f"An arm named `{name}` exists already: give the variant another name.")
        ARMS[name] = arm
        names.append(name)
    return names


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
    # Every update logged: the whole run's train loss is then read from the log history, which a resume restores.
    values.update(arm.overrides, output_dir=output_dir, logging_steps=1)
    return arm.config_class(**values)


_UNRECORDED_FIELDS = {
    # Where and how the run reports, not what it trains: never a reason to train again.
    "output_dir",
    "logging_dir",
    "logging_steps",
    "logging_first_step",
    "logging_strategy",
    "report_to",
    "disable_tqdm",
    "run_name",
    "push_to_hub",
    "hub_model_id",
    "hub_token",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "overwrite_output_dir",
    "sdft_cache_dir",
    "dataloader_num_workers",
}


def arm_settings(
    model_name: str, args: SFTConfig, train_dataset: Dataset, peft_config=None, quantization_config=None
) -> dict:
    """Everything that decides what an arm trains, as JSON values: the model, its config, the data's fingerprint,
    LoRA, 4-bit.

    A finished arm is reused only when these are unchanged (see `train_arm`).
    """
    settings = {
        f.name: _json_value(getattr(args, f.name))
        for f in dataclasses.fields(args)
        if f.init and f.name not in _UNRECORDED_FIELDS and not f.name.startswith("_")
    }
    settings["model"] = model_name
    settings["train_dataset"] = train_dataset._fingerprint
    settings["peft_config"] = _json_value(peft_config.to_dict()) if peft_config is not None else None
    settings["quantization_config"] = (
        _json_value(quantization_config.to_dict()) if quantization_config is not None else None
    )
    return settings


def _json_value(value: Any) -> Any:
    """`value` as JSON would give it back (sets sorted, enums and dtypes as text), so records compare equal."""
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def changed_settings(recorded: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """`{name: (recorded, current)}` for every setting that differs."""
    return {
        name: (recorded.get(name), current.get(name))
        for name in sorted(set(recorded) | set(current))
        if recorded.get(name) != current.get(name)
    }


def whole_run_train_loss(log_history: list[dict[str, Any]], global_step: int) -> float | None:
    """The mean training loss over every update of the run, read from the per-update log (resumes included).

    `Trainer`'s own `train_loss` averages only the updates of its last `train()` call, so a resumed run would report
    another number than an uninterrupted one. Arms log every update (`logging_steps=1`); the log history is saved
    in each checkpoint and restored on resume, so it holds every update once.
    """
    losses = {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry and "step" in entry}
    if sorted(losses) != list(range(1, global_step + 1)):
        return None  # some update was not logged: no whole-run figure rather than a wrong one
    return sum(losses[step] for step in range(1, global_step + 1)) / global_step


def weights_digest(arm_dir: str) -> str:
    """The SHA-256 of an arm's saved weights (adapter or model files): what its probe results are tied to."""
    digest = hashlib.sha256()
    names = sorted(glob.glob(os.path.join(arm_dir, "*.safetensors")) + glob.glob(os.path.join(arm_dir, "*.bin")))
    if not names:
        raise FileNotFoundError(f"No saved weights in {arm_dir}.")
    for name in names:
        digest.update(os.path.basename(name).encode())
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_arm_inputs(names: list[str], shared: SDFTDynSDPBConfig, train_dataset: Dataset) -> None:
    """Each arm's config built and its trainer's own pre-loading checks run on the data, before the first arm trains.

    Without this, a setting only one arm refuses (a dataset too small for DynSDPB's overlapping batches, a format SDFT
    cannot rewrite) would fail after the arms before it had trained.
    """
    for name in names:
        arm = ARMS[name]
        try:
            args = arm_config(arm, shared, shared.output_dir)
        except ValueError as error:
            raise ValueError(f"Benchmark arm `{name}` ({arm.label}): {error}") from error
        check_inputs = getattr(arm.trainer_class, "check_inputs", None)  # `SFTTrainer` checks nothing before loading
        if check_inputs is not None:
            check_inputs(args, train_dataset)


def arm_record(arm_dir: str) -> dict[str, Any] | None:
    """What a finished arm recorded (settings, train metrics, distillation report), or None if it has not finished."""
    return read_json(os.path.join(arm_dir, ARM_RECORD_FILE))


def _start_fresh(arm_dir: str, why: str) -> None:
    """Removes what an earlier run with other settings left in `arm_dir`: its record and checkpoints."""
    logger.warning(f"{arm_dir}: {why}; training it again.")
    for name in (ARM_RECORD_FILE, ARM_SETTINGS_FILE):
        if os.path.exists(os.path.join(arm_dir, name)):
            os.remove(os.path.join(arm_dir, name))
    for checkpoint in glob.glob(os.path.join(arm_dir, "checkpoint-*")):
        shutil.rmtree(checkpoint)


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

    A finished arm is reused only if it was trained with the same settings (`arm_settings`) and its saved weights are
    the ones its record vouches for (their SHA-256); otherwise it is trained again from the start, with a warning
    naming why. Checkpoints are resumed only when the settings that wrote them are on record and equal. Returns the
    arm's record: its settings, the digest of its weights, its train metrics (`train_loss` over the whole run, resumes
    included), and the distillation report for the arms that rewrite.
    """
    args = arm_config(arm, shared, output_dir)
    settings = arm_settings(model_name, args, train_dataset, peft_config, quantization_config)
    record = arm_record(output_dir)
    if record is not None:
        changed = changed_settings(record.get("settings", {}), settings)
        if not changed and _saved_weights(output_dir) == record.get("weights_sha256"):
            return record
        why = f"trained with other settings {_describe(changed)}" if changed else "its weights are not those recorded"
        _start_fresh(output_dir, why)
    started = read_json(os.path.join(output_dir, ARM_SETTINGS_FILE))
    checkpoints = glob.glob(os.path.join(output_dir, "checkpoint-*"))
    if started is None and checkpoints:  # no record of what wrote them: they may be another run's
        _start_fresh(output_dir, "checkpoints without the settings that wrote them")
    elif started is not None and changed_settings(started, settings):
        changed = changed_settings(started, settings)
        _start_fresh(output_dir, f"checkpoints from a run with other settings {_describe(changed)}")
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, ARM_SETTINGS_FILE), settings)
    trainer = arm.trainer_class(
        model=model_name,
        args=args,
        train_dataset=train_dataset,
        # PEFT writes the model's path into the config it is given: a copy keeps the shared one as declared
        peft_config=copy.deepcopy(peft_config),
        quantization_config=quantization_config,
    )
    checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    output = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(output_dir)
    metrics = dict(output.metrics)
    metrics["train_loss"] = whole_run_train_loss(trainer.state.log_history, output.global_step)
    record = {
        "arm": arm.name,
        "label": arm.label,
        "seed": args.seed,
        "global_step": output.global_step,
        "train": metrics,
        "resumed_from": checkpoint,
        "settings": settings,
        "weights_sha256": weights_digest(output_dir),
    }
    if hasattr(trainer, "distillation_report"):
        record["distillation"] = trainer.distillation_report
    if trainer.is_world_process_zero():
        write_json(os.path.join(output_dir, ARM_RECORD_FILE), record)
    del trainer  # the next arm loads its own copy of the model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def _saved_weights(arm_dir: str) -> str | None:
    """The digest of the weights saved in `arm_dir`, or None if there are none."""
    try:
        return weights_digest(arm_dir)
    except FileNotFoundError:
        return None


def _describe(changed: dict[str, tuple[Any, Any]]) -> str:
    shown = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in list(changed.items())[:5])
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    return f"({shown}{more})"
