"""SDFTTrainer: Self-Distillation Fine-Tuning (Yang et al., ACL 2024) as a drop-in `SFTTrainer`.

Not `trl.experimental.sdft` (Shenfeld et al., 2026), an on-policy method that shares the acronym.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.utils import logging
from trl import SFTTrainer

from ..model_card import MethodModelCard
from ..utils import default_output_dir
from .config import SDFTConfig
from .rewrite_step import SDFTRewriteMixin

logger = logging.get_logger(__name__)


class SDFTTrainer(SDFTRewriteMixin, MethodModelCard, SFTTrainer):
    """
    Trainer for Self-Distillation Fine-Tuning (SDFT), [Yang et al., ACL 2024](https://huggingface.co/papers/2402.13669).

    Before training, the *seed* model (the model before any adapter or update) rewrites every reference response of
    `train_dataset` in its own words; a rewrite that fails the acceptance check falls back to the reference, and no
    row is dropped. Training is then ordinary SFT on the distilled dataset. Everything else is [`~trl.SFTTrainer`]:
    same arguments, PEFT and `quantization_config` included. Only the training set is rewritten.

    After construction, `trainer.distillation_report` holds the counts (`total`, `accepted`, `fallback`, rejections
    per rule); it is logged, saved as JSON in `output_dir` next to the distilled dataset, and shown in the model card.
    The rewrite is [`SDFTRewriteMixin`], in front of `SFTTrainer`.

    Example:

    ```python
    from trl_selfdistill import SDFTConfig, SDFTTrainer

    args = SDFTConfig(output_dir="out", sdft_template="gsm8k", sdft_checker="math")
    trainer = SDFTTrainer(model="meta-llama/Llama-2-7b-chat-hf", args=args, train_dataset=dataset)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "sdft", "trl-selfdistill"]
    _name = "SDFT"

    def __init__(
        self,
        model,
        args: SDFTConfig | None = None,
        train_dataset: Dataset | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        formatting_func=None,
        **kwargs: Any,
    ):
        if args is None:
            args = SDFTConfig(default_output_dir(model, "SDFT"))
        elif not isinstance(args, SDFTConfig):
            raise TypeError(f"`args` must be an `SDFTConfig`, got {type(args).__name__}.")
        super().__init__(
            model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            formatting_func=formatting_func,
            **kwargs,
        )
