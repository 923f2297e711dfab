"""The HumanEval forgetting probe of SDFT (Yang et al., ACL 2024, arXiv 2402.13669): greedy pass@1.

The 164 problems of HumanEval (Chen et al., 2021, arXiv 2107.03374) are bundled with the package. Each problem's
prompt (imports, signature, docstring) is shown to the instruct model inside :data:`HUMANEVAL_INSTRUCTION`, rendered
through the model's own chat template and answered greedily. The code is then taken from the answer (see
:func:`humaneval_program`), the problem's unit tests are appended, and the program runs in the sandbox
(:func:`~trl_selfdistill.evaluation.sandbox.run_untrusted`): a problem passes when the tests run to the end (the
program then prints a random marker drawn for this run; exit code 0 alone is no proof, since code models often end
their code with ``unittest.main()``, which exits 0 before the tests run) and the program exits with code 0 within
the time and memory limits. The package's resources directory, which holds the canonical solutions, is hidden from
the program where the sandbox has a mount namespace. pass@1 is the share of problems that pass, one greedy answer
each.

The paper reports greedy pass@1 with execution against the unit tests but does not publish its HumanEval prompt;
:data:`HUMANEVAL_INSTRUCTION` and the code extraction rules are this project's own choices.
"""

from __future__ import annotations

