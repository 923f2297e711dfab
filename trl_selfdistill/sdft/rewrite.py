"""`distill_dataset`: the SDFT rewrite on its own, without training.

    prompts -> seed-model generation (in process or on a server; cached, sharded across processes)
            -> acceptance check -> fallback

Every response is rewritten once per cache key. Finished rewrites reach the disk as they come (a batch at a time in
process, as they complete on a server), so a killed run or a failed server loses nothing and a rerun resumes where it
stopped. The checker runs after the cache, so changing it never regenerates anything.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from ..cache import RowCache, fingerprint
from ..generation import GenerationEngine, ServerEngine, TransformersEngine
from ..models import resolve_model_name
from ..paths import default_cache_dir
from .checkers import rejection_reason
from .spec import DistillSpec
from .targets import RewriteTarget, apply_rewrites, collect_targets
from .templates import check_renderable

if TYPE_CHECKING:
    from .config import SDFTConfig

logger = logging.get_logger(__name__)

ENGINES = ("transformers", "server")


class DistillationResult(NamedTuple):
    dataset: Dataset
    report: dict[str, Any]


def model_name(model: PreTrainedModel | str) -> str:
    """The seed model's name: the string itself, or the name or path its configuration was loaded from."""
    if isinstance(model, str):
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "_name_or_path", "") or ""


def build_engine(
    engine: str | GenerationEngine,
    model: PreTrainedModel | str | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int | str = "auto",
    compile: bool = False,
    server_url: str | None = None,
    server_model: str | None = None,
    server_options: Mapping[str, Any] | None = None,
) -> GenerationEngine:
    """An engine by name (`"transformers"` or `"server"`), or `engine` itself if it is one already.

    `batch_size` and `compile` are [`TransformersEngine`] settings. `server_model` overrides the model id expected on
    the server (a deployment under another name); `server_options` are [`ServerEngine`] settings (`concurrency`,
    `timeout`, `max_retries`, `backoff`). With the in-process engine, a model name is loaded here.
    """
    if not isinstance(engine, str):
        return engine
    if engine == "server":
        if not server_url:
            raise ValueError("`distill_engine='server'` needs `distill_server_url`, e.g. 'http://localhost:8000'.")
        if model is None and not server_model:
            raise ValueError("The server engine needs the seed model's name: pass `model` (a name) or `server_model`.")
        return ServerEngine(server_url, server_model or model_name(model), tokenizer, **(server_options or {}))
    if engine == "transformers":
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(resolve_model_name(model), dtype="auto")
        return TransformersEngine(model, tokenizer, batch_size, compile=compile)
    raise ValueError(f"Unknown `distill_engine` {engine!r}: use one of {list(ENGINES)}.")


def engine_from_config(args: SDFTConfig, model: PreTrainedModel | str, tokenizer) -> GenerationEngine:
    """The engine an [`SDFTConfig`] asks for: in process with `model`, or on the server."""
    if args.distill_engine == "server":
        return build_engine(
            "server", model, tokenizer, server_url=args.distill_server_url, server_model=args.distill_server_model,
            server_options=args.server_options,
        )  # fmt: skip
    return build_engine(
        args.distill_engine, model, tokenizer, batch_size=args.distill_batch_size, compile=args.distill_compile
    )


