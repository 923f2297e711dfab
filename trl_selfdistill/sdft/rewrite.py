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
from collections.abc import Iterable, Iterator, Mapping
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
from ..generation import Prompt, RewriteEngine, ScoringEngine, ServerEngine, TransformersEngine
from ..generation.base import special_token_texts
from ..models import resolve_model_name
from ..paths import default_cache_dir
from .checkers import rejection_reason
from .gap import instruction_prompt, response_nll
from .spec import CANDIDATES, DistillSpec
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
    engine: str | RewriteEngine,
    model: PreTrainedModel | str | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int | str | None = None,
    compile: bool = False,
    server_url: str | None = None,
    server_model: str | None = None,
    server_options: Mapping[str, Any] | None = None,
) -> RewriteEngine:
    """An engine by name (`"transformers"` or `"server"`), or `engine` itself if it is one already.

    `batch_size` (default `"auto"`) and `compile` are [`TransformersEngine`] settings. `server_model` overrides the
    model id expected on the server (a deployment under another name); `server_options` are [`ServerEngine`] settings
    (`concurrency`, `timeout`, `max_retries`, `backoff`). With the in-process engine, a model name is loaded here.
    """
    if not isinstance(engine, str):
        if batch_size is not None:
            raise ValueError(
                "`batch_size` sets the in-process engine built from a name; the engine passed in has its own. Give "
                "the batch size to the engine (`TransformersEngine(model, tokenizer, batch_size=...)`) instead."
            )
        if not isinstance(engine, RewriteEngine):
            raise TypeError(
                f"{type(engine).__name__} is not a `RewriteEngine`: the rewrite needs `generate_blocks`, "
                "`block_size`, `check`, `deal_size` and `position_limit` (see `trl_selfdistill.generation.base`)."
            )
        return engine
    if engine == "server":
        if not server_url:
            raise ValueError("`sdft_engine='server'` needs `sdft_server_url`, e.g. 'http://localhost:8000'.")
        if model is None and not server_model:
            raise ValueError("The server engine needs the seed model's name: pass `model` (a name) or `server_model`.")
        return ServerEngine(server_url, server_model or model_name(model), tokenizer, **(server_options or {}))
    if engine == "transformers":
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(resolve_model_name(model), dtype="auto")
        return TransformersEngine(model, tokenizer, batch_size or "auto", compile=compile)
    raise ValueError(f"Unknown `sdft_engine` {engine!r}: use one of {list(ENGINES)}.")


def engine_from_config(args: SDFTConfig, model: PreTrainedModel | str, tokenizer) -> RewriteEngine:
    """The engine an [`SDFTConfig`] asks for: in process with `model`, or on the server."""
    if args.sdft_engine == "server":
        return build_engine(
            "server", model, tokenizer, server_url=args.sdft_server_url, server_model=args.sdft_server_model,
            server_options=args.server_options,
        )  # fmt: skip
    # `sdft_batch_size=None` is the in-process engine's "auto": sized from free memory.
    batch_size = "auto" if args.sdft_batch_size is None else args.sdft_batch_size
    return build_engine(args.sdft_engine, model, tokenizer, batch_size=batch_size, compile=args.sdft_compile)


