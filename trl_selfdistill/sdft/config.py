"""Configuration of the [`SDFTTrainer`]."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from ..generation.server import check_server_settings
from ..utils import CheckpointingByItsNewName
from ..validation import check_number
from .spec import DEFAULT_CANDIDATES, DistillSpec, resolve_candidates

DISTILL_ENGINES = ("transformers", "server")


@dataclass
class SDFTConfig(CheckpointingByItsNewName, SFTConfig):
    r"""
    Configuration class for the [`SDFTTrainer`]: Self-Distillation Fine-Tuning (Yang et al., ACL 2024,
    [arXiv 2402.13669](https://huggingface.co/papers/2402.13669)).

    Only the parameters specific to the distillation step are listed here; everything else is [`~trl.SFTConfig`].
    Before training, the seed model rewrites every reference response of the training dataset; rewrites that lose the
    answer fall back to the reference, then training is plain SFT on the result.

    Parameters:
        sdft_template (`str`, *optional*, defaults to `"auto"`):
            Distillation prompt: `"general"`, `"code"` (code and function calling), `"math"` (alias `"gsm8k"`),
            `"auto"` (chosen from `sdft_checker`), or a custom string containing `{instruction}` and `{reference}`.
        sdft_template_mode (`str`, *optional*, defaults to `"chat"`):
            `"chat"` renders the prompt through the tokenizer's chat template (system + user + generation prompt +
            forced lead-in); `"raw"` uses the paper's exact Llama-2-chat strings.
        sdft_checker (`str` or `Callable`, *optional*, defaults to `"none"`):
            Acceptance rule applied after the banned-phrase filter: `"math"` (the last number must match the
            reference's), `"math_strict"` (and every simple arithmetic equation in the text must be true),
            `"function_call"`, `"code"`, `"none"`, or a callable `(rewrite, reference, row) -> bool`.
        sdft_generation_kwargs (`dict[str, Any]`, *optional*):
            Overrides of the paper's decoding (sampling, temperature 0.95, top-p 0.7, top-k 50, 512 new tokens),
            passed to `generate`.
        sdft_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Prompts generated together per process by the in-process engine. `None` sizes the batch from free GPU
            memory (16 on a CPU) and halves it on out-of-memory.
        sdft_engine (`str`, *optional*, defaults to `"transformers"`):
            `"transformers"` generates in process with the seed weights; `"server"` sends the prompts to an
            OpenAI-compatible `/v1/completions` server (vLLM, SGLang, TGI, `transformers serve`) at
            `sdft_server_url`, which must serve the seed model. With the server, no weights are needed to rewrite,
            so training may shard them (FSDP, ZeRO-3).
        sdft_server_url (`str`, *optional*):
            Base URL of the server, e.g. `http://localhost:8000`.
        sdft_server_model (`str`, *optional*):
            Model id to request from the server, when it serves the seed model under another name than the
            trainer's model name.
        sdft_server_concurrency (`int`, *optional*, defaults to `64`):
            Requests in flight at once, per process.
        sdft_server_timeout (`float`, *optional*, defaults to `600`):
            Seconds one request may take before it is retried.
        sdft_server_max_retries (`int`, *optional*, defaults to `5`):
            Retries of a failed request (connection error, HTTP 429/5xx, malformed answer), with exponential backoff.
        sdft_compile (`bool`, *optional*, defaults to `False`):
            Compile the in-process decoding step (GPU, unquantized weights, static cache): 2.6x faster once compiled
            for a 7B model, but each new batch shape compiles again (about 35 s each), so it pays on long rewrites.
        sdft_unquantized_seed (`bool`, *optional*, defaults to `False`):
            When the training model is quantized (QLoRA), rewrite with the unquantized seed weights, loaded for the
            rewrite and freed before training, if they fit in free memory (otherwise the quantized model rewrites,
            with a warning). These are the true seed model, and they generate faster.
        sdft_keep_truncated (`bool`, *optional*, defaults to `False`):
            Accept rewrites that stopped at `max_new_tokens` instead of at an end token. By default they fall back to
            the reference (rejection reason `truncated`): a cut rewrite teaches the model to stop mid-sentence.
        sdft_candidates (`list[str]`, *optional*, defaults to `["rewrite"]`):
            The training targets the seed model generates for each response, besides the reference (always a
            candidate, as the fallback): `"rewrite"` (SDFT's rewrite, guided by the reference) and/or `"own_answer"`
            (its answer to the instruction alone, with no reference shown, as in Selective Self-Rehearsal, arXiv
            2409.04787, and S3FT, arXiv 2502.08130). `"own_answer"` needs a checker other than `"none"`. On the command
            line, names separated by spaces or commas.
        sdft_selection (`str`, *optional*, defaults to `"first"`):
            Which passing candidate is trained on: `"first"` in the order own answer, rewrite, reference; or
            `"lowest_nll"`, the one with the lowest per-token negative log-likelihood under the seed model (GRAPE,
            arXiv 2502.04194). In process, or on a server that returns prompt log-probabilities (vLLM); another
            server is refused before any loading.
        sdft_rewrite_samples (`int`, *optional*, defaults to `1`):
            Rewrites sampled for each response, each a candidate of its own (`sdft_selection` picks among those that
            pass: the first, or the least surprising). Several samples give a response more chances to keep its
            answer. Needs sampling (`do_sample`), and one generation pass per sample.
        sdft_cache_dir (`str`, *optional*):
            Where rewrites are cached as they are produced. Defaults to `$TRL_SELFDISTILL_CACHE/rewrites` (or
            `~/.cache/trl_selfdistill/rewrites`).
    """

    sdft_template: str = field(
        default="auto",
        metadata={
            "help": "Distillation prompt: 'general', 'code', 'math' (alias 'gsm8k'), 'auto' (chosen from "
            "`sdft_checker`), or a custom string with `{instruction}` and `{reference}`."
        },
    )
    sdft_template_mode: str = field(
        default="chat",
        metadata={
            "help": "'chat' renders through the tokenizer's chat template; 'raw' uses the paper's Llama-2-chat "
            "strings.",
            "choices": ["chat", "raw"],
        },
    )
    # Typed `str` for the CLI and YAML; from Python a callable `(rewrite, reference, row) -> bool` works too.
    sdft_checker: str = field(
        default="none",
        metadata={
            "help": "Acceptance rule: 'math', 'math_strict' (also rejects false equations), 'function_call', 'code' "
            "or 'none' (or a callable from Python)."
        },
    )
    sdft_generation_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Overrides of the paper's decoding (do_sample, temperature 0.95, top_p 0.7, top_k 50, "
            "max_new_tokens 512), as a dict or a JSON string on the command line."
        },
    )
    sdft_batch_size: int | None = field(
        default=None,
        metadata={"help": "Prompts the seed model rewrites together, per process (default: sized from free memory)."},
    )
    sdft_engine: str = field(
        default="transformers",
        metadata={
            "help": "'transformers' (in process) or 'server' (an OpenAI-compatible server at sdft_server_url).",
            "choices": list(DISTILL_ENGINES),
        },
    )
    sdft_server_url: str | None = field(
        default=None, metadata={"help": "Base URL of the OpenAI-compatible server, e.g. http://localhost:8000."}
    )
    sdft_server_model: str | None = field(
        default=None,
        metadata={"help": "Model id on the server, if it serves the seed model under another name."},
    )
    sdft_server_concurrency: int = field(default=64, metadata={"help": "Requests in flight at once, per process."})
    sdft_server_timeout: float = field(default=600.0, metadata={"help": "Seconds one request may take."})
    sdft_server_max_retries: int = field(
        default=5, metadata={"help": "Retries of a failed request, with exponential backoff."}
    )
    sdft_compile: bool = field(
        default=False,
        metadata={"help": "Compile the in-process decoding step (GPU, unquantized weights); pays on long rewrites."},
    )
    sdft_unquantized_seed: bool = field(
        default=False,
        metadata={"help": "Rewrite with the unquantized seed weights when the training model is quantized."},
    )
    sdft_keep_truncated: bool = field(
        default=False,
        metadata={"help": "Accept rewrites cut at max_new_tokens (by default they fall back to the reference)."},
    )
    sdft_candidates: list[str] = field(
        default_factory=lambda: list(DEFAULT_CANDIDATES),
        metadata={
            "help": "Targets generated besides the reference: 'rewrite' (SDFT's rewrite) and/or 'own_answer' (the "
            "seed model's answer to the instruction alone; needs a checker other than 'none')."
        },
    )
    sdft_selection: str = field(
        default="first",
        metadata={
            "help": "'first': the first passing of own_answer, rewrite, reference; 'lowest_nll': the passing "
            "candidate with the lowest per-token NLL under the seed model (in process, or on a server that returns "
            "prompt log-probabilities, such as vLLM).",
            "choices": ["first", "lowest_nll"],
        },
    )
    sdft_rewrite_samples: int = field(
        default=1,
        metadata={
            "help": "Rewrites sampled per response, each a candidate (`sdft_selection` picks among those that pass); "
            "needs sampling."
        },
    )
    sdft_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the resumable rewrite cache. Defaults to ~/.cache/trl_selfdistill/rewrites."},
    )

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["sdft_generation_kwargs"]

    def __post_init__(self):
        if isinstance(self.sdft_generation_kwargs, str):
            # TrainingArguments would parse it too, but fail with a bare JSONDecodeError naming no field
            try:
                self.sdft_generation_kwargs = json.loads(self.sdft_generation_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`sdft_generation_kwargs` must be a JSON object such as "
                    f'\'{{"max_new_tokens": 256, "do_sample": false}}\', got {self.sdft_generation_kwargs!r} '
                    f"({error})."
                ) from None
        if self.sdft_generation_kwargs is not None and not isinstance(self.sdft_generation_kwargs, dict):
            raise ValueError(
                "`sdft_generation_kwargs` must be a JSON object (a dict of decoding options), got "
                f"{self.sdft_generation_kwargs!r}."
            )
        super().__post_init__()
        if self.sdft_batch_size is not None:
            check_number(
                "sdft_batch_size",
                self.sdft_batch_size,
                integer=True,
                low=1,
                hint="Or None to size it from free memory.",
            )
        if self.sdft_engine not in DISTILL_ENGINES:
            raise ValueError(f"`sdft_engine` must be one of {list(DISTILL_ENGINES)}, got {self.sdft_engine!r}.")
        if self.sdft_engine == "server" and not self.sdft_server_url:
            raise ValueError("`sdft_engine='server'` needs `sdft_server_url`, e.g. 'http://localhost:8000'.")
        # From the command line a list arrives as a list of strings, from YAML or an environment as one comma string.
        self.sdft_candidates = list(resolve_candidates(self.sdft_candidates))
        if self.sdft_engine == "server" or self.sdft_server_url is not None:
            check_server_settings(
                self.sdft_server_url,
                self.sdft_server_concurrency,
                self.sdft_server_timeout,
                self.sdft_server_max_retries,
                prefix="sdft_server_",
            )
        # Resolved once, here: a bad template, checker or decoding fails before anything is loaded, and the trainer
        # reads this value instead of building it again. Build a new config to change it.
        self.sdft_spec = DistillSpec.from_config(self)

    @property
    def server_options(self) -> dict[str, Any]:
        """The [`ServerEngine`] settings."""
        return {
            "concurrency": self.sdft_server_concurrency,
            "timeout": self.sdft_server_timeout,
            "max_retries": self.sdft_server_max_retries,
        }
