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

import ast
import re
from collections.abc import Callable, Iterator
from fractions import Fraction

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


# ---- arithmetic equations, for "math_strict"
_H = r"[^\S\r\n]"  # horizontal whitespace: an equation never spans lines
_EQ_NUMBER = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
# Opening parentheses or an attached minus ("-3", not "- 3"), an optional "$", a number, closing parentheses.
_EQ_OPERAND = rf"(?:\({_H}*|-(?=[\d.$(\\]))*(?:\\?\$)?{_EQ_NUMBER}(?:{_H}*\))*"
# "x" multiplies only between spaces ("3 x 4") or digits ("3x4"): "2x" and "x2" stay algebra.
_EQ_OPERATOR = rf"(?:{_H}*(?:[-+*/×÷·⋅]|\\times|\\cdot|\\div){_H}*|{_H}+x{_H}+|(?<=\d)x(?=\d))"
_EQ_SIDE_RE = re.compile(rf"{_EQ_OPERAND}(?:{_EQ_OPERATOR}{_EQ_OPERAND})*")
_EQ_BINARY_OPERATOR_RE = re.compile(rf"(?<=[\d)]){_EQ_OPERATOR}")
_EQ_FRACTION_RE = re.compile(rf"(\d+){_H}*/{_H}*(\d+)")
_EQ_LINK_RE = re.compile(
    rf"(?P<equals>{_H}*=(?![=>]){_H}*)"
    rf"|(?P<verbal>,?{_H}+(?:(?:which{_H}+)?(?:is(?:{_H}+(?:equal|equivalent){_H}+to)?|equals)"
    rf"|ergibt|ist(?:{_H}+gleich)?){_H}+)"
)
# Operators, a root and an en dash (a range, "3–5", or a minus sign): a number next to one belongs to more.
_OPERATOR_CHARS = "[-+*/×÷·⋅^√–]"
# Words that make a number next to them part of a longer expression ("3 times 4", "half of 8", "50 percent").
# "of" only after a fraction, percent or number: "the sum of 3 + 4 is 7" is fine, "half of 8 + 2" is not.
_OPERATOR_WORDS_BEFORE = (
    rf"(?:half|thirds?|quarters?|fourths?|fifths?|tenths?|percent|hälfte|drittel|viertel|prozent|[\d%]){_H}+(?:of|von)"
    r"|\b(?:times|by|plus|minus|over|per|than|twice|double|triple|x|cdot|div|mal|durch|pro|als)"
)
_OPERATOR_WORDS_AFTER = (
    r"times|more|less|fewer|per|percent|plus|minus|divided|multiplied|squared|cubed|x|and a half|dozen|hundred"
    r"|thousand|million|billion|trillion|mal|mehr|weniger|pro|prozent|durch|geteilt|hoch|hundert|tausend"
    r"|millionen|milliarden?"
)
# What, just before a chain, makes its first side the tail of something longer: a glued letter, digit or "%", a
# time or decimal ("10:30", "7,5"), an operator or operator word, a spaced ratio or division ("12 : 4", unlike the
# label in "Step 1: 10 + 20"), another number ("1 000") or a factor ("(1/2) 278 + 11").
_EQ_EXTENDS_LEFT_RE = re.compile(
    rf"(?:[\w.,:)%]|(?:{_OPERATOR_CHARS}|[\d)]|\d{_H}+:|{_OPERATOR_WORDS_BEFORE}){_H}*)\Z", re.IGNORECASE
)
# The same just after a chain: a glued unit ("5kg", "50%", "7€"), an operator, operator word, ratio or number.
_EQ_EXTENDS_RIGHT_RE = re.compile(
    rf"[\w%‰°(€£¥$–]|[.,:]\d|{_H}+:{_H}*\d|{_H}*(?:{_OPERATOR_CHARS}|\d|(?:{_OPERATOR_WORDS_AFTER})\b)",
    re.IGNORECASE,
)
_EQ_ANNOTATION_RE = re.compile(r"<<([^<>\n]*)>>|\{\{([^{}\n]*)\}\}")
# Markdown bold around a number ("= **39**", not "2**3") and list bullets ("- 3 + 4 = 7") are no operators.
_MARKDOWN_RE = re.compile(r"(?<![\w)])\*\*|\*\*(?![\w(])|^[^\S\n]*[-*+•](?=[^\S\n])", re.MULTILINE)
_EQ_LEADING_ZERO_RE = re.compile(r"(?<![\d.,])0\d")  # "05", "2023-10-01": codes and dates, not arithmetic
_EQ_DOT_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{3})+(?![\d.])")  # German grouping: "1.500"
_EQ_LATEX_RE = re.compile(r"\\(times|cdot|div)")
_EQ_PLAIN_DECIMAL_RE = re.compile(r"-?\d*\.(\d+)")
_EQ_TO_PYTHON = str.maketrans({"×": "*", "·": "*", "⋅": "*", "x": "*", "÷": "/", ",": None, "$": None, "\\": None})
_EQ_BINARY_OPERATIONS = {
    ast.Add: Fraction.__add__,
    ast.Sub: Fraction.__sub__,
    ast.Mult: Fraction.__mul__,
    ast.Div: Fraction.__truediv__,
}


