"""`distill_dataset`: the SDFT rewrite on its own, without training.

    prompts -> seed-model generation (in process or on a server; cached, sharded across processes)
            -> acceptance check -> fallback

Every response is rewritten once per cache key. Finished rewrites reach the disk as they come (a batch at a time in
process, as they complete on a server), so a killed run or a failed server loses nothing and a rerun resumes where it
stopped. The checker runs after the cache, so changing it never regenerates anything.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from .. import claims as claim_files
from ..cache import RowCache, fingerprint
from ..generation import GenerationEngine, ServerEngine, TransformersEngine
from ..models import resolve_model_name
from ..paths import default_cache_dir
from .checkers import rejection_reason
from .gap import response_nll
from .spec import DistillSpec
from .targets import SKIP_REASONS, RewriteTarget, apply_rewrites, collect_targets
from .templates import check_renderable

if TYPE_CHECKING:
    from .config import SDFTConfig

logger = logging.get_logger(__name__)

ENGINES = ("transformers", "server")


class DistillationResult(NamedTuple):
    dataset: Dataset
    report: dict[str, Any]
    rows: list[dict[str, Any]]  # the audit trail: one entry per response (row, turn, rewrite, accepted, reason, ...)


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
            `generation_kwargs`, `keep_truncated` as keyword arguments (see [`SDFTConfig`]).
        engine: `"transformers"` (in process), `"server"` (an OpenAI-compatible server at `server_url`, serving the
            model named `server_model`, by default the seed model's name), or a [`GenerationEngine`].
        batch_size: prompts per `generate` call of the in-process engine, or `"auto"`.
        seed: base seed; the `i`-th response sent to the model has seed `seed + i` (in process, a batch is sampled
            with its first row's seed).
        cache_dir: root of the rewrite cache (defaults to `~/.cache/trl_selfdistill/rewrites`).

    Returns:
        `DistillationResult(dataset, report, rows)`; the dataset keeps every row and column, rejected rewrites
        replaced by the reference and skipped responses left as they are; `rows` is the audit trail, one entry per
        response (see `trl_selfdistill.sdft.outputs`). Under several processes each rewrites its share and all get the
        full result.
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
    decoding = dict(spec.decoding)
    state = PartialState()
    position_limit = _position_limit(engine, tokenizer)
    targets, prompts, lengths = _screen(targets, spec, tokenizer, decoding, position_limit)
    kept = [target for target in targets if target.skip is None]
    if state.is_main_process:
        _warn_skipped(targets)

    generator = engine.identity()
    key = fingerprint(generator, prompts, decoding, seed)
    cache = RowCache(os.path.join(cache_dir or default_cache_dir(), "rewrites", key), f"rank{state.process_index}")
    if state.is_main_process:
        cache.write_metadata({"generator": generator, "template": spec.template, "decoding": decoding})
    rewrites, generated = _generate_missing(prompts, lengths, kept, cache, engine, decoding, seed, show_progress)

    responses, reasons, audit = {}, Counter(), []
    for target in targets:
        record = rewrites.get(_unit_key(target))
        reason, truncated = target.skip, False
        if record is not None:
            truncated = _was_cut(record)
            reason = "truncated" if truncated and not spec.keep_truncated else None
            reason = reason or _judge(record["rewrite"], target, dataset, spec, cache)
            reasons[reason] += 1
            if reason is None:
                responses[(target.row, target.turn)] = record["rewrite"]
        audit.append({
            "row": target.row, "turn": target.turn, "rewrite": record["rewrite"] if record else None,
            "accepted": record is not None and reason is None, "reason": reason, "truncated": truncated,
        })  # fmt: skip
    skipped = Counter(target.skip for target in targets if target.skip)
    gap = {}
    if isinstance(engine, TransformersEngine):  # a server gives no likelihoods
        gap = _distribution_gap(engine, tokenizer, kept, responses, position_limit)
    report = {
        "rows": len(dataset),
        "total": len(targets),
        "accepted": reasons[None],
        "fallback": len(kept) - reasons[None],
        "skipped": len(targets) - len(kept),
        **{f"rejected_{rule}": count for rule, count in sorted(reasons.items(), key=str) if rule},
        **{f"skipped_{reason}": skipped[reason] for reason in SKIP_REASONS if skipped[reason]},
        "generated": generated,
        "from_cache": len(kept) - generated,
        **gap,
        "template": spec.template.name,
        "template_mode": spec.template_mode,
        "checker": spec.checker_name,
        "generation_kwargs": decoding,
        "engine": generator.get("engine", "transformers"),
        "cache_dir": str(cache.directory),
    }
    return DistillationResult(apply_rewrites(dataset, responses), report, audit)


def _distribution_gap(
    engine: TransformersEngine,
    tokenizer: PreTrainedTokenizerBase,
    kept: list[RewriteTarget],
    responses: dict[tuple[int, int], str],
    max_positions: int | None,
) -> dict[str, float]:
    """The seed model's mean NLL per response token, before and after the rewrite (see `gap.py`); rows are shared."""
    state = PartialState()
    share = kept[state.process_index :: state.num_processes]
    accepted = [t for t in share if (t.row, t.turn) in responses]
    pairs = [(t.instruction, t.reference) for t in share]
    pairs += [(t.instruction, responses[(t.row, t.turn)]) for t in accepted]
    scores = response_nll(engine, tokenizer, pairs, max_positions)
    before = dict(zip(share, scores[: len(share)], strict=True))
    after = {**before, **dict(zip(accepted, scores[len(share) :], strict=True))}
    local = [sum(score[k] for score in part.values()) for part in (before, after) for k in (0, 1)]
    nll_before, tokens_before, nll_after, tokens_after = map(sum, zip(*gather_object([local]), strict=True))
    if not tokens_before:
        return {}
    return {
        "seed_nll_reference": round(nll_before / tokens_before, 4),
        "seed_nll_distilled": round(nll_after / tokens_after, 4),
    }


