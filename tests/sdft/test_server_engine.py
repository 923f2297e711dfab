"""The server engine against a real OpenAI-compatible server (`transformers serve`, started here on the CPU with the
bundled model), and its error handling against an unreachable and a deliberately broken server."""

from __future__ import annotations

import json
import threading
import time

import pytest
from servers import BrokenServer, TransformersServe, free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_selfdistill import SDFTConfig, SDFTTrainer, distill_dataset
from trl_selfdistill.cache import RowCache
from trl_selfdistill.data import bundled_gsm8k, gsm8k_to_prompt_completion
from trl_selfdistill.generation import ServerEngine, ServerError
from trl_selfdistill.generation.server import completion_fields
from trl_selfdistill.sdft.spec import DistillSpec

GREEDY = DistillSpec.create("gsm8k", checker="math", generation_kwargs={"do_sample": False, "max_new_tokens": 12})


@pytest.fixture(scope="module")
def server(bundled_model_dir, tmp_path_factory):
    serve = TransformersServe(bundled_model_dir, tmp_path_factory.mktemp("serve") / "server.log").start()
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def seed_model(bundled_model_dir):
    return AutoModelForCausalLM.from_pretrained(bundled_model_dir), AutoTokenizer.from_pretrained(bundled_model_dir)


def cache_rows(cache_root) -> dict[str, str]:
    (directory,) = (cache_root / "rewrites").iterdir()
    return {key: record["rewrite"] for key, record in RowCache(directory).load().items()}


def cache_lines(cache_root) -> list[str]:
    (directory,) = (cache_root / "rewrites").iterdir()
    return [json.loads(line)["key"] for path in directory.glob("rows-*.jsonl") for line in open(path)]


def test_server_rewrite_report_and_cache_match_the_local_engine(server, seed_model, bundled_model_dir, tmp_path):
    model, tokenizer = seed_model
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=4))
    local = distill_dataset(model, tokenizer, dataset, GREEDY, cache_dir=tmp_path / "local", show_progress=False)
    served = distill_dataset(
        bundled_model_dir, tokenizer, dataset, GREEDY, engine="server", server_url=server.url,
        cache_dir=tmp_path / "served", show_progress=False,
    )  # fmt: skip

    assert served.dataset.to_list() == local.dataset.to_list()
    different = {"engine", "cache_dir", "seed_nll_reference", "seed_nll_distilled"}  # `transformers serve` gives none
    assert "seed_nll_reference" in local.report and "seed_nll_reference" not in served.report
    assert {k: v for k, v in served.report.items() if k not in different} == {
        k: v for k, v in local.report.items() if k not in different
    }
    assert (served.report["engine"], local.report["engine"]) == ("server", "transformers")
    assert served.report["generated"] == 4
    assert cache_rows(tmp_path / "served") == cache_rows(tmp_path / "local")
    assert all(cache_rows(tmp_path / "served").values())


def test_server_killed_mid_run_loses_nothing_and_the_rerun_generates_only_what_is_missing(
    server, seed_model, bundled_model_dir, tmp_path
):
    _, tokenizer = seed_model
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=10).select(range(4, 10)))
    doomed = TransformersServe(bundled_model_dir, tmp_path / "doomed.log").start()
    cache_root = tmp_path / "cache"

    def kill_after_two_rows():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (cache_root / "rewrites").exists() and len(cache_lines(cache_root)) >= 2:
                break
            time.sleep(0.2)
        doomed.stop()

    killer = threading.Thread(target=kill_after_two_rows)
    killer.start()
    engine = ServerEngine(doomed.url, bundled_model_dir, tokenizer, concurrency=1, max_retries=1, backoff=0.1)
    with pytest.raises(ServerError, match=doomed.url):
        distill_dataset(bundled_model_dir, tokenizer, dataset, GREEDY, engine=engine, cache_dir=cache_root)
    killer.join()
    before = cache_rows(cache_root)
    assert 2 <= len(before) < 6

    # Restarted (here: the module's server, same model): only the missing rows are generated.
    resumed = distill_dataset(
        bundled_model_dir, tokenizer, dataset, GREEDY, engine="server", server_url=server.url, cache_dir=cache_root,
        show_progress=False,
    )  # fmt: skip
    assert (resumed.report["generated"], resumed.report["from_cache"]) == (6 - len(before), len(before))
    keys = cache_lines(cache_root)
    assert len(keys) == len(set(keys)) == 6  # nothing generated twice
    assert all(cache_rows(cache_root)[key] == text for key, text in before.items())


