"""Configuration of the [`DynSDPBTrainer`]."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from trl import SFTConfig

from ..utils import CheckpointingByItsNewName
from ..validation import check_number
from .sampler import reuse_count_for
from .schedule import DISTILL_MODES

CACHE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class DynSDPBConfig(CheckpointingByItsNewName, SFTConfig):
    r"""
    Configuration class for the [`DynSDPBTrainer`]: dynamic self-distillation from the previous mini-batch
    (Fu et al., 2024, [arXiv 2411.16991](https://huggingface.co/papers/2411.16991)), built on DLB (Shen et al., CVPR
    2022).

    Only the parameters specific to the method are listed here; everything else is [`~trl.SFTConfig`]. Each
    per-device batch re-uses `dynsdpb_reuse_fraction` of its samples from the same slot one optimizer step earlier and
    distils them towards the logits the model produced for them then.

    Parameters:
        dynsdpb_mode (`str`, *optional*, defaults to `"dynamic"`):
            `"dynamic"`: per-sample weight `alpha * d * (1 - u)` and temperature `T * (1 + u)` from the previous step's
            uncertainty `u` and discrimination `d` (this project's reading of the paper); `"constant"`: DLB's fixed
            `alpha` and `T` (the ablation).
        dynsdpb_alpha (`float`, *optional*, defaults to `1.0`):
            Base weight of the distillation term (DLB's default). `0` gives plain SFT on the overlapping batches.
        dynsdpb_temperature (`float`, *optional*, defaults to `3.0`):
            Base distillation temperature (DLB's default).
        dynsdpb_reuse_fraction (`float`, *optional*, defaults to `0.5`):
            Fraction of each per-device batch that re-uses the previous step's new samples, in (0, 0.5] (the previous
            step only had `1 - dynsdpb_reuse_fraction` new samples); it must leave at least one re-used sample.
        dynsdpb_teacher_cache_dtype (`str`, *optional*, defaults to `"bfloat16"`):
            Dtype of the cached previous-step predictions: final hidden states when the output layer is frozen (LoRA,
            QLoRA), logits when it is trained.
        dynsdpb_loss_chunk_size (`int` or `None`, *optional*, defaults to `None`):
            Response tokens per chunk of the cross-entropy and distillation loss, which never hold all the logits at
            once. `None` picks about 8M logits (32 MB in float32) per chunk.
    """

    dynsdpb_mode: str = field(
        default="dynamic",
        metadata={
            "help": "'dynamic' (adaptive weight and temperature) or 'constant' (DLB).",
            "choices": list(DISTILL_MODES),
        },
    )
    dynsdpb_alpha: float = field(default=1.0, metadata={"help": "Base weight of the distillation term."})
    dynsdpb_temperature: float = field(default=3.0, metadata={"help": "Base distillation temperature."})
    dynsdpb_reuse_fraction: float = field(
        default=0.5, metadata={"help": "Fraction of each per-device batch re-used from the previous step (<= 0.5)."}
    )
    dynsdpb_teacher_cache_dtype: str = field(
        default="bfloat16",
        metadata={"help": "Dtype of the cached previous-step predictions.", "choices": list(CACHE_DTYPES)},
    )
    dynsdpb_loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Response tokens per chunk of the loss (default: about 8M logits)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dynsdpb_mode not in DISTILL_MODES:
            raise ValueError(f"`dynsdpb_mode` must be one of {sorted(DISTILL_MODES)}, got {self.dynsdpb_mode!r}.")
        # NaN or inf here turns every loss into NaN after the first re-used batch, and the weights with it.
        check_number("dynsdpb_alpha", self.dynsdpb_alpha, low=0, hint="0 turns the distillation term off.")
        check_number("dynsdpb_temperature", self.dynsdpb_temperature, low=0, low_open=True)
        check_number(
            "dynsdpb_reuse_fraction",
            self.dynsdpb_reuse_fraction,
            low=0,
            high=0.5,
            low_open=True,
            hint="The previous step had only (1 - dynsdpb_reuse_fraction) new samples to re-use; 0.5 is the paper's.",
        )
        if self.dynsdpb_teacher_cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"`dynsdpb_teacher_cache_dtype` must be one of {CACHE_DTYPES}, got "
                f"{self.dynsdpb_teacher_cache_dtype!r}."
            )
        if self.dynsdpb_loss_chunk_size is not None:
            check_number(
                "dynsdpb_loss_chunk_size",
                self.dynsdpb_loss_chunk_size,
                integer=True,
                low=1,
                hint="Or None for the default.",
            )
        reuse = self.reuse_count  # validates the pair
        if not math.isclose(self.per_device_train_batch_size * self.dynsdpb_reuse_fraction, reuse):
            warnings.warn(
                f"per_device_train_batch_size={self.per_device_train_batch_size} x dynsdpb_reuse_fraction="
                f"{self.dynsdpb_reuse_fraction} is not a whole number: {reuse} samples per batch are re-used "
                f"(effective fraction {reuse / self.per_device_train_batch_size:.4g}).",
                UserWarning,
                stacklevel=3,
            )

    @property
    def reuse_count(self) -> int:
        """Re-used samples per per-device batch, `round(per_device_train_batch_size * dynsdpb_reuse_fraction)`."""
        return reuse_count_for(self.per_device_train_batch_size, self.dynsdpb_reuse_fraction)
