"""The forgetting benchmark: fine-tune one seed model on one task several ways, then probe every result side by side.

    for each training seed, for each arm (vanilla SFT, SDFT, SDFT own answer first or least     arms.py
    surprising target, DynSDPB dynamic and constant, SDFT data + DynSDPB loss):
        train from the same settings into <output_dir>/<arm>/seed-<seed>
                                (skipped once finished with the same settings; resumed from checkpoints)
    for the seed model and each trained arm:                                                    probes.py
        run every probe    (cached per model and probe in <output_dir>/results, tied to the model's weights digest)
    score the general answers against the seed's (cosine similarity of sentence embeddings)    similarity.py
    aggregate over seeds, compare arms item by item (95 % intervals), write table, JSON, charts stats.py, report.py

This is the experiment of the SDFT paper (Yang et al., ACL 2024, arXiv 2402.13669, Table 1 and its safety table) with
the DynSDPB arms (Fu et al., 2024, arXiv 2411.16991) beside it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import filelock
from accelerate import PartialState
from datasets import Dataset
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.utils import logging
from trl.trainer.utils import create_model_from_path

from ..models import resolve_model_name
from ..sdft_dynsdpb import SDFTDynSDPBConfig
from . import hypotheses
from .arms import ARMS, DEFAULT_ARMS, SEED_MODEL, check_arm_inputs, check_arms, train_arm, weights_digest
from .jsonfiles import read_json, write_json
from .probes import PROBES, ProbeArguments, ResultCache, drift_seed_answers, run_probe
from .report import check_chart_support, write_report
from .similarity import SentenceEmbedder, mean_cosine_similarity

logger = logging.get_logger(__name__)

RESULTS_DIR = "results"
HYPOTHESES_FILE = "hypotheses.md"


def run_forgetting_benchmark(
    model_name: str,
    training_args: SDFTDynSDPBConfig,
    train_dataset: Dataset,
    probe_args: ProbeArguments,
    arms: list[str] | None = None,
    *,
    seeds: list[int] | None = None,
    seeds_per_arm: dict[str, int] | None = None,
    peft_config=None,
    quantization_config=None,
    embedder: SentenceEmbedder | None = None,
    dataset_name: str | None = None,
    native_dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Trains every arm of `arms` (default `DEFAULT_ARMS`) once per seed, probes the seed model and every trained arm,
    and writes the report into `training_args.output_dir`.

    Every arm trains with the same `training_args` (each reads the fields its own config has), the same data and the
    same number of optimizer updates: `max_steps`, or when it is unset the updates vanilla SFT makes in
    `num_train_epochs` (DynSDPB sees half as many new samples per update, since half of each batch repeats the last
    step's). Each of `seeds` (default: `[training_args.seed]`) replaces `seed` for one training run of every arm, so
    arm `a` seed `k` and arm `b` seed `k` start alike. `seeds_per_arm` trains an arm on the first `n` seeds only (a
    costly arm in a larger run); it is then compared with the others on those seeds. Finished arms and probe results
    are reused only when everything that produced them is unchanged, so an interrupted run resumes where it stopped.

    `native_dataset` is what the arms with `Arm.data == "native"` (`sft_native`) train on instead: the same questions
    as `train_dataset`, with the references in the seed model's own style.

    Returns the report (also written as `forgetting_benchmark.json`, with `forgetting_benchmark.md` and the charts).
    """
    started = time.monotonic()
    arms = check_arms(list(DEFAULT_ARMS) if arms is None else arms)
    seeds = check_seeds([training_args.seed] if seeds is None else seeds)
    arm_seeds = seeds_of_arms(arms, seeds, seeds_per_arm or {})
    if PartialState().num_processes > 1:
        raise ValueError(
            "The forgetting benchmark trains and evaluates its arms one after another in one process: run it with "
            "`python` (or `accelerate launch --num_processes 1`), not on several processes."
        )
    check_chart_support()
    if "general" in probe_args.probes and embedder is None:
        embedder = SentenceEmbedder()  # loaded now: a missing embedder fails before hours of training
    model_path = resolve_model_name(model_name)
    datasets = arm_datasets(arms, train_dataset, native_dataset)
    shared = same_updates_for_every_arm(training_args, len(train_dataset))
    for name in arms:
        check_arm_inputs([name], shared, datasets[name])
    with output_dir_lock(training_args.output_dir):  # one run per output_dir at a time
        output_dir = training_args.output_dir
        if hypotheses.applies(arms, probe_args.probes):  # the rules are printed, and on disk, before anything trains
            rules = hypotheses.describe_hypotheses()
            logger.warning(rules)
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, HYPOTHESES_FILE), "w", encoding="utf-8") as handle:
                handle.write(rules + "\n")

        runs = [(name, seed) for seed in seeds for name in arms if seed in arm_seeds[name]]
        records: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in arms}
        for number, (name, seed) in enumerate(runs, start=1):
            logger.warning(
                f"Forgetting benchmark: training {number}/{len(runs)}, {ARMS[name].label} ({name}), seed {seed}."
            )
            records[name][seed] = train_arm(
                ARMS[name],
                model_path,
                with_seed(shared, seed),
                datasets[name],
                arm_dir(output_dir, name, seed),
                peft_config=peft_config,
                quantization_config=quantization_config,
            )

        results = probe_every_model(
            model_path,
            shared,
            runs,
            probe_args,
            ResultCache(os.path.join(output_dir, RESULTS_DIR)),
            quantization_config,
        )
        similarities = similarity_to_seed(results, embedder) if "general" in probe_args.probes else {}
        return write_report(
            output_dir,
            model_name=model_name,
            dataset_name=dataset_name,
            arms=arms,
            seeds=seeds,
            arm_seeds=arm_seeds,
            records=records,
            results=results,
            similarities=similarities,
            probe_args=probe_args,
            peft_config=peft_config,
            elapsed_seconds=time.monotonic() - started,
        )


