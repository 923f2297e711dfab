"""trl_selfdistill: self-distillation fine-tuning methods as drop-in TRL trainers."""

from .dynsdpb.config import DynSDPBConfig
from .dynsdpb.trainer import DynSDPBTrainer
from .models import BUNDLED_MODEL_NAME
from .sdft.checkers import get_checker
from .sdft.config import SDFTConfig
from .sdft.rewrite import distill_dataset
from .sdft.spec import DistillSpec
from .sdft.trainer import SDFTTrainer

__version__ = "0.1.0"

__all__ = [
    "BUNDLED_MODEL_NAME",
    "DistillSpec",
    "DynSDPBConfig",
    "DynSDPBTrainer",
    "SDFTConfig",
    "SDFTTrainer",
    "distill_dataset",
    "get_checker",
]
