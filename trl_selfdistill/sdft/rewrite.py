"""`distill_dataset`: the SDFT rewrite on its own, without training.

    prompts -> seed-model generation (batched, cached, sharded across processes) -> acceptance check -> fallback

Every response is rewritten once per cache key; what was generated is on disk before the next batch starts, so a
killed run resumes where it stopped. The checker runs after the cache, so changing it never regenerates anything.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from ..cache import RowCache, fingerprint
from ..generation import GenerationEngine, TransformersEngine
from ..paths import default_cache_dir
from .checkers import get_checker, rejection_reason
from .config import PAPER_GENERATION_KWARGS
from .targets import RewriteTarget, apply_rewrites, collect_targets
from .templates import check_renderable, render_prompt, resolve_template

logger = logging.get_logger(__name__)


class DistillationResult(NamedTuple):
    dataset: Dataset
    report: dict[str, Any]


def resolve_generation_kwargs(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The paper's decoding updated with `overrides`; unknown keys fail now rather than inside `generate`."""
    kwargs = {**PAPER_GENERATION_KWARGS, **(overrides or {})}
    known = GenerationConfig().to_dict()
    unknown = sorted(key for key in kwargs if key not in known)
    if unknown:
        raise ValueError(
            f"Unknown decoding option(s) {unknown} in `distill_generation_kwargs`; use `GenerationConfig` fields "
            "such as `max_new_tokens`, `temperature`, `top_p`, `top_k`, `do_sample`."
        )
    return kwargs


def model_fingerprint(model: PreTrainedModel) -> dict[str, Any]:
    """Identifies the seed weights cheaply: name, class, size and a strided sample of a few tensors."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = [p for name, p in base.named_parameters() if "lora_" not in name]
    digest = hashlib.sha256()
    for param in (params[0], params[len(params) // 2], params[-1]):
        flat = param.detach().reshape(-1)
        digest.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return {
        "name": getattr(base.config, "_name_or_path", ""),
        "class": type(base).__name__,
        "num_parameters": sum(p.numel() for p in params),
        "weights": digest.hexdigest()[:20],
    }


def distill_dataset(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    template: str = "auto",
    template_mode: str = "chat",
    checker: str | Callable[[str, str, dict], bool] = "none",
    generation_kwargs: dict[str, Any] | None = None,
    batch_size: int = 16,
    seed: int = 42,
    cache_dir: str | os.PathLike | None = None,
    engine: GenerationEngine | None = None,
    show_progress: bool = True,
) -> DistillationResult:
    """Rewrites every response of `dataset` with the seed `model` and returns the distilled dataset and a report.

    Args:
        model: the seed model (a PEFT model's adapter is disabled while generating).
        tokenizer: its tokenizer, with a pad token.
        dataset: prompt-completion (standard or conversational) or conversational `messages`.
        template, template_mode, checker, generation_kwargs, batch_size: see [`SDFTConfig`].
        seed: base seed; batch `b` of the length-sorted order is sampled with `seed + b`.
        cache_dir: root of the rewrite cache (defaults to `~/.cache/trl_selfdistill/rewrites`).
        engine: a [`GenerationEngine`]; defaults to `TransformersEngine(model, tokenizer)`.

    Returns:
        `DistillationResult(dataset, report)`; the dataset keeps every row and column, rejected rewrites replaced by
        the reference. Under several processes each rewrites its share and all get the full result.
    """
    checker_fn = get_checker(checker)
    distill_template = resolve_template(template, checker if isinstance(checker, str) else None)
    check_renderable(tokenizer, template_mode)
    decoding = resolve_generation_kwargs(generation_kwargs)
    targets = collect_targets(dataset)
    prompts = [render_prompt(distill_template, t.instruction, t.reference, tokenizer, template_mode) for t in targets]

    seed_model = model_fingerprint(model)
    key = fingerprint(seed_model, prompts, decoding, seed)
    state = PartialState()
    cache = RowCache(os.path.join(cache_dir or default_cache_dir(), "rewrites", key), f"rank{state.process_index}")
    if state.is_main_process:
        cache.write_metadata({"model": seed_model, "template": distill_template, "decoding": decoding})

    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    rewrites, generated = _generate_missing(
        prompts,
        lengths,
        targets,
        cache,
        engine or TransformersEngine(model, tokenizer),
        decoding,
        batch_size,
        seed,
        show_progress,
    )

    responses, reasons = {}, Counter()
    for target in targets:
        reason = rejection_reason(rewrites[_unit_key(target)], target.reference, dataset[target.row], checker_fn)
        reasons[reason] += 1
        responses[(target.row, target.turn)] = target.reference if reason else rewrites[_unit_key(target)]
    report = {
        "rows": len(dataset),
        "total": len(targets),
        "accepted": reasons[None],
        "fallback": len(targets) - reasons[None],
        **{f"rejected_{rule}": count for rule, count in sorted(reasons.items(), key=str) if rule},
        "generated": generated,
        "from_cache": len(targets) - generated,
        "template": distill_template.name,
        "template_mode": template_mode,
        "checker": checker if isinstance(checker, str) else getattr(checker, "__name__", "custom"),
        "generation_kwargs": decoding,
        "cache_dir": str(cache.directory),
    }
    return DistillationResult(apply_rewrites(dataset, responses), report)


def _unit_key(target: RewriteTarget) -> str:
    return f"{target.row}:{target.turn}"


def _generate_missing(
    prompts: list[str],
    lengths: list[int],
    targets: list[RewriteTarget],
    cache: RowCache,
    engine: GenerationEngine,
    decoding: dict[str, Any],
    batch_size: int,
    seed: int,
    show_progress: bool,
) -> tuple[dict[str, str], int]:
    """Generates what the cache lacks for this process's share; returns all rewrites and how many were new."""
    state = PartialState()
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory error shows up at once.
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    cached = cache.load()
    mine = list(range(state.process_index, len(batches), state.num_processes))

    local, generated = {}, 0
    progress = tqdm(
        total=sum(len(batches[b]) for b in mine),
        desc="SDFT rewrite",
        unit="response",
        disable=not show_progress or not state.is_local_main_process,
    )
    for b in mine:
        missing = [i for i in batches[b] if _unit_key(targets[i]) not in cached]
        if missing:
            texts = engine.generate([prompts[i] for i in missing], decoding, seed + b)
            records = [{"key": _unit_key(targets[i]), "rewrite": text} for i, text in zip(missing, texts, strict=True)]
            cache.append(records)
            cached.update((record["key"], record) for record in records)
            generated += len(missing)
        local.update((_unit_key(targets[i]), cached[_unit_key(targets[i])]["rewrite"]) for i in batches[b])
        progress.update(len(batches[b]))
    progress.close()

    rewrites = {}
    for part in gather_object([local]):
        rewrites.update(part)
    generated = sum(gather_object([generated]))
    return rewrites, generated
