"""Acceptance rules of SDFT (Yang et al., ACL 2024; the rules of its official code, as the README describes them)."""

from __future__ import annotations

import pytest

from trl_selfdistill.data import ADDITION_STYLES, bundled_addition, bundled_gsm8k
from trl_selfdistill.sdft.checkers import (
    BANNED_PHRASES,
    CHECKERS,
    EXTRA_BANNED_PHRASES,
    OFFICIAL_BANNED_PHRASES,
    accept_all,
    code_checker,
    contains_banned_phrase,
    extract_last_number,
    false_equations,
    function_call_checker,
    get_checker,
    math_checker,
    math_strict_checker,
    normalize_function_call,
    rejection_reason,
)
from trl_selfdistill.sdft.templates import MATH_TEMPLATE, resolve_template

# ---------------------------------------------------------------- extract_last_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 72", 72),
        ("The answer is 72.", 72),
        ("It costs 1,000 dollars.", 1000),
        ("It costs 1 000 dollars", 1000),
        ("1,234,567", 1234567),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", 72),
        ("so the total is -5", -5),
        ("12.0", 12),
        ("12.00 apples", 12),
        ("-3.0", -3),
        ("first 3 then 4 then 5 apples and more text", 5),
        ("0", 0),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no number here",
        "The answer is 12.5",
        "pi is about 3.14",
        "12\n34",  # a number split by a newline is not an integer (as int() fails in the official code)
    ],
)
def test_extract_last_number_none(text):
    assert extract_last_number(text) is None


def test_extract_last_number_reads_a_unicode_minus_as_a_sign():
    # Deviation from the official regex (ASCII "-" only), which read "\u22125" as 5.
    assert extract_last_number("so the total is \u22125") == -5
    assert extract_last_number("The answer is \u22121,200.") == -1200
    assert math_checker("The change is \u22125 degrees.", "#### -5", {})
    assert not math_checker("The change is \u22125 degrees.", "#### 5", {})
    # An en dash is a range, not a sign: "3\u20135" still ends with 5.
    assert extract_last_number("between 3\u20135 apples") == 5


def test_extract_last_number_on_official_gsm8k_references():
    assert extract_last_number("The answer is 72.") == 72
    assert extract_last_number("so 2,125 in all.\nThe answer is 2,125.") == 2125


# ---------------------------------------------------------------- math


def test_math_checker_gsm8k_reference():
    reference = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert math_checker("She sold 24 in May, so 48 + 24 = 72 in total. The answer is 72.", reference, {})
    assert not math_checker("She sold 70 clips in total.", reference, {})


@pytest.mark.parametrize(
    "rewrite, reference, expected",
    [
        ("The answer is 1,000.", "#### 1000", True),
        ("The answer is 1000", "#### 1,000", True),
        ("The answer is 12.0", "#### 12", True),
        ("The answer is 12.5", "#### 12", False),
        ("The answer is 12.5", "#### 12.5", False),  # non-integers never match, even each other
        ("The answer is -7 degrees", "#### -7", True),
        ("The answer is 7 degrees", "#### -7", False),
        ("The answer is 72. I hope this helps!", "#### 72", True),
        ("72 is the answer, out of 100 tries", "#### 72", False),  # the *last* number counts
        ("I don't know.", "#### 72", False),
        ("I don't know.", "no number", False),  # no number on either side: reject
        ("The answer is 72", "no number", False),
    ],
)
def test_math_checker_cases(rewrite, reference, expected):
    assert math_checker(rewrite, reference, {}) is expected


# ---------------------------------------------------------------- function calling


def test_normalize_function_call():
    assert normalize_function_call("  f( 'a',   'b' )\n") == 'f( "a","b" )'
    assert normalize_function_call('get(x="1", y="2")') == 'get(x="1",y="2")'


@pytest.mark.parametrize(
    "rewrite, expected",
    [
        ("get_weather(city='Paris', unit='C')", True),
        ('Sure! Call get_weather(city="Paris", unit="C") to do it.', True),
        ("Sure!\nget_weather(city='Paris',\n   unit='C')", True),
        ("get_weather(city='London', unit='C')", False),
        ("my_get_weather(city='Paris', unit='C')", False),  # word boundary before the name
        ("I cannot help with that.", False),
    ],
)
def test_function_call_checker(rewrite, expected):
    reference = "get_weather(city='Paris', unit='C')"
    assert function_call_checker(rewrite, reference, {}) is expected


def test_function_call_checker_dotted_name():
    reference = 'requests.get(url="https://x.org", params={"q": "a b"})'
    assert function_call_checker("Use requests.get(url='https://x.org', params={'q': 'a b'})", reference, {})


