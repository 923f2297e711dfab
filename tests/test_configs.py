"""The trainers' configs keep TRL's defaults without the warnings of names transformers deprecates."""

from __future__ import annotations

import warnings

import pytest

from trl_selfdistill import DynSDPBConfig, SDFTConfig


@pytest.mark.parametrize("config_class", [SDFTConfig, DynSDPBConfig])
def test_checkpointing_is_on_by_default_without_a_deprecation_warning(tmp_path, config_class):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True  # TRL's default

    off = config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False)
    assert off.activation_checkpointing is False and off.gradient_checkpointing is False

    with pytest.warns(FutureWarning, match="gradient_checkpointing"):  # the old name still works, and says so
        old = config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False)
    assert old.activation_checkpointing is False
