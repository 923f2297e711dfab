"""Configuration of the [`SDFTTrainer`]."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from ..generation.server import check_server_settings
from ..utils import CheckpointingByItsNewName
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
        distill_batch_size (`int` or `"auto"`, *optional*, defaults to `"auto"`):
            Prompts generated together per process by the in-process engine. `"auto"` sizes the batch from free GPU
            memory (16 on a CPU) and halves it on out-of-memory.
        distill_engine (`str`, *optional*, defaults to `"transformers"`):
            `"transformers"` generates in process with the seed weights; `"server"` sends the prompts to an
            OpenAI-compatible `/v1/completions` server (vLLM, SGLang, TGI, `transformers serve`) at
            `distill_server_url`, which must serve the seed model. With the server, no weights are needed to rewrite,
            so training may shard them (FSDP, ZeRO-3).
        distill_server_url (`str`, *optional*):
            Base URL of the server, e.g. `http://localhost:8000`.
        distill_server_model (`str`, *optional*):
            Model id to request from the server, when it serves the seed model under another name than the
            trainer's model name.
        distill_server_concurrency (`int`, *optional*, defaults to `64`):
            Requests in flight at once, per process.
        distill_server_timeout (`float`, *optional*, defaults to `600`):
            Seconds one request may take before it is retried.
        distill_server_max_retries (`int`, *optional*, defaults to `5`):
            Retries of a failed request (connection error, HTTP 429/5xx, malformed answer), with exponential backoff.
        distill_compile (`bool`, *optional*, defaults to `False`):
            Compile the in-process decoding step (GPU, unquantized weights, static cache): 2.6x faster once compiled
            for a 7B model, but each new batch shape compiles again (about 35 s each), so it pays on long rewrites.
        distill_unquantized_seed (`bool`, *optional*, defaults to `False`):
            When the training model is quantized (QLoRA), rewrite with the unquantized seed weights, loaded for the
            rewrite and freed before training, if they fit in free memory (otherwise the quantized model rewrites,
            with a warning). These are the true seed model, and they generate faster.
        distill_keep_truncated (`bool`, *optional*, defaults to `False`):
            Accept rewrites that stopped at `max_new_tokens` instead of at an end token. By default they fall back to
            the reference (rejection reason `truncated`): a cut rewrite teaches the model to stop mid-sentence.
        distill_candidates (`list[str]`, *optional*, defaults to `["rewrite"]`):
            The training targets the seed model generates for each response, besides the reference (always a
            candidate, as the fallback): `"rewrite"` (SDFT's rewrite, guided by the reference) and/or `"own_answer"`
            (its answer to the instruction alone, with no reference shown, as in Selective Self-Rehearsal, arXiv
            2409.04787, and S3FT, arXiv 2502.08130). `"own_answer"` needs a checker other than `"none"`. On the command
            line, names separated by spaces or commas.
        distill_selection (`str`, *optional*, defaults to `"first"`):
            Which passing candidate is trained on: `"first"` in the order own answer, rewrite, reference; or
            `"lowest_nll"`, the one with the lowest per-token negative log-likelihood under the seed model (GRAPE,
            arXiv 2502.04194; in-process engine only, a server gives no likelihoods here).
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
    # An int or "auto"; typed `str` so that the command line accepts both (`__post_init__` makes numbers ints).
    distill_batch_size: str = field(
        default="auto",
        metadata={"help": "Prompts the seed model rewrites together, per process, or 'auto' (from free memory)."},
    )
    distill_engine: str = field(
        default="transformers",
        metadata={
            "help": "'transformers' (in process) or 'server' (an OpenAI-compatible server at distill_server_url).",
            "choices": list(DISTILL_ENGINES),
        },
    )
    distill_server_url: str | None = field(
        default=None, metadata={"help": "Base URL of the OpenAI-compatible server, e.g. http://localhost:8000."}
    )
    distill_server_model: str | None = field(
        default=None,
        metadata={"help": "Model id on the server, if it serves the seed model under another name."},
    )
    distill_server_concurrency: int = field(default=64, metadata={"help": "Requests in flight at once, per process."})
    distill_server_timeout: float = field(default=600.0, metadata={"help": "Seconds one request may take."})
    distill_server_max_retries: int = field(
        default=5, metadata={"help": "Retries of a failed request, with exponential backoff."}
    )
    distill_compile: bool = field(
        default=False,
        metadata={"help": "Compile the in-process decoding step (GPU, unquantized weights); pays on long rewrites."},
    )
    distill_unquantized_seed: bool = field(
        default=False,
        metadata={"help": "Rewrite with the unquantized seed weights when the training model is quantized."},
    )
    distill_keep_truncated: bool = field(
        default=False,
        metadata={"help": "Accept rewrites cut at max_new_tokens (by default they fall back to the reference)."},
    )
    distill_candidates: list[str] = field(
        default_factory=lambda: list(DEFAULT_CANDIDATES),
        metadata={
            "help": "Targets generated besides the reference: 'rewrite' (SDFT's rewrite) and/or 'own_answer' (the "
            "seed model's answer to the instruction alone; needs a checker other than 'none')."
        },
    )
    distill_selection: str = field(
        default="first",
        metadata={
            "help": "'first': the first passing of own_answer, rewrite, reference; 'lowest_nll': the passing "
            "candidate with the lowest per-token NLL under the seed model (in-process engine only).",
            "choices": ["first", "lowest_nll"],
        },
    )
    distill_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the resumable rewrite cache. Defaults to ~/.cache/trl_selfdistill/rewrites."},
    )

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["distill_generation_kwargs"]

    def __post_init__(self):
        if isinstance(self.distill_generation_kwargs, str):
            # TrainingArguments would parse it too, but fail with a bare JSONDecodeError naming no field
            try:
                self.distill_generation_kwargs = json.loads(self.distill_generation_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`distill_generation_kwargs` must be a JSON object such as "
                    f'\'{{"max_new_tokens": 256, "do_sample": false}}\', got {self.distill_generation_kwargs!r} '
                    f"({error})."
                ) from None
        if self.distill_generation_kwargs is not None and not isinstance(self.distill_generation_kwargs, dict):
            raise ValueError(
                "`distill_generation_kwargs` must be a JSON object (a dict of decoding options), got "
                f"{self.distill_generation_kwargs!r}."
            )
        super().__post_init__()
        if isinstance(self.distill_batch_size, str) and self.distill_batch_size.isdigit():
            self.distill_batch_size = int(self.distill_batch_size)  # from the command line
        if self.distill_batch_size != "auto" and not (
            isinstance(self.distill_batch_size, int) and self.distill_batch_size >= 1
        ):
            raise ValueError(f"`distill_batch_size` must be 'auto' or at least 1, got {self.distill_batch_size!r}.")
        if self.distill_engine not in DISTILL_ENGINES:
            raise ValueError(f"`distill_engine` must be one of {list(DISTILL_ENGINES)}, got {self.distill_engine!r}.")
        if self.distill_engine == "server" and not self.distill_server_url:
            raise ValueError("`distill_engine='server'` needs `distill_server_url`, e.g. 'http://localhost:8000'.")
        # From the command line a list arrives as a list of strings, from YAML or an environment as one comma string.
        self.distill_candidates = list(resolve_candidates(self.distill_candidates))
        if self.distill_selection == "lowest_nll" and self.distill_engine == "server":
            raise ValueError(
                "`distill_selection='lowest_nll'` needs the seed model's likelihoods, which the server engine does "
                "not give here. Use the in-process engine (`distill_engine='transformers'`) or "
                "`distill_selection='first'`."
            )
        if self.distill_engine == "server" or self.distill_server_url is not None:
            check_server_settings(
                self.distill_server_url,
                self.distill_server_concurrency,
                self.distill_server_timeout,
                self.distill_server_max_retries,
                prefix="distill_server_",
            )
        # Resolved once, here: a bad template, checker or decoding fails before anything is loaded, and the trainer
        # reads this value instead of building it again. Build a new config to change it.
        self.distill_spec = DistillSpec.from_config(self)

    @property
    def server_options(self) -> dict[str, Any]:
        """The [`ServerEngine`] settings."""
        return {
            "concurrency": self.distill_server_concurrency,
            "timeout": self.distill_server_timeout,
            "max_retries": self.distill_server_max_retries,
        }