def _equation_segments(text: str) -> list[str]:
    """The text with calculator annotations blanked, then each annotation's inside (``48/2=24`` of ``<<48/2=24>>``).

    The blanks are newlines, which no equation crosses: the outer ``48/2 = <<...>>24`` is not read as an equation.
    """
    outer = _EQ_ANNOTATION_RE.sub(lambda match: "\n" * len(match[0]), text)
    return [outer] + [inner or braced for inner, braced in _EQ_ANNOTATION_RE.findall(text)]


def _stands_alone(text: str, start: int, end: int) -> bool:
    """True if nothing glued or operator-like sits right before ``start`` or right after ``end``."""
    return not _EQ_EXTENDS_LEFT_RE.search(text[max(0, start - 20) : start]) and not _EQ_EXTENDS_RIGHT_RE.match(
        text, end
    )


def _computes(side: str) -> bool:
    """True if a side has an operator; a bare proper fraction names a part (``2/5 is 12.8 ha``), as a number does."""
    fraction = _EQ_FRACTION_RE.fullmatch(side)
    if fraction is not None:
        return int(fraction[1]) >= int(fraction[2])
    return _EQ_BINARY_OPERATOR_RE.search(side) is not None


def _equation_chains(text: str) -> Iterator[tuple[int, int, list[str]]]:
    """Each simple arithmetic equation in ``text``: its start, its end and its sides.

    Sides are pure arithmetic joined by ``=`` or a verbal link; a verbal link counts only after a side that computes
    (:func:`_computes`: ``180 + 6 is 186``; ``120 minutes, which is 2`` states no arithmetic). A chain where no side
    computes, or that does not stand alone (:func:`_stands_alone`), is no simple equation. Parentheses that only
    enclose the whole chain (``(3 + 4 = 7)``) are dropped.
    """
    pos = 0
    while (first := _EQ_SIDE_RE.search(text, pos)) is not None:
        spans = [first.span()]
        while (link := _EQ_LINK_RE.match(text, spans[-1][1])) and (side := _EQ_SIDE_RE.match(text, link.end())):
            if link["verbal"] and not _computes(text[slice(*spans[-1])]):
                break
            spans.append(side.span())
        pos = spans[-1][1]
        sides = [text[start:end] for start, end in spans]
        if len(sides) < 2 or not _stands_alone(text, spans[0][0], pos):
            continue
        if not any(_computes(side) for side in sides):
            continue
        while sides[0].startswith("(") and sides[0].count("(") > sides[0].count(")"):
            sides[0] = sides[0][1:].lstrip()
        while sides[-1].endswith(")") and sides[-1].count(")") > sides[-1].count("("):
            sides[-1] = sides[-1][:-1].rstrip()
        yield spans[0][1] - len(sides[0]), spans[-1][0] + len(sides[-1]), sides