def test_function_call_checker_reference_without_call():
    # Not a call at all (the official code raises): the normalised reference must appear verbatim.
    assert function_call_checker("answer: 'foo', 'bar' done", "'foo', 'bar'", {})
    assert not function_call_checker("answer: foo", "'foo', 'bar'", {})
    assert not function_call_checker("anything", "   ", {})


# ---------------------------------------------------------------- code


@pytest.mark.parametrize(
    "rewrite, expected",
    [
        ("Here is the code:\n```python\nprint(1)\n```", True),
        ("I have written it:\n```python\nprint(1)\n```", True),
        ("I implemented it.\n```python\nx = 1\n```", True),
        ("\n  Here is the code:\n```python\nprint(1)\n```  ", True),  # stripped first, as officially
        ("Here is the code:\n```\nprint(1)\n```", False),  # no ```python block
        ("Sure! Here is the code:\n```python\nprint(1)\n```", False),  # wrong opening
        ("here is the code:\n```python\nprint(1)\n```", False),  # case-sensitive opening
    ],
)
def test_code_checker(rewrite, expected):
    assert code_checker(rewrite, "ref", {}) is expected


def test_accept_all():
    assert accept_all("", "", {}) is True
    assert accept_all("anything", "ref", {"x": 1}) is True


# ---------------------------------------------------------------- banned phrases


def test_banned_phrases_are_the_official_ones_plus_the_documented_extra():
    assert set(OFFICIAL_BANNED_PHRASES) == {
        "reference answer",
        "your response",
        "my response",
        "your own response",
        "now it's your turn",
    }
    assert EXTRA_BANNED_PHRASES == ("reference solution",)
    assert BANNED_PHRASES == OFFICIAL_BANNED_PHRASES + EXTRA_BANNED_PHRASES


@pytest.mark.parametrize(
    "rewrite",
    [
        "Following the reference solution, 48/2 = 24 and 48 + 24 = 72. The answer is 72.",
        "As the Reference Solution shows, the answer is 72.",
        "The reference solution is right: 72.",
    ],
)
def test_rewrites_citing_the_reference_solution_are_rejected(rewrite):
    assert rejection_reason(rewrite, "#### 72", {}, math_checker) == "banned_phrase"


@pytest.mark.parametrize("phrase", OFFICIAL_BANNED_PHRASES)
def test_official_phrases_are_still_rejected(phrase):
    assert rejection_reason(f"So, {phrase}: the answer is 72.", "#### 72", {}, math_checker) == "banned_phrase"


def test_a_bare_reference_is_not_banned():
    # Deliberately narrow: "the reference" alone also names ordinary things.
    assert rejection_reason("Take the reference point at 0; the answer is 72.", "#### 72", {}, math_checker) is None


@pytest.mark.parametrize("phrase", BANNED_PHRASES)
def test_banned_phrase_case_insensitive(phrase):
    assert contains_banned_phrase(f"Well. {phrase.upper()} is here.")
    assert contains_banned_phrase(f"Well. {phrase.title()} is here.")


def test_your_turn_prefix():
    assert contains_banned_phrase("Your turn! What is 2+2?")
    assert contains_banned_phrase("  Your turn to answer.")
    assert not contains_banned_phrase("your turn to answer.")  # the prefix rule is case-sensitive
    assert not contains_banned_phrase("It is now your turn.")  # only at the start
    assert contains_banned_phrase("And now it's your turn.")  # ...but this phrase is banned anywhere
    assert not contains_banned_phrase("The answer is 72.")


# ---------------------------------------------------------------- get_checker


def test_get_checker_names():
    assert set(CHECKERS) == {"math", "math_strict", "function_call", "code", "none"}
    assert get_checker("math") is math_checker
    assert get_checker("math_strict") is math_strict_checker
    assert get_checker("function_call") is function_call_checker
    assert get_checker("code") is code_checker
    assert get_checker("none") is accept_all


def test_get_checker_passes_callable_through():
    def custom(rewrite, reference, row):
        return len(rewrite) > 3

    assert get_checker(custom) is custom


def test_get_checker_unknown_name():
    with pytest.raises(ValueError, match="'gsm8k'") as info:
        get_checker("gsm8k")
    for name in CHECKERS:
        assert name in str(info.value)


def test_get_checker_not_str_not_callable():
    with pytest.raises(ValueError, match="int"):
        get_checker(3)


# ---------------------------------------------------------------- rejection_reason


