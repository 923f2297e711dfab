"""Data utilities: the bundled GSM8K sample and addition task, GSM8K to prompt-completion, and task loading."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from pathlib import Path

from datasets import Dataset, load_dataset

from .paths import bundled_resource
from .validation import check_number

BUNDLED_GSM8K_NAME = "bundled/gsm8k"
"""Name accepted by :func:`load_task_dataset` for the GSM8K sample shipped with the package."""
BUNDLED_ADDITION_NAME = "bundled/addition"
"""Name accepted by :func:`load_task_dataset` for the two-digit addition task shipped with the package."""

_BUNDLED_GSM8K_FILES = {"train": "gsm8k_train_sample.jsonl", "test": "gsm8k_test.jsonl.gz"}
_BUNDLED_ADDITION_FILES = {"train": "addition_train.jsonl", "test": "addition_test.jsonl"}
ADDITION_SPLIT_SIZES = {"train": 256, "test": 500}
_ADDITION_SEED = 2026
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
GSM8K_STYLES = ("raw", "official")
"""Answer styles of :func:`gsm8k_to_prompt_completion`: the Hub rows as they are, or the official SDFT preparation."""
_CALCULATOR_ANNOTATION = re.compile(r"<<.*?>>")
_FINAL_ANSWER = re.compile(r"\n#### (.*)$")


def _read_rows(name: str) -> list[dict]:
    resource = bundled_resource(name)
    raw = resource.read_bytes()
    text = (gzip.decompress(raw) if resource.name.endswith(".gz") else raw).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def bundled_gsm8k(split: str = "train", n: int | None = None) -> Dataset:
    """Return raw GSM8K rows (``question``, ``answer``) from the sample bundled with the package.

    ``split`` is ``"train"`` (the first 200 rows of the official split) or ``"test"`` (the whole official test split,
    1319 rows, which the forgetting benchmark samples from); ``n`` keeps only the first ``n`` rows.
    """
    return _bundled_split("GSM8K", _BUNDLED_GSM8K_FILES, split, n)


def _bundled_split(task: str, files: dict[str, str], split: str, n: int | None) -> Dataset:
    """The first ``n`` rows (all if None) of a bundled task's split."""
    if split not in files:
        raise ValueError(f"Unknown bundled {task} split {split!r}; expected one of {sorted(files)}.")
    if n is not None:
        check_number("n", n, integer=True, low=0, hint="The number of rows to keep; None for all.")
    dataset = Dataset.from_list(_read_rows(files[split]))
    if n is not None:
        dataset = dataset.select(range(min(n, len(dataset))))
    return dataset


ADDITION_STYLES = ("native", "german", "calculator")
"""Styles of the addition task's reference answers: the same working and result, written three ways.

- ``native``: ``17 + 22 = (10 + 20) + (7 + 2) = 30 + 9 = 39.\nThe answer is 39.`` (the bundled files), close to what
  the bundled model writes itself (0.96 nats/token under it);
- ``german``: the same steps in German, ``Zuerst addieren wir die Zehner: 10 + 20 = 30. ... Die Antwort lautet 39.``;
- ``calculator``: a calculator log with ``{{...}}`` annotations and a ``#### 39`` line, GSM8K's raw format (braces, not
  GSM8K's ``<<...>>``, which IFEval's title check would read as a title).

The foreign styles keep the answer and the checkable working and move the wording far from the model's own: the
reference-style experiment of the forgetting benchmark (see ``examples/screen_reference_styles.py``).
"""


