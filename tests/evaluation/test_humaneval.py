"""Tests of the HumanEval probe: the bundled problems, program building, sandboxed scoring and a real generation."""

from __future__ import annotations

import os
import time

import pytest
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill.evaluation.answers import chat_prompt
from trl_selfdistill.evaluation.humaneval import (
    HUMANEVAL_INSTRUCTION,
    evaluate_humaneval,
    extract_code,
    humaneval_program,
    load_humaneval,
    score_humaneval_answer,
)
from trl_selfdistill.evaluation.sandbox import _namespace_support
from trl_selfdistill.generation import Completion
from trl_selfdistill.paths import bundled_resource

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox relies on POSIX rlimits")


@pytest.fixture(scope="module")
def problems() -> dict[str, dict[str, str]]:
    return {p["task_id"]: p for p in load_humaneval()}


def _fenced_function(problem: dict[str, str]) -> str:
    """The canonical solution as a chat model writes it: prose, then the whole function in a python block."""
    return f"Here is the function:\n\n```python\n{problem['prompt']}{problem['canonical_solution']}```\n\nIt works."


def test_load_humaneval_bundles_all_problems():
    problems = load_humaneval()
    assert len(problems) == 164
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert set(problems[0]) == {"task_id", "prompt", "entry_point", "test", "canonical_solution"}
    assert problems[0]["entry_point"] == "has_close_elements"


def test_load_humaneval_samples_are_reproducible():
    first = load_humaneval(n=5, seed=3)
    assert len(first) == 5
    assert first == load_humaneval(n=5, seed=3)
    assert [p["task_id"] for p in first] != [p["task_id"] for p in load_humaneval(n=5, seed=4)]
    ids = [int(p["task_id"].split("/")[1]) for p in first]
    assert ids == sorted(ids)  # a sample keeps the official order


def test_instruction_embeds_the_prompt(problems):
    prompt = problems["HumanEval/0"]["prompt"]
    text = HUMANEVAL_INSTRUCTION.format(prompt=prompt)
    assert text.endswith(f"```python\n{prompt}```")


