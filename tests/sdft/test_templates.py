"""Distillation prompts of SDFT (Yang et al., ACL 2024; the official prompts, as the README describes them)."""

from __future__ import annotations

import dataclasses

import pytest

from trl_selfdistill.sdft.templates import (
    CODE_TEMPLATE,
    GENERAL_TEMPLATE,
    MATH_TEMPLATE,
    TEMPLATES,
    DistillTemplate,
    check_renderable,
    fill_placeholders,
    render_prompt,
    resolve_template,
)

GENERAL_SYSTEM = (
    "Below are an instruction that describes a task along with a reference answer. "
    "Using the reference answer as a guide, write your own response."
)
CODE_SYSTEM = (
    "Below are an instruction that describes a task along with a reference answer. "
    "Refer to the reference answer and write your own response."
)
MATH_SYSTEM = (
    "You are an expert in math. Below are a math question and its reference answer. "
    "Refer to the reference answer and write a response that appropriately answers the question."
)
LEAD_IN = "Great! Let's think step by step. "


# ---------------------------------------------------------------- built-ins


def test_builtin_strings():
    assert GENERAL_TEMPLATE.system == GENERAL_SYSTEM
    assert CODE_TEMPLATE.system == CODE_SYSTEM
    assert MATH_TEMPLATE.system == MATH_SYSTEM
    user = "### Instruction:\n{instruction}\n\n### Reference Answer:\n{reference}\n\n### Response:\n"
    assert GENERAL_TEMPLATE.user == CODE_TEMPLATE.user == user
    assert MATH_TEMPLATE.user == "{instruction}\n\n{reference}"
    assert MATH_TEMPLATE.lead_in == LEAD_IN
    assert GENERAL_TEMPLATE.lead_in == CODE_TEMPLATE.lead_in == ""
    assert TEMPLATES["gsm8k"] is MATH_TEMPLATE
    assert {"general", "code", "math", "gsm8k"} <= set(TEMPLATES)


def test_template_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MATH_TEMPLATE.system = "x"


# ---------------------------------------------------------------- resolve_template


@pytest.mark.parametrize("name", ["general", "code", "math", "gsm8k"])
def test_resolve_builtin(name):
    assert resolve_template(name) is TEMPLATES[name]


@pytest.mark.parametrize(
    "checker_name, expected",
    [("math", MATH_TEMPLATE), ("code", CODE_TEMPLATE), ("function_call", CODE_TEMPLATE), ("none", GENERAL_TEMPLATE)],
)
def test_resolve_auto(checker_name, expected):
    assert resolve_template("auto", checker_name) is expected


def test_resolve_auto_without_checker():
    assert resolve_template("auto") is GENERAL_TEMPLATE
    assert resolve_template("auto", None) is GENERAL_TEMPLATE


def test_resolve_custom():
    template = resolve_template("Q: {instruction}\nHint {not a placeholder}: {reference}\nA:")
    assert template.system is None
    assert template.lead_in == ""
    assert template.user == "Q: {instruction}\nHint {not a placeholder}: {reference}\nA:"


def test_resolve_passes_template_through():
    custom = DistillTemplate(name="mine", system="S", user="{instruction} {reference}", lead_in="L ")
    assert resolve_template(custom) is custom


@pytest.mark.parametrize("spec", ["alpaca", "Q: {instruction} only", "{reference} only", ""])
def test_resolve_unknown(spec):
    with pytest.raises(ValueError) as info:
        resolve_template(spec)
    message = str(info.value)
    assert repr(spec) in message
    for name in ("general", "code", "math", "auto"):
        assert name in message
    assert "{instruction}" in message and "{reference}" in message


def test_fill_placeholders_leaves_other_braces_and_does_not_resubstitute():
    text = fill_placeholders("{a} {instruction} {{x}} {reference}", instruction="I {reference}", reference="R {0}")
    assert text == "{a} I {reference} {{x}} R {0}"


# ---------------------------------------------------------------- raw mode


def test_raw_math_is_the_official_string(tiny_tokenizer):
    instruction = "Natalia sold clips to 48 of her friends. How many clips did she sell?"
    reference = "Natalia sold 48+24 = 72 clips.\n#### 72"
    text = render_prompt(MATH_TEMPLATE, instruction, reference, tiny_tokenizer, mode="raw")
    expected = (
        f"<<SYS>>\n{MATH_SYSTEM}\n<</SYS>>\n\n"
        f"[INST] {instruction}\n\n{reference} [/INST] Great! Let's think step by step. "
    )
    assert text == "<s>" + expected
    assert text.endswith(LEAD_IN)


