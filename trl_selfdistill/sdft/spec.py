"""What the SDFT rewrite asks for and how it judges the answers, resolved and validated once.

`DistillSpec` is built at construction (from an `SDFTConfig`, or from keyword arguments by `distill_dataset`), so a
bad template, checker or decoding option fails before any model is loaded, and nothing is resolved twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import GenerationConfig

from ..validation import check_bool, check_number
from .checkers import Checker, get_checker
from .templates import RENDER_MODES, DistillTemplate, render_prompt, resolve_template

if TYPE_CHECKING:
    from collections.abc import Mapping

    from transformers import PreTrainedTokenizerBase

    from .config import SDFTConfig

# The official decoding of Yang et al. (2024): one sampled rewrite per row.
PAPER_GENERATION_KWARGS: dict[str, Any] = {
    "do_sample": True,
    "temperature": 0.95,
    "top_p": 0.7,
    "top_k": 50,
    "max_new_tokens": 512,
}

# Decoding options the engines set themselves, or that would break "one completion per prompt, as text".
ENGINE_OWNED_KEYS: frozenset[str] = frozenset(
    {
        "pad_token_id",
        "use_cache",
        "cache_implementation",
        "disable_compile",
        "compile_config",
        "num_return_sequences",
        "return_dict_in_generate",
        "output_scores",
        "output_logits",
        "output_attentions",
        "output_hidden_states",
    }
)


def resolve_decoding(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The paper's decoding updated with `overrides`; unknown or engine-owned keys fail now, not inside `generate`."""
    decoding = {**PAPER_GENERATION_KWARGS, **(overrides or {})}
    owned = sorted(key for key in decoding if key in ENGINE_OWNED_KEYS)
    if owned:
        raise ValueError(
            f"`distill_generation_kwargs` sets {owned}, which the rewrite engine sets itself (one completion per "
            "prompt, padding and cache handled by the engine). Remove them from `distill_generation_kwargs`."
        )
    known = GenerationConfig().to_dict()
    unknown = sorted(key for key in decoding if key not in known)
    if unknown:
        raise ValueError(
            f"Unknown decoding option(s) {unknown} in `distill_generation_kwargs`; use `GenerationConfig` fields "
            "such as `max_new_tokens`, `temperature`, `top_p`, `top_k`, `do_sample`."
        )
    for key, value in decoding.items():
        if value is None:  # unset: GenerationConfig's default
            continue
        if key in _DECODING_RANGES:
            check_number(f"distill_generation_kwargs.{key}", value, **_DECODING_RANGES[key])
        elif key in _DECODING_FLAGS:
            check_bool(f"distill_generation_kwargs.{key}", value, hint="Write the JSON literal, not a string.")
    return decoding


# Types and ranges that both `GenerationConfig` (in process) and the OpenAI-compatible API (on a server) accept, for
# the options people set; GenerationConfig alone takes some out-of-range values and fails (or samples) later.
_DECODING_RANGES: dict[str, dict[str, Any]] = {
    "max_new_tokens": {"integer": True, "low": 1},
    "min_new_tokens": {"integer": True, "low": 0},
    "max_length": {"integer": True, "low": 1},
    "temperature": {"low": 0, "low_open": True, "hint": "For greedy rewrites set do_sample: false instead of 0."},
    "top_p": {"low": 0, "high": 1, "low_open": True},
    "min_p": {"low": 0, "high": 1},
    "typical_p": {"low": 0, "high": 1, "low_open": True},
    "top_k": {"integer": True, "low": 0, "hint": "0 keeps every token."},
    "repetition_penalty": {"low": 0, "low_open": True},
    "num_beams": {"integer": True, "low": 1},
}
_DECODING_FLAGS = ("do_sample",)


@dataclass(frozen=True)
class DistillSpec:
    """The rewrite's prompt, acceptance rule and decoding.

    Build it with [`DistillSpec.create`] or [`DistillSpec.from_config`], which validate every part.
    """

    template: DistillTemplate
    template_mode: str
    checker: Checker
    checker_name: str
    decoding: dict[str, Any]  # read, never changed
    keep_truncated: bool = False  # accept rewrites cut at `max_new_tokens` (by default they fall back)

    @classmethod
    def create(
        cls,
        template: str | DistillTemplate = "auto",
        template_mode: str = "chat",
        checker: str | Checker = "none",
        generation_kwargs: Mapping[str, Any] | None = None,
        keep_truncated: bool = False,
    ) -> DistillSpec:
        """Resolves a template name (`"auto"` follows the checker), a checker name and the decoding overrides."""
        if template_mode not in RENDER_MODES:
            raise ValueError(f"Unknown distill_template_mode {template_mode!r}; use one of {list(RENDER_MODES)}.")
        if not isinstance(keep_truncated, bool):
            raise ValueError(
                f"`distill_keep_truncated` must be True or False, got {keep_truncated!r}: True accepts rewrites cut "
                "at `max_new_tokens`, False (the default) falls back to the reference for them."
            )
        checker_name = checker if isinstance(checker, str) else getattr(checker, "__name__", "custom")
        return cls(
            template=resolve_template(template, checker if isinstance(checker, str) else None),
            template_mode=template_mode,
            checker=get_checker(checker),
            checker_name=checker_name,
            decoding=resolve_decoding(generation_kwargs),
            keep_truncated=keep_truncated,
        )

    @classmethod
    def from_config(cls, args: SDFTConfig) -> DistillSpec:
        return cls.create(
            args.distill_template,
            args.distill_template_mode,
            args.distill_checker,
            args.distill_generation_kwargs,
            args.distill_keep_truncated,
        )

    def render(self, instruction: str, reference: str, tokenizer: PreTrainedTokenizerBase) -> str:
        return render_prompt(self.template, instruction, reference, tokenizer, self.template_mode)
