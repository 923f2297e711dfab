"""The forgetting benchmark: fine-tune one seed model on one task several ways, then probe every result side by side.

    for each arm (vanilla SFT, SDFT, DynSDPB dynamic and constant, SDFT data + DynSDPB loss):   arms.py
        train from the same settings into <output_dir>/<arm>         (skipped once finished; resumed from checkpoints)
    for the seed model and each arm:                                                            probes.py
        run every probe                                     (cached per model and probe in <output_dir>/results)
    score the general answers against the seed's (cosine similarity of sentence embeddings)    similarity.py
    write the table, the JSON and one chart per probe                                          report.py

This is the experiment of the SDFT paper (Yang et al., ACL 2024, arXiv 2402.13669, Table 1 and its safety table) with
the DynSDPB arms (Fu et al., 2024, arXiv 2411.16991) beside it.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

from accelerate import PartialState
from datasets import Dataset
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.utils import logging
from trl.trainer.utils import create_model_from_path

from ..models import resolve_model_name
from ..sdft_dynsdpb import SDFTDynSDPBConfig
from .arms import ARMS, SEED_MODEL, check_arm_inputs, check_arms, train_arm
from .probes import ProbeArguments, ResultCache, run_probe
from .report import check_chart_support, write_report
from .similarity import SentenceEmbedder, mean_cosine_similarity

logger = logging.get_logger(__name__)

RESULTS_DIR = "results"


def run_forgetting_benchmark(
    model_name: str,
    training_args: SDFTDynSDPBConfig,
    train_dataset: Dataset,
    probe_args: ProbeArguments,
    arms: list[str] | None = None,
    *,
    peft_config=None,
    quantization_config=None,
    embedder: SentenceEmbedder | None = None,
    dataset_name: str | None = None,
) -> dict[str, Any]:
    """Trains every arm, probes the seed model and every arm, and writes the report into `training_args.output_dir`.

    Every arm trains with the same `training_args` (each reads the fields its own config has), the same data and the
    same number of optimizer updates: `max_steps`, or when it is unset the updates vanilla SFT makes in
    `num_train_epochs` (DynSDPB sees half as many new samples per update, since half of each batch repeats the last
    step's). Finished arms and probe results are reused, so an interrupted run resumes where it stopped.

    Returns the report (also written as `forgetting_benchmark.json`, with `forgetting_benchmark.md` and the charts).
    """
    arms = check_arms(list(ARMS) if arms is None else arms)
    if PartialState().num_processes > 1:
        raise ValueError(
            "The forgetting benchmark trains and evaluates its arms one after another in one process: run it with "
            "`python` (or `accelerate launch --num_processes 1`), not on several processes."
        )
    check_chart_support()
    if "general" in probe_args.probes and embedder is None:
        embedder = SentenceEmbedder()  # loaded now: a missing embedder fails before hours of training
    model_path = resolve_model_name(model_name)
    shared = same_updates_for_every_arm(training_args, len(train_dataset))
    check_arm_inputs(arms, shared, train_dataset)
    output_dir = training_args.output_dir

    records = {}
    for number, name in enumerate(arms, start=1):
        logger.warning(f"Forgetting benchmark: arm {number}/{len(arms)}, {ARMS[name].label} ({name}).")
        records[name] = train_arm(
            ARMS[name],
            model_path,
            shared,
            train_dataset,
            os.path.join(output_dir, name),
            peft_config=peft_config,
            quantization_config=quantization_config,
        )

    results = probe_every_model(
        model_path, shared, arms, probe_args, ResultCache(os.path.join(output_dir, RESULTS_DIR)), quantization_config
    )
    similarities = similarity_to_seed(results, embedder) if "general" in probe_args.probes else {}
    return write_report(
        output_dir,
        model_name=model_name,
        dataset_name=dataset_name,
        arms=arms,
        records=records,
        results=results,
        similarities=similarities,
        probe_args=probe_args,
        training_args=shared,
        peft_config=peft_config,
    )


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
    arms: list[str],
    probe_args: ProbeArguments,
    cache: ResultCache,
    quantization_config=None,
) -> dict[str, dict[str, Any]]:
    """`{model: {probe: result}}` for the seed model and every arm, each probe from the cache when it is there.

    The seed model is loaded once, as the trainers load it (same dtype and quantization); each arm's adapter is then
    loaded onto it in turn. An arm trained without PEFT is loaded from its own directory.
    """
    models = [SEED_MODEL, *arms]
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    init_kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        init_kwargs["quantization_config"] = quantization_config
    base = create_model_from_path(model_name, **init_kwargs)
    peft_model = None
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(models) * len(probe_args.probes), desc="forgetting probes (models x probes)") as progress:
        for name in models:
            model = base
            if name != SEED_MODEL:
                arm_dir = os.path.join(args.output_dir, name)
                if os.path.isfile(os.path.join(arm_dir, "adapter_config.json")):
                    if peft_model is None:
                        peft_model = PeftModel.from_pretrained(base, arm_dir, adapter_name=name)
                    else:
                        peft_model.load_adapter(arm_dir, adapter_name=name)
                    peft_model.set_adapter(name)
                    model = peft_model
                else:
                    model = create_model_from_path(arm_dir, **init_kwargs)
            results[name] = {}
            for probe in probe_args.probes:
                progress.set_postfix_str(f"{name}: {probe}")
                results[name][probe] = run_probe(probe, name, model, tokenizer, probe_args, cache)
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