def distill_dataset(
    model: PreTrainedModel | str | None,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    spec: DistillSpec | None = None,
    *,
    engine: str | GenerationEngine = "transformers",
    batch_size: int | str = "auto",
    server_url: str | None = None,
    server_model: str | None = None,
    seed: int = 42,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    **spec_kwargs: Any,
) -> DistillationResult:
    """Rewrites every response of `dataset` with the seed model and returns the distilled dataset and a report.

    Args:
        model: the seed model (a PEFT model's adapter is disabled while generating) or its name; with the server
            engine only the name is used, and no weights are loaded.
        tokenizer: its tokenizer.
        dataset: prompt-completion (standard or conversational) or conversational `messages`.
        spec: the prompt, checker and decoding ([`DistillSpec`]); or give `template`, `template_mode`, `checker`,
            `generation_kwargs` as keyword arguments (see [`SDFTConfig`]).
        engine: `"transformers"` (in process), `"server"` (an OpenAI-compatible server at `server_url`, serving the
            model named `server_model`, by default the seed model's name), or a [`GenerationEngine`].
        batch_size: prompts per `generate` call of the in-process engine, or `"auto"`.
        seed: base seed; row `i` has seed `seed + i` (in process, a batch is sampled with its first row's seed).
        cache_dir: root of the rewrite cache (defaults to `~/.cache/trl_selfdistill/rewrites`).

    Returns:
        `DistillationResult(dataset, report)`; the dataset keeps every row and column, rejected rewrites replaced by
        the reference. Under several processes each rewrites its share and all get the full result.
    """
    if spec is None:
        spec = DistillSpec.create(**spec_kwargs)
    elif spec_kwargs:
        raise TypeError(f"Pass either `spec` or its parts, not both (got {sorted(spec_kwargs)}).")
    check_renderable(tokenizer, spec.template_mode)
    targets = collect_targets(dataset)
    engine = build_engine(
        engine, model, tokenizer, batch_size=batch_size, server_url=server_url, server_model=server_model
    )
    if isinstance(engine, ServerEngine):
        engine.check(spec.decoding)
    prompts = [spec.render(target.instruction, target.reference, tokenizer) for target in targets]

    generator = engine.identity()
    decoding = dict(spec.decoding)
    key = fingerprint(generator, prompts, decoding, seed)
    state = PartialState()
    cache = RowCache(os.path.join(cache_dir or default_cache_dir(), "rewrites", key), f"rank{state.process_index}")
    if state.is_main_process:
        cache.write_metadata({"generator": generator, "template": spec.template, "decoding": decoding})

    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    rewrites, generated = _generate_missing(prompts, lengths, targets, cache, engine, decoding, seed, show_progress)

    responses, reasons = {}, Counter()
    for target in targets:
        rewrite = rewrites[_unit_key(target)]
        reason = rejection_reason(rewrite, target.reference, dataset[target.row], spec.checker)
        reasons[reason] += 1
        responses[(target.row, target.turn)] = target.reference if reason else rewrite
    report = {
        "rows": len(dataset),
        "total": len(targets),
        "accepted": reasons[None],
        "fallback": len(targets) - reasons[None],
        **{f"rejected_{rule}": count for rule, count in sorted(reasons.items(), key=str) if rule},
        "generated": generated,
        "from_cache": len(targets) - generated,
        "template": spec.template.name,
        "template_mode": spec.template_mode,
        "checker": spec.checker_name,
        "generation_kwargs": decoding,
        "engine": generator.get("engine", "transformers"),
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
    seed: int,
    show_progress: bool,
) -> tuple[dict[str, str], int]:
    """Generates what the cache lacks for this process's share; returns all rewrites and how many were new."""
    state = PartialState()
    # Longest first, dealt round-robin in whole batches: every process gets a similar mix of lengths, and with a fixed
    # batch size the batches (so the samples) are those one process would make.
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    deal = engine.batch_size if isinstance(getattr(engine, "batch_size", None), int) else 1
    chunks = [order[start : start + deal] for start in range(0, len(order), deal)]
    mine = [i for chunk in chunks[state.process_index :: state.num_processes] for i in chunk]
    cached = cache.load()
    missing = [i for i in mine if _unit_key(targets[i]) not in cached]

    progress = tqdm(
        total=len(mine),
        initial=len(mine) - len(missing),
        desc="SDFT rewrite",
        unit="response",
        disable=not show_progress or not state.is_local_main_process,
    )
    try:
        # Each group of finished rows (a batch in process, whatever completed on a server) is on disk before the next.
        for group in engine.generate([prompts[i] for i in missing], decoding, [seed + i for i in missing]):
            records = [{"key": _unit_key(targets[missing[position]]), "rewrite": text} for position, text in group]
            cache.append(records)
            cached.update((record["key"], record) for record in records)
            progress.update(len(records))
    finally:
        progress.close()

    local = {_unit_key(targets[i]): cached[_unit_key(targets[i])]["rewrite"] for i in mine}
    rewrites = {}
    for part in gather_object([local]):
        rewrites.update(part)
    generated = sum(gather_object([len(missing)]))
    return rewrites, generated