import gzip
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..generation import GenerationEngine
from ..paths import bundled_resource
from .answers import chat_prompt, greedy_answers, sample_rows
from .sandbox import SandboxResult, run_untrusted

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Return the whole function in a ```python code block.\n\n"
    "```python\n{prompt}```"
)
"""The user turn asking for a completion; ``{prompt}`` is replaced by the problem's prompt (which ends with a newline).

The paper does not publish its HumanEval prompt: this wording is the project's own.
"""

_HUMANEVAL_FILE = "humaneval.jsonl.gz"
_HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "test", "canonical_solution")

# A fenced block: its info string (language tag), then its code up to the closing fence or the end of the answer.
_FENCE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("python", "python3", "py", "")


def load_humaneval(n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """The bundled HumanEval problems (all 164 when ``n`` is None), or ``n`` of them drawn with ``seed``.

    Each problem is a dict with ``task_id``, ``prompt``, ``entry_point``, ``test`` and ``canonical_solution``, in
    the official order; a sample keeps that order (see :func:`~trl_selfdistill.evaluation.answers.sample_rows`).
    """
    resource = bundled_resource(_HUMANEVAL_FILE)
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    problems = [{field: row[field] for field in _HUMANEVAL_FIELDS} for row in rows]
    return sample_rows(problems, n, seed)


def extract_code(answer: str) -> str:
    """The code of a model answer: its first ```python (or untagged ```) fenced block, else the raw answer.

    Blocks tagged with another language (e.g. ```bash) are skipped. A fence left open (the answer was cut at
    ``max_new_tokens``) runs to the end of the answer.
    """
    for match in _FENCE.finditer(answer):  # blocks in order, each one's closing fence consumed
        if match.group(1).strip().lower() in _PYTHON_TAGS:
            return match.group(2)
    return answer


def humaneval_program(problem: Mapping[str, str], answer: str, *, completion_marker: str | None = None) -> str:
    """The program to run for ``answer`` to ``problem``: the extracted code, the problem's tests and the check call.

    The code is :func:`extract_code` of the answer. If it defines ``def {entry_point}(`` (the model returned the
    whole function), the program is the problem's prompt followed by the code: the prompt brings the imports and
    the helper functions some problems define before the entry point (e.g. ``HumanEval/38``, whose tests call
    ``encode_cyclic``), and its docstring-only stub of the entry point is valid Python that the model's definition
    then replaces. Otherwise the code is taken as the continuation of the function body, appended to the prompt
    as in the official harness. Either way the problem's ``test`` and ``check({entry_point})`` follow.

    With ``completion_marker``, the program's last line prints it once ``check`` has returned, to the real stdout
    (even if the code redirected ``sys.stdout``), so that its output shows the tests ran to the end.
    """
    code = extract_code(answer)
    entry_point = problem["entry_point"]
    prompt = problem["prompt"]
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        program = f"{prompt}\n\n{code}"  # the full function: the prompt's stub is overridden
    else:
        program = prompt + code  # the body continuation of the prompt's signature
    # Not run as __main__, as in the official harness (which exec()s the program): a model's own
    # `if __name__ == "__main__": unittest.main()` block stays out of the way of the tests.
    program = f"__name__ = 'humaneval_solution'\n{program}\n\n{problem['test']}\n\ncheck({entry_point})\n"
    if completion_marker is not None:
        program += f"\nimport sys\nprint({completion_marker!r}, file=sys.__stdout__, flush=True)\n"
    return program


def _solutions_dir() -> list[str]:
    """The folder of the bundled file, which holds the canonical solutions: the sandbox hides it from the program."""
    resource = bundled_resource(_HUMANEVAL_FILE)
    # A package imported from a zip archive has no folder on disk to hide (nor one to open by path).
    return [str(resource.parent)] if isinstance(resource, Path) else []


def _run(problem: Mapping[str, str], answer: str, timeout: float) -> SandboxResult:
    # Fresh for each run: an earlier program's output cannot supply it.
    marker = f"humaneval-tests-finished-{secrets.token_hex(16)}"
    program = humaneval_program(problem, answer, completion_marker=marker)
    # Decoded generations may hold lone surrogates, which cannot be written as UTF-8 source.
    program = program.encode("utf-8", errors="replace").decode("utf-8")
    return run_untrusted(program, timeout=timeout, completion_marker=marker, hidden_paths=_solutions_dir())


def score_humaneval_answer(problem: Mapping[str, str], answer: str, *, timeout: float = 10.0) -> bool:
    """True if the program built from ``answer`` (:func:`humaneval_program`) passes the problem's tests.

    The program is untrusted and runs in the sandbox with a wall-clock limit of ``timeout`` seconds. It passes only
    if its tests ran to the end: a program that exits with code 0 before (``os._exit(0)``, ``unittest.main()``, an
    ``atexit`` handler after a failed test) fails.
    """
    return _run(problem, answer, timeout).passed


def evaluate_humaneval(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Mapping[str, str]],
    batch_size: int | str = "auto",
    max_new_tokens: int = 512,
    *,
    engine: GenerationEngine | None = None,
    show_progress: bool = True,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Greedy HumanEval pass@1 of ``model`` (a transformers or PEFT causal LM, its adapter enabled) on ``problems``.

    ``problems`` are rows of :func:`load_humaneval`. The answers are generated by the in-process engine
    (length-sorted batches of ``batch_size``), or by ``engine`` if given (e.g. a [`ServerEngine`] serving the
    model); each program then runs in the sandbox, one at a time, within ``timeout`` seconds. A program that
    crashes, hangs or runs out of memory counts as failed; the evaluation goes on.

    Returns ``{"pass_at_1", "passed", "total", "outputs"}``, where ``outputs`` lists, in problem order,
    ``{"task_id", "output", "passed", "reason"}`` per problem (``reason`` is the sandbox's, e.g. ``"exit code 1"``,
    ``"wall-clock timeout"`` or, for a program that exited with code 0 before its tests finished, ``"exited before
    finishing (...)"``; ``"ok"`` for a pass).
    """
    prompts = [chat_prompt(tokenizer, HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"])) for p in problems]
    generations = greedy_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        engine=engine,
        desc="HumanEval",
        show_progress=show_progress,
    )

    outputs = []
    runs = list(zip(problems, generations, strict=True))
    for problem, output in tqdm(runs, desc="HumanEval tests", disable=not show_progress):
        result = _run(problem, output, timeout)  # a crash, hang or memory blow-up is a failed result, not an error
        outputs.append({"task_id": problem["task_id"], "output": output})
        outputs[-1].update(passed=result.passed, reason=result.reason)
    passed = sum(o["passed"] for o in outputs)
    total = len(outputs)
    return {"pass_at_1": passed / total if total else 0.0, "passed": passed, "total": total, "outputs": outputs}
