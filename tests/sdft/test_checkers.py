"""Acceptance rules of SDFT (Yang et al., ACL 2024; the rules of its official code, as the README describes them)."""

from __future__ import annotations

import pytest

from trl_selfdistill.sdft.checkers import (
    BANNED_PHRASES,
    CHECKERS,
    EXTRA_BANNED_PHRASES,
    OFFICIAL_BANNED_PHRASES,
    accept_all,
    code_checker,
    contains_banned_phrase,
    extract_last_number,
    function_call_checker,
    get_checker,
    math_checker,
    normalize_function_call,
    rejection_reason,
)

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
    assert set(CHECKERS) == {"math", "function_call", "code", "none"}
    assert get_checker("math") is math_checker
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