def _judge(rewrite: str, target: RewriteTarget, dataset: Dataset, spec: DistillSpec, cache: RowCache) -> str | None:
    """`rejection_reason`, with a checker that raises named with the row and the rewrite it failed on."""
    try:
        return rejection_reason(rewrite, target.reference, dataset[target.row], spec.checker)
    except Exception as error:
        turn = "" if target.turn < 0 else f", turn {target.turn}"
        raise RuntimeError(
            f"The checker {spec.checker_name!r} raised {type(error).__name__} on row {target.row}{turn}, rewrite "
            f"{rewrite[:200]!r}: {error}. Every rewrite is kept in the cache {cache.directory}: fix the checker and "
            "rerun, nothing is generated again."
        ) from error


def _screen(
    targets: list[RewriteTarget],
    spec: DistillSpec,
    tokenizer: PreTrainedTokenizerBase,
    decoding: Mapping[str, Any],
    position_limit: int | None,
) -> tuple[list[RewriteTarget], list[str], list[int]]:
    """Marks the targets the seed model must not see; returns them all, and the prompts and lengths of the others.

    - `special_tokens`: the instruction or reference holds a special-token string (`<|im_end|>`, `</s>`, ...). In the
      prompt it would become the real token and end a turn early, so the seed model would answer something else.
    - `too_long`: the prompt and `max_new_tokens` do not fit in the model's positions.
    """
    specials = sorted({*tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values()
                                                          if t.special)} - {""}, key=len)  # fmt: skip
    targets = [
        replace(t, skip="special_tokens") if t.skip is None and _holds_any(specials, t.instruction, t.reference) else t
        for t in targets
    ]
    rendered = {i: spec.render(t.instruction, t.reference, tokenizer) for i, t in enumerate(targets) if t.skip is None}
    token_ids = tokenizer(list(rendered.values()), add_special_tokens=False)["input_ids"]
    token_counts = {i: len(ids) for i, ids in zip(rendered, token_ids, strict=True)}
    max_new_tokens = int(decoding.get("max_new_tokens") or 0)
    if position_limit is not None:
        fits = {i for i, count in token_counts.items() if count + max_new_tokens <= position_limit}
        if token_counts and not fits:
            raise ValueError(
                f"No rewrite prompt fits in the model's {position_limit} positions with max_new_tokens="
                f"{max_new_tokens} (the shortest prompt has {min(token_counts.values())} tokens). Lower "
                "`max_new_tokens` in `distill_generation_kwargs`."
            )
        targets = [replace(t, skip="too_long") if i in token_counts and i not in fits else t
                   for i, t in enumerate(targets)]  # fmt: skip
    keep = [i for i, t in enumerate(targets) if t.skip is None]
    return targets, [rendered[i] for i in keep], [token_counts[i] for i in keep]


def _holds_any(needles: list[str], *texts: str) -> bool:
    return any(needle in text for text in texts for needle in needles)


