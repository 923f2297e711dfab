"""Distillation prompts for SDFT.

SDFT (Self-Distillation Fine-Tuning; Yang et al., ACL 2024, arXiv 2402.13669) asks the seed model to
rewrite each reference response in its own words. The built-in templates are the official prompts of
the paper's code (sail-sg/sdft, ``src/llmtuner/data/template.py`` of its ``reproduce`` branch; ``main``
has the same texts in ``main.py``: ``alpaca_distill_using`` for general data, ``alpaca_distill_refer`` for
code and function calling, ``gsm8k_distill`` for math); the README's
`sdft_template` entry summarises them.

Two renderings:

- ``"chat"`` (default): system + user messages through the tokenizer's own chat template, generation
  prompt added, then the forced lead-in.
- ``"raw"``: the exact strings the official code fed Llama-2-7b-chat, for a faithful reproduction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jinja2.exceptions import TemplateError

from ..generation.base import bos_added_on_encoding

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


__all__ = [
    "CODE_TEMPLATE",
    "GENERAL_TEMPLATE",
    "MATH_TEMPLATE",
    "RENDER_MODES",
    "TEMPLATES",
    "DistillTemplate",
    "check_renderable",
    "fill_placeholders",
    "render_prompt",
    "resolve_template",
]

RENDER_MODES: tuple[str, ...] = ("chat", "raw")
_PLACEHOLDER_RE = re.compile(r"\{(instruction|reference|system)\}")
_NAMED_BRACES_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # what str.format would take for a placeholder


@dataclass(frozen=True)
class DistillTemplate:
    """A distillation prompt.

    ``user`` holds ``{instruction}`` and ``{reference}``. ``lead_in`` is forced at the start of the
    model's turn (it is not part of the generated response). ``raw`` is the full raw-mode string with
    ``{system}``, ``{instruction}`` and ``{reference}`` placeholders; when None, raw mode renders
    ``{system}\\n\\n{user}{lead_in}`` (the official rendering of a system + prompt template) or
    ``{user}{lead_in}`` without a system text.
    """

    name: str
    system: str | None
    user: str
    lead_in: str = ""
    raw: str | None = None


_DISTILL_USER = "### Instruction:\n{instruction}\n\n### Reference Answer:\n{reference}\n\n### Response:\n"
_DISTILL_SYSTEM_PREFIX = "Below are an instruction that describes a task along with a reference answer. "

# Official "alpaca_distill_using" (Alpaca, Dolly, LIMA, OpenHermes). Official raw rendering:
# BOS + system + sep "\n\n" + prompt (sail-sg/sdft src/llmtuner/data/template.py, Template._encode).
GENERAL_TEMPLATE = DistillTemplate(
    name="general",
    system=_DISTILL_SYSTEM_PREFIX + "Using the reference answer as a guide, write your own response.",
    user=_DISTILL_USER,
    raw="{system}\n\n" + _DISTILL_USER,
)

# Official "alpaca_distill_refer" (MagiCoder, OpenFunctions); same rendering as general.
CODE_TEMPLATE = DistillTemplate(
    name="code",
    system=_DISTILL_SYSTEM_PREFIX + "Refer to the reference answer and write your own response.",
    user=_DISTILL_USER,
    raw="{system}\n\n" + _DISTILL_USER,
)

# Official "gsm8k_distill": BOS + "<<SYS>>...<</SYS>>\n\n" + "[INST] ... [/INST] Great! Let's think step by step. "
_MATH_LEAD_IN = "Great! Let's think step by step. "
MATH_TEMPLATE = DistillTemplate(
    name="math",
    system=(
        "You are an expert in math. Below are a math question and its reference answer. "
        "Refer to the reference answer and write a response that appropriately answers the question."
    ),
    user="{instruction}\n\n{reference}",
    lead_in=_MATH_LEAD_IN,
    raw="<<SYS>>\n{system}\n<</SYS>>\n\n[INST] {instruction}\n\n{reference} [/INST] " + _MATH_LEAD_IN,
)

TEMPLATES: dict[str, DistillTemplate] = {
    "general": GENERAL_TEMPLATE,
    "code": CODE_TEMPLATE,
    "math": MATH_TEMPLATE,
    "gsm8k": MATH_TEMPLATE,
}

_AUTO_BY_CHECKER = {"math": "math", "math_strict": "math", "code": "code", "function_call": "code"}


def fill_placeholders(text: str, **values: str) -> str:
    """Replace ``{instruction}``, ``{reference}`` and ``{system}`` found in ``values``, in one pass.

    Unlike ``str.format``, any other braces are left as they are, and braces inside the values are
    never substituted again.
    """
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), text)


def resolve_template(spec: str | DistillTemplate, checker_name: str | None = None) -> DistillTemplate:
    """Resolve a template name, ``"auto"``, or a custom user template with ``{instruction}`` and ``{reference}``.

    ``"auto"`` picks ``math`` for the ``math`` checker, ``code`` for ``code``/``function_call`` and
    ``general`` otherwise. A custom template has no system text and no lead-in. A
    :class:`DistillTemplate` is passed through.
    """
    if isinstance(spec, DistillTemplate):
        return spec
    if isinstance(spec, str):
        if spec == "auto":
            return TEMPLATES[_AUTO_BY_CHECKER.get(checker_name or "", "general")]
        if spec in TEMPLATES:
            return TEMPLATES[spec]
        if "{instruction}" in spec and "{reference}" in spec:
            unknown = sorted(set(_NAMED_BRACES_RE.findall(spec)) - {"instruction", "reference"})
            if unknown:  # left in the prompt as typed: most likely a typo, or a field the template cannot fill
                raise ValueError(
                    f"The custom distillation template has placeholder(s) {['{' + name + '}' for name in unknown]} "
                    "that are never filled: a custom template fills only {instruction} and {reference}. Remove them "
                    "or put the text in the template itself."
                )
            return DistillTemplate(name="custom", system=None, user=spec)
    raise ValueError(
        f"Unknown distillation template {spec!r}: use one of {sorted(TEMPLATES) + ['auto']}, or a custom "
        "template string that contains both the {instruction} and {reference} placeholders."
    )


def check_renderable(tokenizer: PreTrainedTokenizerBase | None, mode: str) -> None:
    """Raise ``ValueError`` if prompts cannot be rendered in ``mode`` with ``tokenizer``."""
    if mode not in RENDER_MODES:
        raise ValueError(f"Unknown sdft_template_mode {mode!r}; use one of {list(RENDER_MODES)}.")
    if mode == "chat" and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "sdft_template_mode='chat' needs a tokenizer with a chat template, and this tokenizer has none. "
            "Set `tokenizer.chat_template` (or pass `chat_template_path`), or use sdft_template_mode='raw' "
            "to render the paper's raw Llama-2-chat prompt strings."
        )


def render_prompt(
    template: DistillTemplate,
    instruction: str,
    reference: str,
    tokenizer: PreTrainedTokenizerBase | None,
    mode: str = "chat",
) -> str:
    """The full text to feed the generator (special tokens included), ending with the template's lead-in.

    The instruction and reference are stripped, as in the official code. In ``"raw"`` mode the text starts
    with ``tokenizer.bos_token`` when the tokenizer adds one on encoding, since the generator tokenizes
    without adding special tokens; in ``"chat"`` mode the chat template decides.
    """
    check_renderable(tokenizer, mode)
    values = {"instruction": instruction.strip(), "reference": reference.strip()}
    user = fill_placeholders(template.user, **values)
    if mode == "raw":
        bos = bos_added_on_encoding(tokenizer)
        if template.raw is not None:
            body = fill_placeholders(template.raw, system=template.system or "", **values)
        elif template.system:
            body = template.system + "\n\n" + user + template.lead_in
        else:
            body = user + template.lead_in
        return bos + body
    messages = [{"role": "user", "content": user}]
    if template.system:
        messages.insert(0, {"role": "system", "content": template.system})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        if not template.system:
            raise
        # Some chat templates (e.g. Gemma) reject a system role: fold the system text into the user turn.
        merged = [{"role": "user", "content": template.system + "\n\n" + user}]
        text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    return text + template.lead_in