def distill_dataset(
    model: PreTrainedModel | str | None,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    spec: DistillSpec | None = None,
    *,
    engine: str | RewriteEngine = "transformers",
    batch_size: int | str | None = None,
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
            `generation_kwargs`, `keep_truncated`, `candidates`, `selection` as keyword arguments (see
            [`SDFTConfig`]'s `sdft_*` fields).
        engine: `"transformers"` (in process), `"server"` (an OpenAI-compatible server at `server_url`, serving the
            model named `server_model`, by default the seed model's name), or a [`RewriteEngine`].
        batch_size: prompts per `generate` call of the in-process engine built here, or `"auto"` (the default);
            refused with an engine passed in, which has its own.
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
    _check_process_group()
    check_renderable(tokenizer, spec.template_mode)
    targets = collect_targets(dataset)
    engine = build_engine(
        engine, model, tokenizer, batch_size=batch_size, server_url=server_url, server_model=server_model
    )
    return distill_with_engine(
        engine, tokenizer, dataset, targets, spec, seed=seed, cache_dir=cache_dir, show_progress=show_progress
    )


def _check_process_group() -> None:
    """A launcher that started several processes, which accelerate's state does not join (on CPUs it joins them only
    when told `cpu=True`), would have each process take itself for the only one: all would rewrite everything into
    the same cache file. Refused, naming the fix."""
    launched, joined = int(os.environ.get("WORLD_SIZE", "1")), PartialState().num_processes
    if launched > joined:
        raise RuntimeError(
            f"This is one of {launched} launched processes (WORLD_SIZE), but accelerate's state holds "
            f"{joined}: the processes are not joined, and each would rewrite everything. On "
            "CPUs, call `accelerate.PartialState(cpu=True)` before `distill_dataset` (a trainer's `use_cpu=True` "
            "does this), or launch one process."
        )


def distill_with_engine(
    engine: RewriteEngine,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    targets: list[RewriteTarget],
    spec: DistillSpec,
    *,
    seed: int,
    cache_dir: str | os.PathLike | None,
    show_progress: bool,
) -> DistillationResult:
    """[`distill_dataset`] once everything is resolved: the engine built, the dataset's responses collected
    (`collect_targets`), the spec checked. The trainers call this with what they resolved before loading.

    Each response gets the candidates `spec.candidates` asks for (each kind generated into its own cache), each judged
    by the checker; `spec.selection` picks the training target among those that pass and the reference.
    """
    engine.check(spec.decoding)  # once per engine and decoding: a server checked before loading is not asked again
    scored = check_scoring(spec, engine)  # asked once too
    decoding = dict(spec.decoding)
    state = PartialState()
    position_limit = engine.position_limit or _tokenizer_limit(tokenizer)
    targets, prompts, lengths = _screen(targets, spec, tokenizer, decoding, position_limit)
    kept = [target for target in targets if target.skip is None]
    if state.is_main_process:
        _warn_skipped(targets)

    generator = engine.identity()
    records, caches, generated = {}, {}, 0
    for candidate, kind in _candidate_kinds(spec):
        # each further rewrite sample draws from seeds of its own, so it is another rewrite with its own cache
        sample_seed = seed + _sample_number(candidate) * SAMPLE_SEED_STRIDE
        records[candidate], count, caches[candidate] = _generate_candidates(
            kind, prompts[kind], lengths[kind], kept, engine, generator, spec, decoding, sample_seed, cache_dir,
            show_progress, _candidate_label(candidate, spec),
        )  # fmt: skip
        generated += count

    judged = {  # per response, each generated candidate in selection order, judged
        (t.row, t.turn): [
            _candidate(candidate, kind, records[candidate][_unit_key(t)], t, dataset, spec, caches[candidate])
            for candidate, kind in _candidate_kinds(spec)
        ]
        for t in kept
    }
    chosen, nll = {}, {}
    if spec.selection == "first":
        chosen = {unit: _first_passing(candidates) for unit, candidates in judged.items()}
        if scored:  # the references, and the targets that replace them
            nll = _seed_nll(engine, tokenizer, kept, judged, lambda c, unit: c["id"] == chosen[unit], position_limit)
    else:  # lowest_nll: every passing candidate scored, the least surprising trained on
        nll = _seed_nll(engine, tokenizer, kept, judged, lambda c, unit: c["reason"] is None, position_limit)
        chosen = {unit: _least_surprising(unit, candidates, nll) for unit, candidates in judged.items()}

    responses, reasons, audit = {}, Counter(), []
    for target in targets:
        unit = (target.row, target.turn)
        candidates = judged.get(unit, [])
        reason = target.skip if target.skip else _row_reason(candidates, chosen[unit])
        if target.skip is None:
            reasons[reason] += 1
            if chosen[unit] != "reference":
                responses[unit] = next(c["text"] for c in candidates if c["id"] == chosen[unit])
        # the rewrite trained on, or the first one
        rewrite = next((c for c in candidates if c["id"] == chosen.get(unit) and c["kind"] == "rewrite"), None)
        rewrite = rewrite or next((c for c in candidates if c["kind"] == "rewrite"), None)
        entry = {
            "row": target.row, "turn": target.turn, "rewrite": rewrite["text"] if rewrite else None,
            "accepted": target.skip is None and reason is None, "reason": reason,
            "truncated": rewrite["truncated"] if rewrite else False,
        }  # fmt: skip
        if not spec.is_default:
            entry["candidates"] = _audit_candidates(target, candidates, nll)
            entry["target"] = _kind_of(chosen[unit]) if unit in chosen else None
            if spec.rewrite_samples > 1 and unit in chosen and _kind_of(chosen[unit]) == "rewrite":
                entry["target_sample"] = _sample_number(chosen[unit]) + 1
        audit.append(entry)
    skipped = Counter(target.skip for target in targets if target.skip)
    gap = _distribution_gap(kept, chosen, nll) if scored else {}
    sources = Counter(_kind_of(candidate) for candidate in chosen.values())
    options = {}
    if not spec.is_default:
        options = {"candidates": list(spec.candidates), "selection": spec.selection}
    if spec.rewrite_samples > 1:
        options["rewrite_samples"] = spec.rewrite_samples
    report = {
        "rows": len(dataset),
        "total": len(targets),
        "accepted": reasons[None],
        "fallback": len(kept) - reasons[None],
        **({} if spec.is_default else {f"target_{kind}": sources[kind] for kind in CANDIDATES}),
        "skipped": len(targets) - len(kept),
        **{f"rejected_{rule}": count for rule, count in sorted(reasons.items(), key=str) if rule},
        **{f"skipped_{reason}": skipped[reason] for reason in SKIP_REASONS if skipped[reason]},
        "generated": generated,
        "from_cache": len(kept) * len(spec.candidate_ids) - generated,
        **gap,
        "template": spec.template.name,
        "template_mode": spec.template_mode,
        "checker": spec.checker_name,
        **options,
        "generation_kwargs": decoding,
        "engine": generator.get("engine", "transformers"),
        "cache_dir": str((caches.get("rewrite") or caches["own_answer"]).directory),
    }
    if "own_answer" in caches:
        report["own_answer_cache_dir"] = str(caches["own_answer"].directory)
    return DistillationResult(apply_rewrites(dataset, responses), report, audit)


def check_scoring(spec: DistillSpec, engine: RewriteEngine) -> bool:
    """Whether `engine` gives the seed model's likelihoods in every process. `lowest_nll` ranks the candidates by them:
    refused, before any generation, with an engine that cannot (a server that returns no prompt log-probabilities)."""
    reason = _scoring_unavailable(engine)
    if reason is not None and spec.selection == "lowest_nll":
        raise ValueError(
            f"`selection='lowest_nll'` ranks the candidates by the seed model's likelihoods, which this engine cannot "
            f"give: {reason} Use a server that returns prompt log-probabilities (vLLM does, with `echo` and "
            "`logprobs`), the in-process engine (`sdft_engine='transformers'`), or `selection='first'`."
        )
    return reason is None


def _scoring_unavailable(engine: RewriteEngine) -> str | None:
    """Why `engine` cannot score, in any process (None if it can in all): every process takes the same path, so that
    none waits alone in the scores' gathering because its own probe of a server failed."""
    if isinstance(engine, ScoringEngine):
        reason = engine.scoring_unavailable()
    else:
        reason = f"{type(engine).__name__} has no `score` (see `trl_selfdistill.generation.ScoringEngine`)"
    return next((reason for reason in gather_object([reason]) if reason is not None), None)


def _generate_candidates(
    kind: str,
    prompts: list[str],
    lengths: list[int],
    kept: list[RewriteTarget],
    engine: RewriteEngine,
    generator: dict[str, Any],
    spec: DistillSpec,
    decoding: dict[str, Any],
    seed: int,
    cache_dir: str | os.PathLike | None,
    show_progress: bool,
    label: str,
) -> tuple[dict[str, dict], int, RowCache]:
    """One kind of candidate for every kept response, generated into its cache: every record, how many were new, and
    the cache. The rewrite's cache key is the one SDFT always had; another kind adds its name, so two kinds never share
    a cache even if their prompts were the same. Greedy decoding leaves the seed out of the key: it writes the same
    text whatever the seed, so runs with other seeds (a benchmark's training seeds) share one generation."""
    state = PartialState()
    seeded = (seed,) if decoding.get("do_sample") else ()
    key_parts = (generator, prompts, decoding, *seeded) + (() if kind == "rewrite" else (kind,))
    key = fingerprint(*key_parts)
    cache = RowCache(os.path.join(cache_dir or default_cache_dir(), "rewrites", key), f"rank{state.process_index}")
    if state.is_main_process:
        if kind == "rewrite":
            cache.write_metadata({"generator": generator, "template": spec.template, "decoding": decoding})
        else:
            cache.write_metadata({"generator": generator, "kind": kind, "decoding": decoding})
    records, generated = _generate_missing(prompts, lengths, kept, cache, engine, decoding, seed, show_progress, label)
    return records, generated, cache


SAMPLE_SEED_STRIDE = 1_000_003
"""Rewrite sample `k` seeds its rows from `seed + (k - 1) * SAMPLE_SEED_STRIDE`: no two samples share a seed."""


def _candidate_kinds(spec: DistillSpec) -> list[tuple[str, str]]:
    """`(candidate id, kind)` of every generated candidate, in selection order (see `DistillSpec.candidate_ids`)."""
    return [(candidate, _kind_of(candidate)) for candidate in spec.candidate_ids]


def _kind_of(candidate: str) -> str:
    """`rewrite_3` -> `rewrite`: the kind a candidate id belongs to (`reference` for the reference)."""
    return candidate.rsplit("_", 1)[0] if candidate.rsplit("_", 1)[-1].isdigit() else candidate


def _sample_number(candidate: str) -> int:
    """0 for a kind's first candidate, `k - 1` for `<kind>_<k>`."""
    last = candidate.rsplit("_", 1)[-1]
    return int(last) - 1 if last.isdigit() else 0


def _candidate_label(candidate: str, spec: DistillSpec) -> str:
    """The progress bar's name for a candidate's generation."""
    label = {"rewrite": "SDFT rewrite", "own_answer": "SDFT own answer"}[_kind_of(candidate)]
    if _kind_of(candidate) == "rewrite" and spec.rewrite_samples > 1:
        label += f" {_sample_number(candidate) + 1}/{spec.rewrite_samples}"
    return label


def _candidate(
    candidate: str,
    kind: str,
    record: Mapping[str, Any],
    target: RewriteTarget,
    dataset: Dataset,
    spec: DistillSpec,
    cache: RowCache,
) -> dict[str, Any]:
    """A generated candidate judged: cut at `max_new_tokens` (unless kept), then the acceptance rules."""
    truncated = record["truncated"]
    reason = "truncated" if truncated and not spec.keep_truncated else None
    reason = reason or _judge(record["rewrite"], target, dataset, spec, cache, kind)
    return {"id": candidate, "kind": kind, "text": record["rewrite"], "truncated": truncated, "reason": reason}


def _first_passing(candidates: list[dict[str, Any]]) -> str:
    return next((c["id"] for c in candidates if c["reason"] is None), "reference")


def _per_token(score: tuple[float, int]) -> float:
    return score[0] / max(score[1], 1)


def _least_surprising(unit: tuple[int, int], candidates: list[dict[str, Any]], nll: dict) -> str:
    """The passing candidate (the reference always passes) with the lowest NLL per token; ties go to the earlier."""
    passing = [c["id"] for c in candidates if c["reason"] is None] + ["reference"]
    return min(passing, key=lambda candidate: _per_token(nll[(*unit, candidate)]))


def _row_reason(candidates: list[dict[str, Any]], chosen: str) -> str | None:
    """None when a generated candidate is trained on; else why the reference is: a passing candidate was more
    surprising to the seed model (`higher_nll`), or the last candidate's rejection (the rewrite's, by default)."""
    if chosen != "reference":
        return None
    if any(c["reason"] is None for c in candidates):
        return "higher_nll"
    return candidates[-1]["reason"]


def _audit_candidates(target: RewriteTarget, candidates: list[dict[str, Any]], nll: dict) -> list[dict[str, Any]]:
    if target.skip:
        return []
    unit = (target.row, target.turn)
    reference = {"id": "reference", "kind": "reference", "text": target.reference, "truncated": False, "reason": None}
    return [
        {
            "kind": c["kind"],
            **({"sample": _sample_number(c["id"]) + 1} if c["id"] != c["kind"] else {}),
            "text": c["text"],
            "accepted": c["reason"] is None,
            "reason": c["reason"],
            "truncated": c["truncated"],
            "seed_nll": round(_per_token(nll[(*unit, c["id"])]), 4) if (*unit, c["id"]) in nll else None,
        }  # fmt: skip
        for c in [*candidates, reference]
    ]


def _seed_nll(
    engine: ScoringEngine,
    tokenizer: PreTrainedTokenizerBase,
    kept: list[RewriteTarget],
    judged: dict[tuple[int, int], list[dict[str, Any]]],
    wanted,
    max_positions: int | None,
) -> dict[tuple[int, int, str], tuple[float, int]]:
    """The seed model's summed NLL and token count (see `gap.py`) of every kept reference, and of the candidates
    `wanted(candidate, (row, turn))` picks, keyed `(row, turn, kind)`; rows are shared among processes, all get all."""
    state = PartialState()
    share = kept[state.process_index :: state.num_processes]
    keys = [(t.row, t.turn, "reference") for t in share]
    pairs = [(t.instruction, t.reference) for t in share]
    for t in share:
        for candidate in judged[(t.row, t.turn)]:
            if wanted(candidate, (t.row, t.turn)):
                keys.append((t.row, t.turn, candidate["id"]))
                pairs.append((t.instruction, candidate["text"]))
    local = dict(zip(keys, response_nll(engine, tokenizer, pairs, max_positions), strict=True))
    scores = {}
    for part in gather_object([local]):
        scores.update(part)
    return scores


def _distribution_gap(
    kept: list[RewriteTarget], chosen: dict[tuple[int, int], str], nll: dict[tuple[int, int, str], tuple[float, int]]
) -> dict[str, float]:
    """The seed model's mean NLL per response token of the references and of the targets trained on (see `gap.py`)."""
    before = [nll[(t.row, t.turn, "reference")] for t in kept]
    after = [nll[(t.row, t.turn, chosen[(t.row, t.turn)])] for t in kept]
    tokens_before = sum(score[1] for score in before)
    if not tokens_before:
        return {}
    return {
        "seed_nll_reference": round(sum(score[0] for score in before) / tokens_before, 4),
        "seed_nll_distilled": round(sum(score[0] for score in after) / sum(score[1] for score in after), 4),
    }


def _judge(
    rewrite: str, target: RewriteTarget, dataset: Dataset, spec: DistillSpec, cache: RowCache, kind: str = "rewrite"
) -> str | None:
    """`rejection_reason`, with a checker that raises named with the row and the candidate it failed on."""
    name = kind.replace("_", " ")
    try:
        return rejection_reason(rewrite, target.reference, dataset[target.row], spec.checker)
    except Exception as error:
        turn = "" if target.turn < 0 else f", turn {target.turn}"
        raise RuntimeError(
            f"The checker {spec.checker_name!r} raised {type(error).__name__} on row {target.row}{turn}, "
            f"{name} {rewrite[:200]!r}: {error}. Every {name} is kept in the cache {cache.directory}: fix the "
            "checker and rerun, nothing is generated again."
        ) from error


def _screen(
    targets: list[RewriteTarget],
    spec: DistillSpec,
    tokenizer: PreTrainedTokenizerBase,
    decoding: Mapping[str, Any],
    position_limit: int | None,
) -> tuple[list[RewriteTarget], dict[str, list[str]], dict[str, list[int]]]:
    """Marks the targets the seed model must not see; returns them all, and the prompts and their lengths in tokens of
    the others, per kind of candidate generated (`spec.candidates`).

    - `special_tokens`: the instruction or reference holds a special-token string (`<|im_end|>`, `</s>`, ...). In the
      prompt it would become the real token and end a turn early, so the seed model would answer something else.
    - `too_long`: the prompt (the longest of its kinds) and `max_new_tokens` do not fit in the model's positions.
    """
    specials = special_token_texts(tokenizer)
    targets = [
        replace(t, skip="special_tokens") if t.skip is None and _holds_any(specials, t.instruction, t.reference) else t
        for t in targets
    ]
    render = {
        "rewrite": lambda t: spec.render(t.instruction, t.reference, tokenizer),
        "own_answer": lambda t: instruction_prompt(tokenizer, t.instruction),  # the instruction alone
    }
    open_ = [i for i, t in enumerate(targets) if t.skip is None]
    rendered = {kind: [render[kind](targets[i]) for i in open_] for kind in spec.candidates}
    counts = {
        kind: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for kind, texts in rendered.items()
    }
    token_counts = {i: max(counts[kind][j] for kind in counts) for j, i in enumerate(open_)}
    max_new_tokens = int(decoding.get("max_new_tokens") or 0)
    if position_limit is not None:
        fits = {i for i, count in token_counts.items() if count + max_new_tokens <= position_limit}
        if token_counts and not fits:
            raise ValueError(
                f"No rewrite prompt fits in the model's {position_limit} positions with max_new_tokens="
                f"{max_new_tokens} (the shortest prompt has {min(token_counts.values())} tokens). Lower "
                "`max_new_tokens` in `sdft_generation_kwargs`."
            )
        targets = [replace(t, skip="too_long") if i in token_counts and i not in fits else t
                   for i, t in enumerate(targets)]  # fmt: skip
    keep = [j for j, i in enumerate(open_) if targets[i].skip is None]
    prompts = {kind: [texts[j] for j in keep] for kind, texts in rendered.items()}
    lengths = {kind: [counts[kind][j] for j in keep] for kind in rendered}
    return targets, prompts, lengths


def _holds_any(needles: list[str], *texts: str) -> bool:
    return any(needle in text for text in texts for needle in needles)


def _tokenizer_limit(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The positions the tokenizer says the model has, for engines that do not know (a server that does not say)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**8 else None  # transformers writes a huge number for "unknown"


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
    engine: RewriteEngine,
    decoding: dict[str, Any],
    seed: int,
    show_progress: bool,
    label: str = "SDFT rewrite",
) -> tuple[dict[str, dict], int]:
    """Generates what the cache lacks for this process's share; returns every cache record and how many were new.

    "New" counts only rows generated here: rows another run sharing the cache generated meanwhile come from the cache.
    """
    state = PartialState()
    mine = _share_of_this_process(lengths, engine.deal_size)
    block_size = engine.block_size(max(lengths[i] for i in mine), decoding, len(mine)) if mine else 1
    blocks = [mine[start : start + block_size] for start in range(0, len(mine), block_size)]
    keys = {i: _unit_key(targets[i]) for i in mine}
    cache.load()
    progress = tqdm(
        total=len(mine),
        initial=sum(key in cache.rows for key in keys.values()),
        desc=label,
        unit="response",
        disable=not show_progress or not state.is_local_main_process,
    )
    share = _ShareRewriter(prompts, keys, cache, engine, decoding, seed, progress)
    try:
        _wait_for_other_runs(share, share.generate(blocks), progress)
    finally:
        share.claims.close()  # gives up what an error left unfinished, so another run need not wait for it
        progress.close()
    return _gather_share(cache, keys.values(), share.generated)


def _share_of_this_process(lengths: list[int], deal_size: int) -> list[int]:
    """This process's rows: longest first, dealt round-robin `deal_size` at a time.

    Every process gets a similar mix of lengths, and with a fixed batch size the batches (so the samples) are those
    one process would make.
    """
    state = PartialState()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    deals = [order[start : start + deal_size] for start in range(0, len(order), deal_size)]
    return [i for deal in deals[state.process_index :: state.num_processes] for i in deal]


class _ShareRewriter:
    """Generates a share's missing rows into the cache, each block claimed just before the engine takes it.

    Other runs may share the cache (jobs on one filesystem). Before each block is handed over, the cache is read again
    (only what was appended) and the block's missing rows are claimed, so no row is generated twice; a block goes
    whole to the run that claims its first row, so its batch (its samples) is the one a single run makes. Each group
    of finished rows is on disk before the next, and its claims are released only then: at any moment a row is on
    disk or claimed.
    """

    def __init__(self, prompts, keys, cache, engine, decoding, seed, progress):
        self.prompts, self.keys, self.cache = prompts, keys, cache
        self.engine, self.decoding, self.seed, self.progress = engine, decoding, seed, progress
        self.claims = claim_files.RowClaims(cache.directory / "claims", token=cache.run)  # writes nothing until used
        self.generated = 0
        self._mine = set(keys.values())
        self._done = {key for key in self._mine if key in cache.rows}

    def generate(self, blocks: list[list[int]]) -> list[tuple[list[int], dict | None]]:
        """Generates the blocks' rows no one has done or claimed; returns the rows other runs hold, with their run."""
        held_elsewhere = []
        for group in self.engine.generate_blocks(self._claimed(blocks, held_elsewhere), self.decoding):
            records = [{"key": self.keys[c.index], "rewrite": c.text, "truncated": c.truncated} for c in group]
            self.cache.append(records)
            self.claims.release([record["key"] for record in records])
            self.generated += len(records)
            self._count_done(record["key"] for record in records)
        return held_elsewhere

    def _claimed(self, blocks: list[list[int]], held_elsewhere: list) -> Iterator[list[Prompt]]:
        """The blocks' rows this run claims, block by block as the engine asks; the others go to `held_elsewhere`."""
        for rows in blocks:
            self._count_done(self.cache.refresh())
            todo = [i for i in rows if self.keys[i] not in self.cache.rows]
            if not todo:
                continue
            claimed, holder = self.claims.claim([self.keys[i] for i in todo])
            if claimed:
                self._count_done(self.cache.refresh())  # finished and released by another run meanwhile
                self.claims.release([key for key in claimed if key in self.cache.rows])
            if len(claimed) < len(todo):
                held_elsewhere.append((todo[len(claimed) :], holder))
            ours = [i for i in todo[: len(claimed)] if self.keys[i] not in self.cache.rows]
            if ours:
                yield [Prompt(i, self.prompts[i], self.seed + i) for i in ours]

    def _count_done(self, new_keys: Iterable[str]) -> None:
        new = {key for key in new_keys if key in self._mine} - self._done
        self._done.update(new)
        self.progress.update(len(new))


def _wait_for_other_runs(share: _ShareRewriter, waiting: list[tuple[list[int], dict | None]], progress) -> None:
    """The rows other runs were generating: on disk once they finish, or taken over if their run dies."""
    announced = None
    while waiting:
        owners = sorted({claim_files.describe_owner(holder) for _, holder in waiting})
        count = sum(len(rows) for rows, _ in waiting)
        progress.set_postfix_str(f"waiting for {count} row(s) generated by {', '.join(owners)}", refresh=True)
        if owners != announced:
            logger.warning(
                f"Waiting for {count} row(s) of this run's share that another run on the same cache is generating"
                f" ({', '.join(owners)}); they are taken over if it dies."
            )
            announced = owners
        time.sleep(claim_files.WAIT_POLL_SECONDS)
        waiting = share.generate([rows for rows, _ in waiting])


def _gather_share(cache: RowCache, keys: Iterable[str], generated: int) -> tuple[dict[str, dict], int]:
    """Every process's rows and the rows generated by all, on every process."""
    local = {key: cache.rows[key] for key in keys}
    rewrites = {}
    for part in gather_object([local]):
        rewrites.update(part)
    return rewrites, sum(gather_object([generated]))