def test_raw_general_and_code(tiny_tokenizer):
    text = render_prompt(GENERAL_TEMPLATE, "Say hi.", "Hi!", tiny_tokenizer, mode="raw")
    assert text == (
        f"<s>{GENERAL_SYSTEM}\n\n### Instruction:\nSay hi.\n\n### Reference Answer:\nHi!\n\n### Response:\n"
    )
    text = render_prompt(CODE_TEMPLATE, "Add.", "def add(a, b): return a + b", tiny_tokenizer, mode="raw")
    assert text.startswith(f"<s>{CODE_SYSTEM}\n\n### Instruction:\nAdd.\n\n")
    assert text.endswith("### Reference Answer:\ndef add(a, b): return a + b\n\n### Response:\n")


def test_raw_strips_inputs_and_keeps_braces(tiny_tokenizer):
    text = render_prompt(MATH_TEMPLATE, "  x = {y}?\n", "\n{reference} is 3 {0}  ", tiny_tokenizer, mode="raw")
    assert "[INST] x = {y}?\n\n{reference} is 3 {0} [/INST] " in text


def test_raw_without_bos(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(with_bos=False)
    text = render_prompt(MATH_TEMPLATE, "q", "a", tokenizer, mode="raw")
    assert text.startswith("<<SYS>>\n")


def test_raw_bos_token_that_is_not_added(make_tiny_tokenizer):
    # Like SmolLM2: a bos_token is declared, but encoding never adds it, so raw mode must not either.
    tokenizer = make_tiny_tokenizer(with_bos=False)
    tokenizer.bos_token = "<s>"
    assert tokenizer("q")["input_ids"][0] != tokenizer.bos_token_id
    assert render_prompt(MATH_TEMPLATE, "q", "a", tokenizer, mode="raw").startswith("<<SYS>>\n")


def test_raw_without_tokenizer():
    assert render_prompt(GENERAL_TEMPLATE, "q", "a", None, mode="raw").startswith(GENERAL_SYSTEM + "\n\n")


def test_raw_custom_template(tiny_tokenizer):
    template = resolve_template('Rewrite {reference} for {instruction} as {"style": "plain"}.')
    text = render_prompt(template, "task", "ref", tiny_tokenizer, mode="raw")
    assert text == '<s>Rewrite ref for task as {"style": "plain"}.'  # braces that name no placeholder are text


def test_raw_needs_no_chat_template(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(chat_template=None)
    check_renderable(tokenizer, "raw")
    assert render_prompt(GENERAL_TEMPLATE, "q", "a", tokenizer, mode="raw").startswith("<s>Below are")


# ---------------------------------------------------------------- chat mode


@pytest.mark.parametrize("template", [GENERAL_TEMPLATE, CODE_TEMPLATE, MATH_TEMPLATE])
def test_chat_mode_order_and_lead_in(tiny_tokenizer, template):
    instruction, reference = "What is 6 * 12?", "6 * 12 = 72\n#### 72"
    text = render_prompt(template, instruction, reference, tiny_tokenizer, mode="chat")
    user = template.user.replace("{instruction}", instruction).replace("{reference}", reference)
    assert text.startswith("<s>")
    positions = [
        text.index("<|system|>\n" + template.system),
        text.index("<|user|>\n" + user),
        text.index("<|assistant|>\n"),
    ]
    assert positions == sorted(positions)
    assert text.endswith("<|assistant|>\n" + template.lead_in)


def test_chat_mode_custom_template_has_no_system(tiny_tokenizer):
    template = resolve_template("{instruction} -> {reference} {}")
    text = render_prompt(template, "a", "b", tiny_tokenizer, mode="chat")
    assert text == "<s><|user|>\na -> b {}</s>\n<|assistant|>\n"


def test_chat_mode_folds_system_when_template_rejects_it(make_tiny_tokenizer):
    gemma_like = (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "<turn>{{ message['content'] }}</turn>{% endfor %}{% if add_generation_prompt %}<model>{% endif %}"
    )
    tokenizer = make_tiny_tokenizer(chat_template=gemma_like)
    text = render_prompt(MATH_TEMPLATE, "q", "a", tokenizer, mode="chat")
    assert text == f"<s><turn>{MATH_SYSTEM}\n\nq\n\na</turn><model>{LEAD_IN}"


def test_tokenized_chat_prompt_round_trips(tiny_tokenizer):
    text = render_prompt(MATH_TEMPLATE, "q", "a", tiny_tokenizer, mode="chat")
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ids) == text


# ---------------------------------------------------------------- check_renderable


def test_no_chat_template_error(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(chat_template=None)
    with pytest.raises(ValueError) as info:
        render_prompt(GENERAL_TEMPLATE, "q", "a", tokenizer, mode="chat")
    message = str(info.value)
    assert "chat_template" in message and "chat_template_path" in message and "raw" in message
    with pytest.raises(ValueError):
        check_renderable(tokenizer, "chat")


def test_unknown_mode():
    with pytest.raises(ValueError, match="'jinja'"):
        check_renderable(None, "jinja")


def test_check_renderable_ok(tiny_tokenizer):
    check_renderable(tiny_tokenizer, "chat")
    check_renderable(tiny_tokenizer, "raw")