def test_extract_code_takes_the_first_python_block():
    assert extract_code("intro\n```python\nx = 1\n```\nthen\n```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"  # untagged fence
    assert extract_code("```bash\nls\n```\n```py\nx = 1\n```") == "x = 1\n"  # other languages skipped
    assert extract_code("```python\nx = 1\ny = 2") == "x = 1\ny = 2"  # cut at max_new_tokens: open fence
    assert extract_code("    return 1\n") == "    return 1\n"  # no fence: the raw answer


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/2", "HumanEval/38"])
def test_canonical_solution_passes_as_full_function_and_as_body(problems, task_id):
    problem = problems[task_id]
    assert score_humaneval_answer(problem, _fenced_function(problem))
    assert score_humaneval_answer(problem, problem["canonical_solution"])  # bare body continuation


def test_full_function_keeps_the_prompts_imports_and_helpers(problems):
    problem = problems["HumanEval/0"]
    # The model redefines the function without the `from typing import List` its annotations need.
    body = problem["canonical_solution"]
    answer = f"```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n{body}```"
    program = humaneval_program(problem, answer)
    assert program.splitlines()[1] == "from typing import List"  # right after the line that renames __main__
    assert program.endswith("\ncheck(has_close_elements)\n")
    assert problem["test"] in program
    assert score_humaneval_answer(problem, answer)

    # HumanEval/38's tests call the prompt's helper `encode_cyclic`, which a bare redefinition leaves out.
    problem = problems["HumanEval/38"]
    answer = f"```python\ndef decode_cyclic(s: str):\n{problem['canonical_solution']}```"
    assert "def encode_cyclic(" in humaneval_program(problem, answer)
    assert score_humaneval_answer(problem, answer)


def test_body_continuation_is_appended_to_the_prompt(problems):
    problem = problems["HumanEval/2"]
    program = humaneval_program(problem, "    return number % 1.0\n")
    assert program.split("\n", 1)[1].startswith(problem["prompt"] + "    return number % 1.0\n")


def test_wrong_solution_fails(problems):
    problem = problems["HumanEval/2"]  # truncate_number: the decimal part
    assert not score_humaneval_answer(problem, "```python\ndef truncate_number(number):\n    return number\n```")
    assert not score_humaneval_answer(problem, "    return 0.0\n")


# A wrong truncate_number (HumanEval/2) followed by code that ends the program with exit code 0 before the tests run.
_WRONG_TRUNCATE = "def truncate_number(number: float) -> float:\n    return number\n"
_EARLY_EXITS = {
    "os._exit": "import os\nos._exit(0)\n",
    "unittest.main": "import unittest\nunittest.main()\n",  # no tests found: SystemExit(0) on Python < 3.12
    "unittest.main under __main__": (  # the model's own (passing) test case, as code models add unprompted
        "import unittest\n\nclass TestTruncate(unittest.TestCase):\n    def test_whole(self):\n"
        "        self.assertEqual(truncate_number(1.0), 1.0)\n\n"
        'if __name__ == "__main__":\n    unittest.main()\n'
    ),
    "atexit os._exit": "import atexit, os\natexit.register(lambda: os._exit(0))\n",  # runs after check() raises
}


@pytest.mark.parametrize("exit_code", _EARLY_EXITS.values(), ids=_EARLY_EXITS.keys())
def test_wrong_solution_that_exits_zero_early_fails(problems, exit_code):
    answer = f"```python\n{_WRONG_TRUNCATE}\n{exit_code}```"
    assert not score_humaneval_answer(problems["HumanEval/2"], answer)


def test_right_solution_with_its_own_main_block_passes(problems):
    # As in the official harness, the program does not run as __main__: the model's test block stays out of the way.
    right = "def truncate_number(number: float) -> float:\n    return number % 1.0\n"
    answer = f"```python\n{right}\n{_EARLY_EXITS['unittest.main under __main__']}```"
    assert score_humaneval_answer(problems["HumanEval/2"], answer)


def test_program_prints_its_completion_marker_after_the_check(problems):
    problem = problems["HumanEval/2"]
    program = humaneval_program(problem, "    return number % 1.0\n", completion_marker="MARK-123")
    assert program.index("MARK-123") > program.index("\ncheck(truncate_number)\n")
    assert "MARK-123" in program.rstrip().splitlines()[-1]  # the program's last line: nothing runs after it


@pytest.mark.skipif(not _namespace_support()[1], reason="hiding paths needs the sandbox's mount namespace (root)")
def test_answer_cannot_copy_the_bundled_canonical_solution(problems):
    resources = os.path.dirname(str(bundled_resource("humaneval.jsonl.gz")))
    # A wrong answer that looks the problem up in the bundled file (found by listing its folder) and runs its
    # canonical solution: it passes whenever the sandbox lets it read the file.
    cheat = f"""```python
import gzip, json, os

def truncate_number(number: float) -> float:
    names = [name for name in os.listdir({resources!r}) if name.startswith("humaneval")]
    with gzip.open(os.path.join({resources!r}, names[0]), "rt") as f:
        row = next(r for r in map(json.loads, f) if r["task_id"] == "HumanEval/2")
    scope = {{}}
    exec(row["prompt"] + row["canonical_solution"], scope)
    return scope["truncate_number"](number)
```"""
    assert not score_humaneval_answer(problems["HumanEval/2"], cheat)
    by_path = "    import gzip\n    gzip.open({path!r}).read()\n    return number % 1.0\n"
    assert not score_humaneval_answer(
        problems["HumanEval/2"], by_path.format(path=os.path.join(resources, "humaneval.jsonl.gz"))
    )


def test_syntax_error_fails(problems):
    assert not score_humaneval_answer(problems["HumanEval/2"], "    return (number %\n")
    assert not score_humaneval_answer(problems["HumanEval/2"], "Sure! The answer is to use modulo.")


def test_infinite_loop_fails_with_a_timeout(problems):
    start = time.monotonic()
    assert not score_humaneval_answer(problems["HumanEval/2"], "    while True:\n        pass\n", timeout=1.0)
    assert time.monotonic() - start < 10


class _CannedEngine:
    """A generation engine answering each rendered prompt from a table (the probe's scoring is what is tested)."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def generate(self, prompts, decoding, seeds):
        assert decoding["do_sample"] is False
        yield [Completion(i, self.answers[p], False) for i, p in enumerate(prompts)]

    def identity(self):
        return {"name": "canned"}


def test_evaluate_humaneval_counts_passes_and_survives_bad_programs(problems):
    tokenizer = build_tiny_tokenizer()
    rows = [problems[t] for t in ("HumanEval/0", "HumanEval/2", "HumanEval/4", "HumanEval/7")]
    replies = [
        _fenced_function(rows[0]),  # passes
        "    import os\n    os._exit(3)\n",  # crashes
        "    while True:\n        pass\n",  # hangs
        rows[3]["canonical_solution"],  # passes
    ]
    engine = _CannedEngine(
        {
            chat_prompt(tokenizer, HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"])): a
            for p, a in zip(rows, replies, strict=True)
        }
    )
    result = evaluate_humaneval(None, tokenizer, rows, engine=engine, show_progress=False, timeout=2.0)
    assert (result["passed"], result["total"], result["pass_at_1"]) == (2, 4, 0.5)
    assert [o["task_id"] for o in result["outputs"]] == [p["task_id"] for p in rows]
    assert [o["output"] for o in result["outputs"]] == replies
    assert [o["passed"] for o in result["outputs"]] == [True, False, False, True]
    assert [o["reason"] for o in result["outputs"]] == ["ok", "exit code 3", "wall-clock timeout", "ok"]


def test_early_exit_is_reported_as_not_finished(problems):
    tokenizer = build_tiny_tokenizer()
    row = problems["HumanEval/2"]
    reply = f"```python\n{_WRONG_TRUNCATE}\n{_EARLY_EXITS['os._exit']}```"
    engine = _CannedEngine({chat_prompt(tokenizer, HUMANEVAL_INSTRUCTION.format(prompt=row["prompt"])): reply})
    result = evaluate_humaneval(None, tokenizer, [row], engine=engine, show_progress=False, timeout=5.0)
    assert result["passed"] == 0
    assert "before finishing" in result["outputs"][0]["reason"]


def test_evaluate_humaneval_generates_with_the_tiny_model(problems):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    rows = [problems["HumanEval/2"], problems["HumanEval/0"]]
    result = evaluate_humaneval(model, tokenizer, rows, batch_size=2, max_new_tokens=8, show_progress=False)
    assert result["total"] == 2
    assert [o["task_id"] for o in result["outputs"]] == ["HumanEval/2", "HumanEval/0"]
    assert all(isinstance(o["output"], str) and isinstance(o["passed"], bool) for o in result["outputs"])
    assert any(o["output"] for o in result["outputs"])  # the random model did generate
    assert result["passed"] == sum(o["passed"] for o in result["outputs"])
    assert result["pass_at_1"] == result["passed"] / 2
    assert all((o["reason"] == "ok") == o["passed"] for o in result["outputs"])