LOCK_FILE = ".benchmark.lock"


@contextlib.contextmanager
def output_dir_lock(output_dir: str) -> Iterator[None]:
    """One benchmark run per `output_dir` at a time: a second one would train and report into the same arm folders
    under other settings. The lock (`filelock`, an OS lock that goes with the process that holds it) is refused at
    once, naming the holder written beside it."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    lock = filelock.FileLock(path, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        holder = read_json(path + ".holder") or {}
        raise RuntimeError(
            f"Another forgetting benchmark is running in {output_dir} (lock {path}, held by process "
            f"{holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}). Wait for it "
            "to finish, or give this run another `output_dir`."
        ) from None
    try:
        write_json(path + ".holder", {"pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime()})
        yield
    finally:
        lock.release()


def arm_datasets(arms: list[str], train_dataset: Dataset, native_dataset: Dataset | None) -> dict[str, Dataset]:
    """What each arm trains on: the task's dataset, or for the native-reference arms the native one, checked to hold
    the same questions."""
    native_arms = [name for name in arms if ARMS[name].data == "native"]
    if native_arms and native_dataset is None:
        raise ValueError(
            f"The arm(s) {native_arms} train on the same questions with the references in the seed model's own style, "
            "but no such dataset was given: pass `native_dataset` (the script's `--native_dataset_name`, e.g. "
            "`bundled/addition` beside `--dataset_name bundled/addition-german`)."
        )
    if native_arms:
        _check_same_questions(train_dataset, native_dataset)
    return {name: native_dataset if ARMS[name].data == "native" else train_dataset for name in arms}


def _check_same_questions(train_dataset: Dataset, native_dataset: Dataset) -> None:
    """The native dataset must ask what the task's asks, in the same order: only the references' style may differ."""
    if len(train_dataset) != len(native_dataset):
        raise ValueError(
            f"The native dataset has {len(native_dataset)} rows and the training dataset {len(train_dataset)}: they "
            "must hold the same questions (only the references' style differs): give both the same number of rows."
        )
    if _questions(train_dataset) != _questions(native_dataset):
        raise ValueError(
            "The native dataset asks other questions than the training dataset (or in another order): only the "
            "references' style may differ between them."
        )


def _questions(dataset: Dataset) -> list[Any]:
    """Each row without its responses: the prompt, or the conversation's non-assistant turns."""
    if "prompt" in dataset.column_names:
        return dataset["prompt"]
    if "messages" in dataset.column_names:
        return [[turn for turn in row if turn["role"] != "assistant"] for row in dataset["messages"]]
    return []


def check_seeds(seeds: list[int]) -> list[int]:
    """The training seeds, checked before anything is loaded."""
    if not seeds:
        raise ValueError("The forgetting benchmark needs at least one training seed (`seeds`).")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"A seed is listed twice in {seeds}.")
    if not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds):
        raise ValueError(f"Seeds must be integers, got {seeds}.")
    return list(seeds)


def seeds_of_arms(arms: list[str], seeds: list[int], seeds_per_arm: dict[str, int]) -> dict[str, list[int]]:
    """Each arm's training seeds: all of `seeds`, or the first `seeds_per_arm[arm]`."""
    strangers = sorted(set(seeds_per_arm) - set(arms))
    if strangers:
        raise ValueError(f"`seeds_per_arm` names {strangers}, which are not among the arms {arms}.")
    for arm, count in seeds_per_arm.items():
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= len(seeds):
            raise ValueError(
                f"`seeds_per_arm[{arm!r}]` must be a number of seeds between 1 and {len(seeds)}, got {count!r}."
            )
    return {arm: seeds[: seeds_per_arm.get(arm, len(seeds))] for arm in arms}