def addition_answer(a: int, b: int, style: str = "native") -> str:
    """The reference answer of ``What is a + b?`` in ``style`` (see :data:`ADDITION_STYLES`): tens and ones added
    apart, then together, then the answer line."""
    tens_a, tens_b, ones_a, ones_b = a // 10 * 10, b // 10 * 10, a % 10, b % 10
    tens, ones, total = tens_a + tens_b, ones_a + ones_b, a + b
    if style == "native":
        return (
            f"{a} + {b} = ({tens_a} + {tens_b}) + ({ones_a} + {ones_b}) = {tens} + {ones} = {total}.\n"
            f"The answer is {total}."
        )
    if style == "german":
        return (
            f"Zuerst addieren wir die Zehner: {tens_a} + {tens_b} = {tens}. Dann die Einer: {ones_a} + {ones_b} = "
            f"{ones}. Zusammen ergibt das {tens} + {ones} = {total}.\nDie Antwort lautet {total}."
        )
    if style == "calculator":
        return (
            f"Tens: {tens_a}+{tens_b}={{{{{tens_a}+{tens_b}={tens}}}}}{tens}. "
            f"Ones: {ones_a}+{ones_b}={{{{{ones_a}+{ones_b}={ones}}}}}{ones}. "
            f"Total: {tens}+{ones}={{{{{tens}+{ones}={total}}}}}{total}.\n#### {total}"
        )
    raise ValueError(f"Unknown addition answer style {style!r}; expected one of {list(ADDITION_STYLES)}.")


def make_addition_rows() -> dict[str, list[dict]]:
    """The two-digit addition task, as bundled: ``{"train": rows, "test": rows}`` of ``question``/``answer`` rows.

    Every ordered pair of two-digit numbers is shuffled with a fixed seed; the first 256 pairs are the training
    split and the next 500 the test split, so no test question is a training question. The bundled files are this
    function's output (a test checks it).
    """
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(_ADDITION_SEED).shuffle(pairs)
    splits, start = {}, 0
    for split, size in ADDITION_SPLIT_SIZES.items():
        chosen = pairs[start : start + size]
        splits[split] = [{"question": f"What is {a} + {b}?", "answer": addition_answer(a, b)} for a, b in chosen]
        start += size
    return splits


_ADDITION_QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


def bundled_addition(split: str = "train", n: int | None = None, style: str = "native") -> Dataset:
    """Raw rows (``question``, ``answer``) of the two-digit addition task shipped with the package.

    The forgetting benchmark's default task, written for this project (see :func:`make_addition_rows`): 256
    training and 500 test questions such as ``What is 59 + 63?``, answered step by step and ending in the result
    (``The answer is 122.`` in the ``native`` style, the ending the GSM8K checker and probe read; see
    :data:`ADDITION_STYLES` for the others). ``n`` keeps only the first ``n`` rows.
    """
    if style not in ADDITION_STYLES:
        raise ValueError(f"Unknown addition answer style {style!r}; expected one of {list(ADDITION_STYLES)}.")
    dataset = _bundled_split("addition", _BUNDLED_ADDITION_FILES, split, n)
    if style == "native":
        return dataset
    return Dataset.from_list(
        [{"question": row["question"], "answer": _restyled(row["question"], style)} for row in dataset]
    )


def _restyled(question: str, style: str) -> str:
    a, b = (int(number) for number in _ADDITION_QUESTION.fullmatch(question).groups())
    return addition_answer(a, b, style)


def bundled_addition_name(style: str = "native") -> str:
    """The name :func:`load_task_dataset` takes for the addition task in ``style``: ``bundled/addition`` for the
    native answers, ``bundled/addition-<style>`` for the others."""
    if style not in ADDITION_STYLES:
        raise ValueError(f"Unknown addition answer style {style!r}; expected one of {list(ADDITION_STYLES)}.")
    return BUNDLED_ADDITION_NAME if style == "native" else f"{BUNDLED_ADDITION_NAME}-{style}"


BUNDLED_ADDITION_NAMES = {bundled_addition_name(style): style for style in ADDITION_STYLES}
"""Every name of the bundled addition task, with its answer style."""


def official_gsm8k_answer(answer: str) -> str:
    """A raw GSM8K answer as the official SDFT data has it (sail-sg/sdft, ``data/gsm8k/gsm8k_*.json``).

    The ``<<48/2=24>>`` calculator annotations are removed and the final ``#### N`` line becomes
    ``The answer is N.`` (N verbatim, e.g. ``2,125``); the official repository ships the prepared files, not
    the script, and this reproduces them exactly on the bundled rows.
    """
    answer = _CALCULATOR_ANNOTATION.sub("", answer)
    return _FINAL_ANSWER.sub(lambda match: f"\nThe answer is {match.group(1).strip()}.", answer)


