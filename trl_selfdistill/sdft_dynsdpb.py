"""SDFT's distilled data trained with DynSDPB's loss: `SDFTDynSDPBConfig` and `SDFTDynSDPBTrainer`.

One named step in front of one trainer, with MRO `SDFTDynSDPBTrainer -> SDFTRewriteMixin -> DynSDPBTrainer ->
MethodModelCard -> SFTTrainer`:

- `__init__`: the pre-load checks, once each (`check_inputs`: DynSDPB's, then SDFT's), the tokenizer checks, then
  DynSDPB's `__init__` (which skips the checks already run; `SFTTrainer.__init__` keeps the training set raw through
  the rewrite step's `_prepare_dataset`; the distillation head, the teacher cache), then, back in the rewrite step,
  the rewrite, the tokenized distilled training set, the report and the saved distilled dataset;
- training: DynSDPB's overlapping batches (`get_train_dataloader` reads the final, tokenized distilled
  `train_dataset`), loss, metrics and checkpoints with the teacher cache;
- the model card: both sections (`_model_card_sections` is cooperative), both papers and both citations.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from .dynsdpb.config import DynSDPBConfig
from .dynsdpb.sampler import check_dataset_size
from .dynsdpb.trainer import DynSDPBTrainer
from .sdft.config import SDFTConfig
from .sdft.outputs import ROWS_FILE
from .sdft.rewrite_step import SDFTRewriteMixin
from .utils import default_output_dir


@dataclass
class SDFTDynSDPBConfig(SDFTConfig, DynSDPBConfig):
    r"""
    Configuration class for the [`SDFTDynSDPBTrainer`]: the SDFT rewrite of the training set (Yang et al., ACL 2024,
    [arXiv 2402.13669](https://huggingface.co/papers/2402.13669)), then DynSDPB training on it (Fu et al., 2024,
    [arXiv 2411.16991](https://huggingface.co/papers/2411.16991)).

    It holds every field of [`SDFTConfig`] (the rewrite: `sdft_template`, `sdft_checker`, `sdft_generation_kwargs`,
    `sdft_engine`, `sdft_cache_dir`, ...) and of [`DynSDPBConfig`] (the training: `dynsdpb_mode`, `dynsdpb_alpha`,
    `dynsdpb_temperature`, `dynsdpb_reuse_fraction`, `dynsdpb_teacher_cache_dtype`, `dynsdpb_loss_chunk_size`), with
    the same defaults, and checks both.
    """


class SDFTDynSDPBTrainer(SDFTRewriteMixin, DynSDPBTrainer):
    """
    SDFT's distilled data trained with DynSDPB's loss: a drop-in [`~trl.SFTTrainer`].

    Before training, the seed model rewrites the training set's responses exactly as [`SDFTTrainer`] does (the same
    [`SDFTRewriteMixin`] step: acceptance checks and fallback, rewrite cache, `trainer.distillation_report`, distilled
    dataset and report saved in `output_dir`, `distill/<count>` logs). Training is then [`DynSDPBTrainer`]'s on the
    distilled set: each per-device batch re-uses the previous step's new samples and distils them towards the logits
    the model gave them then (`ce_loss`, `distill/loss`, `distill/reused_fraction`, `distill/mean_*` logs;
    checkpoints carry the teacher cache). The model card holds the distillation report and the DynSDPB settings.

    Example:

    ```python
    from trl_selfdistill import SDFTDynSDPBConfig, SDFTDynSDPBTrainer

    args = SDFTDynSDPBConfig(output_dir="out", sdft_template="gsm8k", sdft_checker="math", dynsdpb_alpha=1.0)
    trainer = SDFTDynSDPBTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=dataset)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "sdft", "dynsdpb", "dlb", "trl-selfdistill"]
    _name = "SDFT + DynSDPB"
    _papers = (SDFTRewriteMixin._paper, DynSDPBTrainer._paper)  # the card cites both (`_paper` is TRL's single paper)

    def __init__(
        self,
        model,
        args: SDFTDynSDPBConfig | None = None,
        train_dataset: Dataset | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        formatting_func=None,
        **kwargs,
    ):
        if args is None:
            args = SDFTDynSDPBConfig(default_output_dir(model, "SDFT-DynSDPB"))
        elif not (isinstance(args, SDFTConfig) and isinstance(args, DynSDPBConfig)):
            raise TypeError(f"`args` must be an `SDFTDynSDPBConfig`, got {type(args).__name__}.")
        super().__init__(
            model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            formatting_func=formatting_func,
            **kwargs,
        )
        if self.distillation_report["dropped_by_max_length"]:  # else as many rows as DynSDPB's checks counted
            self._check_distilled_dataset_size()

    def _check_distilled_dataset_size(self) -> None:
        """The rewrite keeps every row, but SFT's `max_length` may drop some: the rest must still fill one step."""
        args = self.args
        try:
            check_dataset_size(
                len(self.train_dataset),
                args.per_device_train_batch_size,
                args.reuse_count,
                args.gradient_accumulation_steps,
                args.world_size,
            )
        except ValueError as error:
            dropped = self.distillation_report["dropped_by_max_length"]
            raise ValueError(
                f"After the SDFT rewrite, `max_length={args.max_length}` dropped {dropped} rows with none of their "
                f"trained tokens left (`sft_dropped` in {ROWS_FILE}), which leaves too few for DynSDPB. {error} Or "
                "raise `max_length`; the rewrites are cached, so a new run does not generate them again."
            ) from error
