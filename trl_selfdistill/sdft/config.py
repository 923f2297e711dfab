"""Configuration of the [`SDFTTrainer`]."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

# The official decoding of Yang et al. (2024): one sampled rewrite per row.
PAPER_GENERATION_KWARGS: dict[str, Any] = {
    "do_sample": True,
    "temperature": 0.95,
    "top_p": 0.7,
    "top_k": 50,
    "max_new_tokens": 512,
}


@dataclass
class SDFTConfig(SFTConfig):
    r"""
    Configuration class for the [`SDFTTrainer`]: Self-Distillation Fine-Tuning (Yang et al., ACL 2024,
    [arXiv 2402.13669](https://huggingface.co/papers/2402.13669)).

    Only the parameters specific to the distillation step are listed here; everything else is [`~trl.SFTConfig`].
    Before training, the seed model rewrites every reference response of the training dataset; rewrites that lose the
    answer fall back to the reference, then training is plain SFT on the result.

    Parameters:
        distill_template (`str`, *optional*, defaults to `"auto"`):
            Distillation prompt: `"general"`, `"code"` (code and function calling), `"math"` (alias `"gsm8k"`),
            `"auto"` (chosen from `distill_checker`), or a custom string containing `{instruction}` and `{reference}`.
        distill_template_mode (`str`, *optional*, defaults to `"chat"`):
            `"chat"` renders the prompt through the tokenizer's chat template (system + user + generation prompt +
            forced lead-in); `"raw"` uses the paper's exact Llama-2-chat strings.
        distill_checker (`str` or `Callable`, *optional*, defaults to `"none"`):
            Acceptance rule applied after the banned-phrase filter: `"math"`, `"function_call"`, `"code"`, `"none"`,
            or a callable `(rewrite, reference, row) -> bool`.
        distill_generation_kwargs (`dict[str, Any]`, *optional*):
            Overrides of the paper's decoding (sampling, temperature 0.95, top-p 0.7, top-k 50, 512 new tokens),
            passed to `generate`.
        distill_batch_size (`int`, *optional*, defaults to `16`):
            Number of prompts generated together (per process).
        distill_cache_dir (`str`, *optional*):
            Where rewrites are cached as they are produced. Defaults to `$TRL_SELFDISTILL_CACHE/rewrites` (or
            `~/.cache/trl_selfdistill/rewrites`).
    """

    distill_template: str = field(
        default="auto",
        metadata={
            "help": "Distillation prompt: 'general', 'code', 'math' (alias 'gsm8k'), 'auto' (chosen from "
            "`distill_checker`), or a custom string with `{instruction}` and `{reference}`."
        },
    )
    distill_template_mode: str = field(
        default="chat",
        metadata={
            "help": "'chat' renders through the tokenizer's chat template; 'raw' uses the paper's Llama-2-chat "
            "strings.",
            "choices": ["chat", "raw"],
        },
    )
    # Typed `str` for the CLI and YAML; from Python a callable `(rewrite, reference, row) -> bool` works too.
    distill_checker: str = field(
        default="none",
        metadata={"help": "Acceptance rule: 'math', 'function_call', 'code' or 'none' (or a callable from Python)."},
    )
    distill_generation_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Overrides of the paper's decoding (do_sample, temperature 0.95, top_p 0.7, top_k 50, "
            "max_new_tokens 512), as a dict or a JSON string on the command line."
        },
    )
    distill_batch_size: int = field(
        default=16,
        metadata={"help": "Number of prompts the seed model rewrites together, per process."},
    )
    distill_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the resumable rewrite cache. Defaults to ~/.cache/trl_selfdistill/rewrites."},
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.distill_generation_kwargs, str):
            self.distill_generation_kwargs = json.loads(self.distill_generation_kwargs)
        if self.distill_template_mode not in ("chat", "raw"):
            raise ValueError(f"`distill_template_mode` must be 'chat' or 'raw', got {self.distill_template_mode!r}.")
        if self.distill_batch_size < 1:
            raise ValueError(f"`distill_batch_size` must be at least 1, got {self.distill_batch_size}.")

    @property
    def generation_kwargs(self) -> dict[str, Any]:
        """The decoding actually used: the paper's, updated with `distill_generation_kwargs`."""
        return {**PAPER_GENERATION_KWARGS, **(self.distill_generation_kwargs or {})}