def test_a_renamed_deployment_needs_the_override(server, seed_model, bundled_model_dir, tmp_path):
    _, tokenizer = seed_model
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=1))
    with pytest.raises(ServerError, match="sdft_server_model"):
        distill_dataset("my-org/renamed", tokenizer, dataset, GREEDY, engine="server", server_url=server.url)
    result = distill_dataset(
        "my-org/renamed", tokenizer, dataset, GREEDY, engine="server", server_url=server.url,
        server_model=bundled_model_dir, cache_dir=tmp_path, show_progress=False,
    )  # fmt: skip
    assert result.report["generated"] == 1


def test_the_least_surprising_target_is_refused_where_the_server_gives_no_likelihoods(
    server, seed_model, bundled_model_dir, tmp_path
):
    """`transformers serve` returns no prompt log-probabilities: `lowest_nll` is refused when the trainer is built,
    before any weights or rewrites, naming what the server did; the gap report is left out of the paper's SDFT."""
    _, tokenizer = seed_model
    reason = ServerEngine(server.url, bundled_model_dir, tokenizer).scoring_unavailable()
    assert reason is not None and server.url in reason
    args = SDFTConfig(
        output_dir=str(tmp_path / "out"), sdft_cache_dir=str(tmp_path / "cache"), sdft_engine="server",
        sdft_server_url=server.url, sdft_template="gsm8k", sdft_checker="math", sdft_selection="lowest_nll",
        sdft_generation_kwargs={"do_sample": False, "max_new_tokens": 12}, use_cpu=True, report_to=[],
    )  # fmt: skip
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=2))
    with pytest.raises(ValueError, match=r"lowest_nll.*cannot give: .*Use a server that returns prompt log-prob"):
        SDFTTrainer(model=bundled_model_dir, args=args, train_dataset=dataset)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_unreachable_server_fails_at_construction_before_loading_anything(tiny_model_dir, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    args = SDFTConfig(
        output_dir=str(tmp_path / "out"), sdft_cache_dir=str(tmp_path / "cache"), sdft_engine="server",
        sdft_server_url=url, sdft_server_max_retries=0, use_cpu=True, report_to=[],
    )  # fmt: skip
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=2))
    started = time.monotonic()
    with pytest.raises(ServerError, match=url):
        SDFTTrainer(model=tiny_model_dir, args=args, train_dataset=dataset)
    assert time.monotonic() - started < 30
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("status", "body", "problem"),
    [(500, b'{"detail": "boom"}', "HTTP 500"), (200, b'{"choices": [{"text": "cut', "malformed JSON")],
)
def test_server_errors_are_retried_then_reported_with_the_server(status, body, problem, tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    broken = BrokenServer("seed", status, body)
    try:
        engine = ServerEngine(broken.url, "seed", tokenizer, max_retries=2, backoff=0.01)
        with pytest.raises(ServerError, match=f"{broken.url}.*3 time.*{problem}"):
            list(engine.generate(["a prompt"], GREEDY.decoding, seeds=[0]))
        assert broken.calls == 3  # the first try and two retries
    finally:
        broken.close()


def test_server_refusing_a_request_is_not_retried(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    broken = BrokenServer("seed", 422, b'{"detail": "Unexpected fields in the request: {\'top_k\'}"}')
    try:
        engine = ServerEngine(broken.url, "seed", tokenizer, max_retries=3, backoff=0.01)
        with pytest.raises(ServerError, match="HTTP 422.*top_k"):
            engine.check(DistillSpec.create().decoding)
        assert broken.calls == 1
    finally:
        broken.close()


def test_a_url_without_scheme_names_the_fix(tiny_model_dir):
    with pytest.raises(ValueError, match="'http://localhost:8000'"):
        ServerEngine("localhost:8000", "seed", AutoTokenizer.from_pretrained(tiny_model_dir))


def test_decoding_becomes_completion_fields():
    paper = DistillSpec.create().decoding
    assert completion_fields(paper) == {"temperature": 0.95, "top_p": 0.7, "top_k": 50, "max_tokens": 512}
    assert completion_fields(GREEDY.decoding) == {"temperature": 0.0, "max_tokens": 12}
    with pytest.raises(ValueError, match="num_beams"):
        completion_fields({**paper, "num_beams": 4})


def test_sharded_training_is_allowed_with_the_server_engine_only(tmp_path):
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=2))
    common = dict(output_dir=str(tmp_path), use_cpu=True, fsdp="full_shard", report_to=[])
    with pytest.raises(ValueError, match="sdft_engine='server'"):
        SDFTTrainer.check_inputs(SDFTConfig(**common), dataset)
    server_args = SDFTConfig(**common, sdft_engine="server", sdft_server_url="http://127.0.0.1:1")
    assert len(SDFTTrainer.check_inputs(server_args, dataset)) == 2  # the responses to rewrite
    assert server_args.sdft_spec.template.name == "general"