def _to_prompt_completion(row: dict, style: str = "raw") -> dict:
    answer = official_gsm8k_answer(row["answer"]) if style == "official" else row["answer"]
    return {
        "prompt": [{"role": "user", "content": row["question"]}],
        "completion": [{"role": "assistant", "content": answer}],
    }


def gsm8k_to_prompt_completion(dataset: Dataset, style: str = "raw") -> Dataset:
    """Map raw GSM8K rows (``question``, ``answer``) to TRL's conversational prompt-completion format.

    ``prompt = [{"role": "user", "content": question}]`` and
    ``completion = [{"role": "assistant", "content": answer}]``; the raw columns are removed, any other
    column is kept. ``style="raw"`` keeps the Hub answer as it is; ``style="official"`` prepares it as the
    official SDFT code did (:func:`official_gsm8k_answer`: no ``<<...>>`` annotations, ``The answer is N.``).
    """
    if style not in GSM8K_STYLES:
        raise ValueError(f"Unknown GSM8K style {style!r}; expected one of {list(GSM8K_STYLES)}.")
    missing = {"question", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"gsm8k_to_prompt_completion needs the columns 'question' and 'answer'; missing {sorted(missing)} "
            f"(dataset has {dataset.column_names})."
        )
    return dataset.map(
        _to_prompt_completion,
        fn_kwargs={"style": style},
        remove_columns=["question", "answer"],
        desc="GSM8K to prompt-completion",
    )


def load_task_dataset(
    name_or_path: str,
    split: str = "train",
    config: str | None = None,
    max_samples: int | None = None,
    gsm8k_style: str = "raw",
) -> Dataset:
    """Load a task dataset by name or path and return it ready for training.

    - ``"bundled/gsm8k"``: the GSM8K sample shipped with the package (``split`` = ``"train"`` or ``"test"``);
    - ``"bundled/addition"``: the two-digit addition task shipped with the package (``"train"`` or ``"test"``), and
      ``"bundled/addition-german"``, ``"bundled/addition-calculator"``: the same questions with the answers in
      another style (:data:`ADDITION_STYLES`);
    - a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file (all its rows, whatever ``split`` says), a
      directory of such files (splits inferred from file names, e.g. ``train.jsonl``/``test.jsonl``), or a
      directory written by ``save_to_disk``;
    - anything else: ``datasets.load_dataset(name_or_path, config, split=split)`` from the Hub.

    Raw GSM8K rows (``question``/``answer`` columns) are converted with :func:`gsm8k_to_prompt_completion`
    in ``gsm8k_style`` (``"raw"`` or ``"official"``); ``max_samples`` keeps only the first rows.
    """
    if gsm8k_style not in GSM8K_STYLES:  # checked up front: a typo should not wait for the download
        raise ValueError(f"Unknown GSM8K style {gsm8k_style!r}; expected one of {list(GSM8K_STYLES)}.")
    if name_or_path == BUNDLED_GSM8K_NAME:
        dataset = bundled_gsm8k(split)
    elif name_or_path in BUNDLED_ADDITION_NAMES:
        dataset = bundled_addition(split, style=BUNDLED_ADDITION_NAMES[name_or_path])
    elif os.path.exists(name_or_path):
        path = Path(name_or_path)
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            from datasets import load_from_disk

            loaded = load_from_disk(str(path))
            dataset = loaded[split] if hasattr(loaded, "keys") else loaded
        elif path.is_dir():
            # datasets infers the builder from the file extensions and the splits from the file names.
            dataset = load_dataset(str(path), split=split)
        else:
            suffix = path.suffix.lower()
            if suffix not in _LOCAL_BUILDERS:
                raise ValueError(f"Unsupported data file {path}; expected one of {sorted(_LOCAL_BUILDERS)}.")
            dataset = load_dataset(_LOCAL_BUILDERS[suffix], data_files=str(path), split="train")
    else:
        dataset = load_dataset(name_or_path, config, split=split)

    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if {"question", "answer"} <= set(dataset.column_names):
        dataset = gsm8k_to_prompt_completion(dataset, style=gsm8k_style)
    return dataset
