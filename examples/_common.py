# Copyright 2026 The trl_selfdistill developers. Licensed under the Apache License, Version 2.0.
"""What the example scripts share: the warning filters, the model-loading settings from `ModelConfig`, and the SDFT
script's arguments (also those of `distill_dataset.py`).

Run as scripts (`python examples/sdft.py`, `accelerate launch examples/sdft.py`), the examples find this module next
to them. Import it before `trl`, `transformers` and `peft`: its filters must be in place before the imports that emit.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

# Third-party notes that every run would print, harmless here, filtered before the imports that emit them:
# bitsandbytes on an optional CPU kernel package, and PEFT reading a transformers attribute that was renamed.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from trl import ModelConfig, ScriptArguments  # noqa: E402


def set_model_init_kwargs(training_args, model_args: ModelConfig) -> None:
    """The trainer loads the model named by `model_args` with its revision, attention and dtype (what the config's own
    `model_init_kwargs` set wins)."""
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }


@dataclass
class SDFTScriptArguments(ScriptArguments):
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training rows (quick runs and demos)."}
    )
    gsm8k_style: str = field(
        default="raw",
        metadata={"help": "Raw GSM8K answers: `raw` (as on the Hub) or `official` (the SDFT code's preparation)."},
    )
    eval_task_samples: int = field(
        default=0,
        metadata={
            "help": "If > 0, the task's accuracy before and after training on this many held-out rows (the last "
            "number of the answer against the reference's, asked with the GSM8K evaluation prompt)."
        },
    )
    eval_task_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Held-out task data (name or path), split `dataset_test_split`: default "
            "the training dataset's name."
        },
    )
    eval_max_new_tokens: int = field(default=256, metadata={"help": "Generation budget of a task answer."})
    eval_ifeval_samples: int = field(
        default=0,
        metadata={
            "help": "If > 0, IFEval (prompt-level strict, scored by lm-eval) before and after, on this many "
            "of the 541 bundled prompts: what the model forgets."
        },
    )
    eval_ifeval_max_new_tokens: int = field(default=256, metadata={"help": "Generation budget of an IFEval answer."})
    eval_drift_samples: int = field(
        default=0,
        metadata={
            "help": "If > 0, the drift before and after: how much less likely the model finds the seed model's own "
            "greedy answers to this many of the 541 IFEval prompts (NLL per token, minus the seed's own)."
        },
    )
    eval_drift_max_new_tokens: int = field(
        default=128, metadata={"help": "Generation budget of the seed model's answers that the drift scores."}
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of the before/after probes."})