def test_rejection_reason_order():
    always_false = lambda rewrite, reference, row: False  # noqa: E731
    assert rejection_reason("   \n", "ref", {}, always_false) == "empty"
    assert rejection_reason("", "ref", {}, accept_all) == "empty"
    assert rejection_reason("As the reference answer says, 72.", "#### 72", {}, always_false) == "banned_phrase"
    assert rejection_reason("As the Reference Answer says, 72.", "#### 72", {}, math_checker) == "banned_phrase"
    assert rejection_reason("Your turn: 72", "#### 72", {}, math_checker) == "banned_phrase"
    assert rejection_reason("The answer is 71.", "#### 72", {}, math_checker) == "checker"
    assert rejection_reason("The answer is 72.", "#### 72", {}, math_checker) is None
    assert rejection_reason("Anything goes.", "ref", {}, accept_all) is None


def test_rejection_reason_passes_row_to_checker():
    seen = []

    def custom(rewrite, reference, row):
        seen.append((rewrite, reference, row))
        return row["ok"]

    assert rejection_reason("text", "ref", {"ok": True}, custom) is None
    assert rejection_reason("text", "ref", {"ok": False}, custom) == "checker"
    assert seen[0] == ("text", "ref", {"ok": True})


# ---------------------------------------------------------------- math_strict: false equations


@pytest.mark.parametrize(
    "text, expected",
    [
        ("90 + 90 = 180 + 6 = 186", ["90 + 90 = 180 + 6 = 186"]),  # sides 180, 186, 186
        ("97 + 25 = 120, which is 122. The answer is 122.", ["97 + 25 = 120"]),  # "120, which is 122": no operator
        (
            "91 + 95 is equivalent to 180 + 6, which is 166. So, the answer is indeed 186.",
            ["91 + 95 is equivalent to 180 + 6, which is 166"],
        ),
        ("Zusammen ergibt das 30 + 9 = 38.\nDie Antwort lautet 38.", ["30 + 9 = 38"]),
        ("30 + 9 ergibt 38", ["30 + 9 ergibt 38"]),
        ("30 + 9 ist gleich 38", ["30 + 9 ist gleich 38"]),
        ("180 + 6 is 166", ["180 + 6 is 166"]),
        ("180 + 6 equals 166", ["180 + 6 equals 166"]),
        ("180 + 6 is equal to 166", ["180 + 6 is equal to 166"]),
        ("2 + 3 = 5, 5 + 1 = 7 and 7 + 1 = 8", ["5 + 1 = 7"]),
        ("He paid $1,000 x 3 = $3,100.", ["$1,000 x 3 = $3,100"]),
        ("3x4 = 13", ["3x4 = 13"]),
        ("(2 + 3) × 4 = 21, and 9 ÷ 3 = 4", ["(2 + 3) × 4 = 21", "9 ÷ 3 = 4"]),
        ("10 \\times 3 = 31", ["10 \\times 3 = 31"]),
        ("So (3 + 4 = 8).", ["3 + 4 = 8"]),  # parentheses around the whole chain are dropped
        ("30 + 9 = **38**", ["30 + 9 = **38"]),  # Markdown bold is no operator
        ("- 3 + 4 = 8", ["3 + 4 = 8"]),  # nor a list bullet
        ("Step 1: 10 + 20 = 31", ["10 + 20 = 31"]),  # a label, not a ratio
        ("5 \u2212 8 = \u22122", ["5 \u2212 8 = \u22122"]),
        ("10 / 3 = 3", ["10 / 3 = 3"]),  # integers compare exactly
        ("0.1 + 0.2 = 0.4", ["0.1 + 0.2 = 0.4"]),  # 0.3 rounds to neither 0.4 nor anything one decimal away
    ],
)
def test_false_equations_catches_wrong_arithmetic(text, expected):
    assert false_equations(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "17 + 22 = (10 + 20) + (7 + 2) = 30 + 9 = 39.\nThe answer is 39.",
        "91 + 95 is equivalent to 180 + 6, which is 186.",
        "So 5 - 8 = -3, -(3 + 4) = -7 and 3 - -2 = 5.",
        "She sold 48 / 2 = 24 clips, paying $5.00 + $3.50 = $8.50 and 1/2 * 1/2 = 1/4 of it.",
        "Total: 1,234 + 1 = 1,235; 2 · 3 + 4 = 10; a = 3 + 4 = 7.",
        "10 / 3 = 3.33, 20 / 3 = 6.66 (truncated), 10/3 = 3.3333333333333333333 and 0.05 + 0.04 = 0.1",
        "1.000 + 500 = 1.500",  # German grouping: 1000 + 500 = 1500
        "90 + 90 = 180, which is the answer. So, the answer is 186.",  # true equations, wrong reasoning
    ],
)
def test_false_equations_accepts_true_arithmetic(text):
    assert false_equations(text) == []


