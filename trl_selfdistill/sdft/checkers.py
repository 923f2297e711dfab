"""Acceptance rules for SDFT rewrites.

SDFT (Self-Distillation Fine-Tuning; Yang et al., ACL 2024, arXiv 2402.13669) keeps the seed model's
rewrite of a reference response only if it passes these rules, and otherwise falls back to the
reference. The rules reproduce the official code (``eval/gen_distilled_data.py``, ``eval/utils.py``,
``eval/eval_math.py``, ``eval/eval_openfunction.py``, ``eval/eval_magicoder.py`` of sail-sg/sdft); the
README's `sdft_checker` entry summarises them.

A checker is a callable ``(rewrite, reference, row) -> bool`` where True means "keep the rewrite". The
banned-phrase rule is applied to every dataset on top of the checker (see :func:`rejection_reason`).

``"math_strict"`` (:func:`math_strict_checker`, ours, not the paper's) is ``"math"`` plus a check of the working:
a rewrite with a false equation (:func:`false_equations`: ``180 + 6, which is 166``) is rejected even when its last
number is right, since training on it teaches wrong arithmetic. Only simple equations of numbers and operators are
judged; anything unclear is skipped, so the official GSM8K references pass it except for their few real slips.

Two deliberate deviations close blind spots of the official rules:

- a Unicode minus sign (U+2212, ``−5``) is read as ``-5``; the official regex only knows ASCII ``-`` and
  read it as 5. En dashes are left alone: in ``3–5`` they mark a range, not a sign;
- "reference solution" is banned too (:data:`EXTRA_BANNED_PHRASES`): a rewrite citing "the reference
  solution" leaks the prompt as much as one citing the officially banned "reference answer". A bare
  "the reference" stays allowed (it also appears in "the reference point", "the reference price").
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .equations import false_equations

__all__ = [
    "BANNED_PHRASES",
    "BANNED_PREFIX",
    "CHECKERS",
    "EXTRA_BANNED_PHRASES",
    "OFFICIAL_BANNED_PHRASES",
    "Checker",
    "accept_all",
    "code_checker",
    "contains_banned_phrase",
    "extract_last_number",
    "false_equations",
    "function_call_checker",
    "get_checker",
    "math_checker",
    "math_strict_checker",
    "normalize_function_call",
    "rejection_reason",
]

Checker = Callable[[str, str, dict], bool]
"""``(rewrite, reference, row) -> bool``; True keeps the rewrite."""

# Official ban list (compared against the lower-cased rewrite) and the case-sensitive prefix rule.
OFFICIAL_BANNED_PHRASES: tuple[str, ...] = (
    "reference answer",
    "your response",
    "my response",
    "your own response",
    "now it's your turn",
)
# Our extension: the same leak under another name, which the official list misses.
EXTRA_BANNED_PHRASES: tuple[str, ...] = ("reference solution",)
BANNED_PHRASES: tuple[str, ...] = OFFICIAL_BANNED_PHRASES + EXTRA_BANNED_PHRASES
"""Every banned phrase: :data:`OFFICIAL_BANNED_PHRASES` plus :data:`EXTRA_BANNED_PHRASES`."""
BANNED_PREFIX = "Your turn"

# Official number pattern: optional minus, digits, optional ","/whitespace-separated digit groups, optional decimals.
_NUMBER_RE = re.compile(r"-?\d+(?:[,\s]\d+)*(?:\.\d+)?")
_INTEGER_RE = re.compile(r"-?\d+")
_UNICODE_MINUS = "\u2212"
# Official shape of a reference call: dotted identifier, "(", anything, ")".
_CALL_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*(?:\.[a-zA-Z_][a-zA-Z0-9_]*)*)\((.*)\)")
_CODE_BLOCK = "```python"
_CODE_PREFIXES: tuple[str, ...] = ("I have", "Here is", "I implemented")


def contains_banned_phrase(text: str) -> bool:
    """True if ``text`` contains a banned phrase (case-insensitive) or starts with ``Your turn``."""
    lowered = text.lower()
    if any(phrase in lowered for phrase in BANNED_PHRASES):
        return True
    # The official code strips the rewrite before this test.
    return text.strip().startswith(BANNED_PREFIX)


def extract_last_number(text: str) -> int | None:
    """The last number in ``text`` as an int, or None if there is none or it is not an integer.

    Commas and spaces inside a number are removed (``1,000`` -> 1000), ``12.0`` counts as 12, and a
    number with a non-zero fractional part (``12.5``) gives None. As in the official code, a number
    split by another whitespace character (newline, tab) is not a valid integer and gives None. Unlike
    the official code, a Unicode minus sign counts as a sign (``−5`` -> -5, not 5).
    """
    numbers = _NUMBER_RE.findall(text.replace(_UNICODE_MINUS, "-"))
    if not numbers:
        return None
    number = numbers[-1].replace(",", "").replace(" ", "")
    integer, _, fraction = number.partition(".")
    if fraction and int(fraction) != 0:
        return None
    if not _INTEGER_RE.fullmatch(integer):
        return None
    return int(integer)


def math_checker(rewrite: str, reference: str, row: dict) -> bool:
    """Keep if the last integer of the rewrite equals the last integer of the reference (e.g. ``#### 72``)."""
    expected = extract_last_number(reference)
    return expected is not None and extract_last_number(rewrite) == expected


def math_strict_checker(rewrite: str, reference: str, row: dict) -> bool:
    """:func:`math_checker`, and no false equation in the rewrite (:func:`false_equations`).

    A rewrite can reach the right last number through wrong working (``91 + 95 is equivalent to 180 + 6, which is
    166. So, the answer is 186.``); training on it teaches the wrong arithmetic.
    """
    return math_checker(rewrite, reference, row) and not false_equations(rewrite)


def normalize_function_call(text: str) -> str:
    """Collapse whitespace, then ``'`` -> ``"`` and ``", "`` -> ``","`` (official normalisation)."""
    text = re.sub(r"\s+", " ", text.strip())
    return text.replace("'", '"').replace(", ", ",")


def function_call_checker(rewrite: str, reference: str, row: dict) -> bool:
    """Keep if the normalised reference call ``name(args)`` appears in the normalised rewrite.

    As officially, the call is read from the start of the normalised reference and must appear in the
    rewrite at a word boundary (``my_f(x)`` does not contain ``f(x)``). A reference that does not start
    with a call (the official code raises there) is instead required to appear verbatim, after
    normalisation, in the rewrite.
    """
    ref = normalize_function_call(reference)
    answer = normalize_function_call(rewrite)
    match = _CALL_RE.match(ref)
    if match is None:
        return bool(ref) and ref in answer
    name, params = match.groups()
    pattern = r"\b" + re.escape(name) + r"\(" + re.escape(params) + r"\)"
    return re.search(pattern, answer) is not None


def code_checker(rewrite: str, reference: str, row: dict) -> bool:
    """Keep if the rewrite has a ```` ```python ```` block and starts with ``I have``/``Here is``/``I implemented``."""
    answer = rewrite.strip()
    return _CODE_BLOCK in answer and answer.startswith(_CODE_PREFIXES)


def accept_all(rewrite: str, reference: str, row: dict) -> bool:
    """No dataset-specific check (general instruction data); only the banned phrases apply."""
    return True


CHECKERS: dict[str, Checker] = {
    "math": math_checker,
    "math_strict": math_strict_checker,
    "function_call": function_call_checker,
    "code": code_checker,
    "none": accept_all,
}


def get_checker(name_or_callable: str | Checker) -> Checker:
    """Return the built-in checker called ``name_or_callable``, or pass a callable through."""
    if isinstance(name_or_callable, str):
        if name_or_callable in CHECKERS:
            return CHECKERS[name_or_callable]
        raise ValueError(
            f"Unknown checker {name_or_callable!r}; valid names are {sorted(CHECKERS)}, "
            "or pass a callable (rewrite, reference, row) -> bool."
        )
    if callable(name_or_callable):
        return name_or_callable
    raise ValueError(
        f"A checker must be one of the names {sorted(CHECKERS)} or a callable (rewrite, reference, row) -> bool, "
        f"got {type(name_or_callable).__name__} {name_or_callable!r}."
    )


def rejection_reason(rewrite: str, reference: str, row: dict, checker: Checker) -> str | None:
    """None if the rewrite is accepted, else the first rule that rejects it.

    Rules in order: ``"empty"`` (blank rewrite), ``"banned_phrase"`` (every dataset), ``"checker"``.
    """
    if not rewrite.strip():
        return "empty"
    if contains_banned_phrase(rewrite):
        return "banned_phrase"
    if not checker(rewrite, reference, row):
        return "checker"
    return None
