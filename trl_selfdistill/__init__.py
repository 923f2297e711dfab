"""trl_selfdistill: self-distillation fine-tuning methods as drop-in TRL trainers."""

from .dynsdpb.config import DynSDPBConfig
from .dynsdpb.trainer import DynSDPBTrainer
from .models import BUNDLED_MODEL_NAME, bundled_model_path, resolve_model_name
from .sdft.checkers import get_checker
from .sdft.config import SDFTConfig
from .sdft.rewrite import distill_dataset
from .sdft.spec import DistillSpec
from .sdft.trainer import SDFTTrainer
from .sdft_dynsdpb import SDFTDynSDPBConfig, SDFTDynSDPBTrainer

__version__ = "0.1.0"

__all__ = [
    "BUNDLED_MODEL_NAME",
    "DistillSpec",
    "DynSDPBConfig",
    "DynSDPBTrainer",
    "SDFTConfig",
    "SDFTDynSDPBConfig",
    "SDFTDynSDPBTrainer",
    "SDFTTrainer",
    "bundled_model_path",
    "distill_dataset",
    "get_checker",
    "resolve_model_name",
]