@pytest.mark.parametrize(
    "text",
    [
        "3 apples + 2 = 5 apples",  # the 2 belongs to "3 apples + 2"
        "hours + 3 = 5",
        "x2 = 4",
        "2x = 10",
        "2x + 3 = 5",
        "50% of 20 = 10",
        "20% + 30% = 60%",
        "5kg = 5000g",
        "2 + 3 = 6kg",
        "Born 2023-10-01, at 10:30; 10:30 + 2 = 11",
        "No equation here, only 3 numbers: 4 and 5.",
        "3 times 4 = 13",
        "half of 8 + 2 = 6",
        "Die Hälfte von 8 + 2 = 6",
        "2 hours x 3 = 7 hours",
        "5 + 5 = 10 times 2 = 21",
        "1/2 = 50 percent",
        "Since 2/5 is equal to 12.8 hectares, 1/5 is equal to 12.8/2 = 6.4 hectares.",  # 2/5 names a part
        "Nikita = (1/2) 278 + 11 = 150 points",  # implied factor
        "0.5 + 0.5 = 2 thousand",
        "7,5 + 2 = 9,5",  # decimal comma
        "1 000 + 5 = 1 005",  # space-grouped thousands
        "12 : 4 + 1 = 4",  # German division
        "10 \u2013 3 + 2 = 9",  # en dash
        "2(3 + 4) = 7",  # implied multiplication
        "COVID-19 + 1 = 21",
        "07 + 1 = 9",  # leading zero: a code, not a number
        "5 / 0 = 3",
        "3 + (4 = 8)",
        "5 + 3 == 9",
        "12 = 13",  # no operator
        "17 + 22 is 40 more than 1",
        "$3 + 4 = 8$",  # LaTeX math mode: "8$" reads as a unit
        "\\frac{1}{2} \\times 4 = 3",
        "2**3 = 9",
    ],
)
def test_false_equations_skips_what_is_not_a_simple_equation(text):
    assert false_equations(text) == []


def test_false_equations_reads_calculator_annotations_on_their_own():
    # The inside of an annotation is an equation; the outer "48/2 = <<" is not.
    assert false_equations("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 24") == []
    assert false_equations("Natalia sold 48/2 = <<48/2=25>>24 clips.\n#### 24") == ["48/2=25"]
    assert false_equations("Tens: 10+20={{10+20=31}}30. Ones: 7+2={{7+2=9}}9.") == ["10+20=31"]
    assert false_equations("It costs 3*.5=<<3*.5=1.5>>1.5 dollars.") == []


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("style", ADDITION_STYLES)
def test_false_equations_passes_every_bundled_addition_reference(style, split):
    for row in bundled_addition(split, style=style):
        assert false_equations(row["answer"]) == [], row["answer"]
        assert math_strict_checker(row["answer"], row["answer"], row)


def test_false_equations_on_the_bundled_gsm8k_references():
    # Two of the 200 references hold a genuine slip, both with the final answer of the data set unaffected by it:
    # row 167 writes 192 * 100 = 1920 (the data set's answer, 1920, repeats the slip; the true cost is 19200), row
    # 198 writes 6/3 = .5 for 3/6 = .5 (the answer, 30 minutes, is right).
    flagged = {index: false_equations(row["answer"]) for index, row in enumerate(bundled_gsm8k("train"))}
    assert {index: found for index, found in flagged.items() if found} == {167: ["192*100=$1920"], 198: ["6/3=.5"]}


@pytest.mark.parametrize(
    "rewrite, expected",
    [
        ("91 + 95 = (90 + 90) + (1 + 5) = 180 + 6 = 186.\nThe answer is 186.", True),
        ("91 + 95 is equivalent to 180 + 6, which is 166. So, the answer is indeed 186.", False),
        ("90 + 90 = 180 + 6 = 186. The answer is 186.", False),
        ("91 + 95 = 185. The answer is 185.", False),  # the last number is wrong (math_checker)
        ("91 + 95 = 186. The answer is 185.", False),
        # Not caught: every equation holds, the last number is right, but nothing derives 186.
        ("90 + 90 = 180, which is the answer. So, the answer is 186.", True),
    ],
)
def test_math_strict_checker(rewrite, expected):
    assert math_strict_checker(rewrite, "91 + 95 = 186.\nThe answer is 186.", {}) is expected
    assert rejection_reason(rewrite, "#### 186", {}, math_strict_checker) == (None if expected else "checker")


def test_math_strict_picks_the_math_template():
    assert resolve_template("auto", "math_strict") is MATH_TEMPLATE