def with_seed(args: SDFTDynSDPBConfig, seed: int) -> SDFTDynSDPBConfig:
    """`args` with another training seed (LoRA initialisation, data order, sampled rewrites)."""
    seeded = copy.copy(args)
    seeded.seed = seed
    return seeded


def arm_dir(output_dir: str, arm: str, seed: int) -> str:
    return os.path.join(output_dir, arm, f"seed-{seed}")


def run_name(arm: str, seed: int) -> str:
    """A trained model's name in the result cache and the report: `<arm>/seed-<seed>`."""
    return f"{arm}/seed-{seed}"


def same_updates_for_every_arm(args: SDFTDynSDPBConfig, num_rows: int) -> SDFTDynSDPBConfig:
    """`args` with `max_steps` set: as given, or vanilla SFT's updates in `num_train_epochs` when unset."""
    if args.max_steps > 0:
        return args
    per_update = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    shared = copy.copy(args)
    shared.max_steps = max(1, math.ceil(num_rows / per_update) * math.ceil(args.num_train_epochs))
    return shared


def probe_every_model(
    model_name: str,
    args: SDFTDynSDPBConfig,
    runs: list[tuple[str, int]],
    probe_args: ProbeArguments,
    cache: ResultCache,
    quantization_config=None,
) -> dict[str, dict[str, Any]]:
    """`{model: {probe: result}}` for the seed model and every trained `(arm, seed)`, from the cache when there.

    The seed model is loaded once, as the trainers load it (same quantization; the probes' `eval_dtype`); each arm's
    adapter is then loaded onto it in turn and cast to the same dtype. An arm trained without PEFT is loaded from its
    own directory. A cached result is reused only for the same weights (their SHA-256) and probe settings.
    """
    # (name, folder of its weights); the seed model is the base itself
    models = [(SEED_MODEL, None), *((run_name(arm, seed), arm_dir(args.output_dir, arm, seed)) for arm, seed in runs)]
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    init_kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        init_kwargs["quantization_config"] = quantization_config
    eval_dtype = probe_args.resolved_eval_dtype()
    if eval_dtype is not None and quantization_config is None:
        init_kwargs["dtype"] = eval_dtype
    base = create_model_from_path(model_name, **init_kwargs)
    seed_identity = {"model": model_name, "init": {key: str(value) for key, value in sorted(init_kwargs.items())}}
    peft_model = None
    answers = None  # the seed model's own answers, scored by every model for its drift
    if any(PROBES[probe].scores_seed_answers for probe in probe_args.probes):
        answers = drift_seed_answers(base, tokenizer, probe_args, cache, SEED_MODEL, seed_identity)
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(models) * len(probe_args.probes), desc="forgetting probes (models x probes)") as progress:
        for name, directory in models:
            model, identity = base, seed_identity
            if directory is not None:
                identity = {**seed_identity, "weights_sha256": weights_digest(directory)}
                if os.path.isfile(os.path.join(directory, "adapter_config.json")):
                    adapter = name.replace("/", "_")  # PEFT adapter names cannot hold a slash
                    if peft_model is None:
                        peft_model = PeftModel.from_pretrained(base, directory, adapter_name=adapter)
                    else:
                        peft_model.load_adapter(directory, adapter_name=adapter)
                    peft_model.set_adapter(adapter)
                    model = peft_model
                else:
                    model = create_model_from_path(directory, **init_kwargs)
                if eval_dtype is not None and quantization_config is None:
                    model.to(eval_dtype)
            results[name] = {}
            for probe in probe_args.probes:
                progress.set_postfix_str(f"{name}: {probe}")
                results[name][probe] = run_probe(probe, name, model, tokenizer, probe_args, cache, identity, answers)
                progress.update()
    return results


def similarity_to_seed(results: dict[str, dict[str, Any]], embedder: SentenceEmbedder) -> dict[str, dict[str, Any]]:
    """Each fine-tuned model's mean cosine similarity to the seed model's answers to the same general prompts."""
    seed_answers = [row["output"] for row in results[SEED_MODEL]["general"]["outputs"]]
    return {
        name: mean_cosine_similarity(seed_answers, [row["output"] for row in probes["general"]["outputs"]], embedder)
        for name, probes in results.items()
        if name != SEED_MODEL
    }
