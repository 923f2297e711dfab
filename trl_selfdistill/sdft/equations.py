"""Simple arithmetic equations in a text, and which of them are false: what the `"math_strict"` checker adds.

A last-number check passes a rewrite that reaches the right number through wrong working (``91 + 95 is equivalent to
180 + 6, which is 166. So, the answer is 186.``). :func:`false_equations` finds the equations a reader would check by
hand (``=`` chains and verbal links between arithmetic), evaluates them exactly and returns those that do not hold;
anything it cannot read for certain it skips, so a flagged equation is wrong arithmetic.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from fractions import Fraction

_UNICODE_MINUS = "\u2212"

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