def _position_limit(engine: GenerationEngine, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """How many positions the seed model has: from its config in process, else from the tokenizer if it says."""
    config = getattr(getattr(engine, "model", None), "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text_config, "max_position_embeddings", None):
            return int(text_config.max_position_embeddings)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**8 else None  # transformers writes a huge number for "unknown"


def _was_cut(record: Mapping[str, Any]) -> bool:
    """The rewrite stopped at `max_new_tokens`, not at an end token (caches older than the flag: a cut character)."""
    if "truncated" in record:
        return bool(record["truncated"])
    return record["rewrite"].endswith("\ufffd")


def _warn_skipped(targets: list[RewriteTarget]) -> None:
    skipped = [t for t in targets if t.skip]
    if not skipped:
        return
    by_reason = Counter(t.skip for t in skipped)
    first = {reason: next(t for t in skipped if t.skip == reason) for reason in by_reason}
    details = "; ".join(
        f"{count} {reason} (first: row {first[reason].row}"
        f"{'' if first[reason].turn < 0 else f', turn {first[reason].turn}'})"
        for reason, count in by_reason.items()
    )
    logger.warning(
        f"SDFT keeps {len(skipped)} of {len(targets)} responses as they are, without a rewrite: {details}. "
        "The README's 'Responses kept as they are' says why; the report counts them as `skipped_<reason>`."
    )


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
) -> tuple[dict[str, dict], int]:
    """Generates what the cache lacks for this process's share; returns every cache record and how many were new.

    "New" counts only rows generated here: rows another run sharing the cache generated meanwhile come from the cache.
    """
    state = PartialState()
    # Longest first, dealt round-robin in whole batches: every process gets a similar mix of lengths, and with a fixed
    # batch size the batches (so the samples) are those one process would make.
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    deal = engine.batch_size if isinstance(getattr(engine, "batch_size", None), int) else 1
    chunks = [order[start : start + deal] for start in range(0, len(order), deal)]
    mine = [i for chunk in chunks[state.process_index :: state.num_processes] for i in chunk]
    keys = {i: _unit_key(targets[i]) for i in mine}
    keys_of_mine = set(keys.values())
    cache.load()
    done = {key for key in keys.values() if key in cache.rows}  # rows of this share on disk, counted by the bar

    # Other runs may share the cache (jobs on one filesystem): work goes block by block, one block being one batch of
    # the engine. Before each, the cache is read again (only what was appended) and the block's missing rows are
    # claimed, so no row is generated twice; a block goes whole to the run that claims its first row, so its batch
    # (its samples) is the one a single run makes.
    planned = getattr(engine, "planned_batch_size", None)
    if callable(planned) and mine:
        block_size = planned(max(lengths[i] for i in mine), decoding, len(mine))
    else:
        block_size = getattr(engine, "concurrency", None) or (deal if deal > 1 else claim_files.DEFAULT_CLAIM_BLOCK)
    blocks = [mine[start : start + block_size] for start in range(0, len(mine), block_size)]
    claims = claim_files.RowClaims(cache.directory / "claims", token=cache.run)  # writes nothing until it claims
    generated = 0
    progress = tqdm(
        total=len(mine),
        initial=len(done),
        desc="SDFT rewrite",
        unit="response",
        disable=not show_progress or not state.is_local_main_process,
    )

    def count_done(new_keys) -> None:
        new = {key for key in new_keys if key in keys_of_mine} - done
        done.update(new)
        progress.update(len(new))

    def work_on(rows: list[int]) -> tuple[list[int], dict | None]:
        """Generates the rows no one has done or claimed; returns those another run holds, and that run."""
        nonlocal generated
        count_done(cache.refresh())
        todo = [i for i in rows if keys[i] not in cache.rows]
        if not todo:
            return [], None
        claimed, holder = claims.claim([keys[i] for i in todo])
        if claimed:
            count_done(cache.refresh())  # finished and released by another run between the read and the claim
            claims.release([key for key in claimed if key in cache.rows])
        ours = [i for i in todo[: len(claimed)] if keys[i] not in cache.rows]
        # Each group of finished rows (a batch in process, whatever completed on a server) is on disk before the next,
        # and its claims are released only then: at any moment a row is on disk or claimed.
        for group in engine.generate([prompts[i] for i in ours], decoding, [seed + i for i in ours]):
            records = [{"key": keys[ours[c.index]], "rewrite": c.text, "truncated": c.truncated} for c in group]
            cache.append(records)
            claims.release([record["key"] for record in records])
            generated += len(records)
            count_done(record["key"] for record in records)
        return todo[len(claimed) :], holder

    try:
        waiting = [(rest, holder) for rest, holder in map(work_on, blocks) if rest]
        # Then the rows other runs were generating: on disk once they finish, or taken over if their run dies.
        announced = None
        while waiting:
            owners = sorted({claim_files.describe_owner(holder) for _, holder in waiting})
            count = sum(len(rest) for rest, _ in waiting)
            progress.set_postfix_str(f"waiting for {count} row(s) generated by {', '.join(owners)}", refresh=True)
            if owners != announced:
                logger.warning(
                    f"Waiting for {count} row(s) of this run's share that another run on the same cache is generating"
                    f" ({', '.join(owners)}); they are taken over if it dies."
                )
                announced = owners
            time.sleep(claim_files.WAIT_POLL_SECONDS)
            waiting = [(rest, holder) for rest, holder in (work_on(rows) for rows, _ in waiting) if rest]
    finally:
        claims.close()  # gives up what an error left unfinished, so another run need not wait for it
        progress.close()

    local = {key: cache.rows[key] for key in keys.values()}
    rewrites = {}
    for part in gather_object([local]):
        rewrites.update(part)
    generated = sum(gather_object([generated]))
    return rewrites, generated