def _to_python(side: str, dot_thousands: bool) -> str | None:
    """A side as a Python expression (``$1,000 × 3`` -> ``1000 * 3``), or None if a number has a leading zero.

    ``dot_thousands`` reads ``1.500`` as 1500, the German grouping.
    """
    if _EQ_LEADING_ZERO_RE.search(side):
        return None
    if dot_thousands:
        side = _EQ_DOT_THOUSANDS_RE.sub(lambda match: match[0].replace(".", ""), side)
    return _EQ_LATEX_RE.sub(lambda match: "/" if match[1] == "div" else "*", side).translate(_EQ_TO_PYTHON).strip()


def _evaluate(code: str) -> Fraction | None:
    """The exact value of a Python arithmetic expression, or None if it does not parse or divides by zero.

    Only numbers, ``+ - * /`` and parentheses are walked (no ``eval``); numbers are read from their text, so
    ``3.33`` is exactly 333/100.
    """

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(ast.get_source_segment(code, node))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _EQ_BINARY_OPERATIONS:
            return _EQ_BINARY_OPERATIONS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"not arithmetic: {ast.dump(node)}")

    try:
        return walk(ast.parse(code, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def _chain_holds(sides: list[str]) -> bool | None:
    """Whether all sides have the same value; None if a side cannot be evaluated.

    A side that is a plain decimal may show its value rounded up or down to its decimals (``10 / 3 = 3.33``, a
    truncated ``2 / 3 = 0.66``); integers compare exactly. Numbers like ``1.500`` also get the German reading, 1500:
    a chain that holds under either reading holds.
    """
    readings = (False, True) if any(_EQ_DOT_THOUSANDS_RE.search(side) for side in sides) else (False,)
    for dot_thousands in readings:
        codes = [_to_python(side, dot_thousands) for side in sides]
        values = [None if code is None else _evaluate(code) for code in codes]
        if None in values:
            return None
        tolerances = [
            Fraction(1, 10 ** len(match[1])) if (match := _EQ_PLAIN_DECIMAL_RE.fullmatch(code)) else 0
            for code in codes
        ]
        if all(
            abs(values[i] - values[j]) < max(tolerances[i], tolerances[j]) or values[i] == values[j]
            for i in range(len(values))
            for j in range(i + 1, len(values))
        ):
            return True
    return False


def false_equations(text: str) -> list[str]:
    """Every simple arithmetic equation in ``text`` that does not hold, as the text of its chain.

    A simple equation is a chain of two or more pure arithmetic sides (numbers such as ``1,000``, ``$5`` or
    ``2.5``; ``+ - * / × ÷``, ``x`` between numbers; parentheses) joined by ``=`` or a verbal link (``is``,
    ``which is``, ``equals``, ``is equal to``, ``is equivalent to``, ``ergibt``, ``ist``). Calculator annotations
    (``<<48/2=24>>``, ``{{48/2=24}}``) are read on their own. Anything unclear is skipped, never judged: words or
    units in or glued to a side, a side that continues an expression (``hours + 3 = 5``, ``3 times 4 = 12``), a
    chain without operator (``50% of 20 = 10``), dates, times, leading zeros, a division by zero. So a flagged
    equation is wrong arithmetic, which a last-number check cannot see.
    """
    found = []
    for segment in _equation_segments(text):
        # Both substitutions keep the length, so a chain's span points into the original segment.
        cleaned = _MARKDOWN_RE.sub(lambda match: " " * len(match[0]), segment.replace(_UNICODE_MINUS, "-"))
        for start, end, sides in _equation_chains(cleaned):
            if _chain_holds(sides) is False:
                found.append(segment[start:end])
    return found


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
