"""The trainers' configs keep TRL's defaults without the warnings of names transformers deprecates, and refuse, where
each field is declared, the values that would silently ruin a run, naming the field, the value and what is allowed."""

from __future__ import annotations

import math
import warnings

import pytest
from trl import TrlParser

from trl_selfdistill import DynSDPBConfig, SDFTConfig, SDFTDynSDPBConfig


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


def make(config_class, **fields):
    return config_class(output_dir="unused", use_cpu=True, bf16=False, **fields)


@pytest.mark.parametrize("config_class", [DynSDPBConfig, SDFTDynSDPBConfig])
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dynsdpb_alpha": math.nan}, r"`dynsdpb_alpha` must be a finite number >= 0, got nan"),
        ({"dynsdpb_alpha": math.inf}, r"`dynsdpb_alpha` must be a finite number >= 0, got inf"),
        ({"dynsdpb_alpha": "1.0"}, r"`dynsdpb_alpha` must be a finite number >= 0, got '1.0'"),
        ({"dynsdpb_temperature": math.nan}, r"`dynsdpb_temperature` must be a finite number > 0, got nan"),
        ({"dynsdpb_temperature": -math.inf}, r"`dynsdpb_temperature` must be a finite number > 0, got -inf"),
        ({"dynsdpb_temperature": "hot"}, r"`dynsdpb_temperature` must be a finite number > 0, got 'hot'"),
        ({"dynsdpb_reuse_fraction": 0.6}, r"`dynsdpb_reuse_fraction` must be a finite number > 0 and <= 0.5, got 0.6"),
        ({"dynsdpb_reuse_fraction": 0.0}, r"`dynsdpb_reuse_fraction` must be a finite number > 0 and <= 0.5, got 0.0"),
        (
            {"dynsdpb_reuse_fraction": "0.5"},
            r"`dynsdpb_reuse_fraction` must be a finite number > 0 and <= 0.5, got '0.5'",
        ),
        ({"dynsdpb_loss_chunk_size": 2.5}, r"`dynsdpb_loss_chunk_size` must be an integer >= 1, got 2.5"),
        ({"dynsdpb_loss_chunk_size": True}, r"`dynsdpb_loss_chunk_size` must be an integer >= 1, got True"),
    ],
)
def test_dynsdpb_fields_refuse_values_that_would_ruin_training(config_class, fields, message):
    with pytest.raises(ValueError, match=message):
        make(config_class, **fields)


@pytest.mark.parametrize("config_class", [SDFTConfig, SDFTDynSDPBConfig])
@pytest.mark.parametrize(
    ("decoding", "message"),
    [
        ({"max_new_tokens": -5}, r"`sdft_generation_kwargs.max_new_tokens` must be an integer >= 1, got -5"),
        ({"max_new_tokens": 0}, r"max_new_tokens` must be an integer >= 1, got 0"),
        ({"max_new_tokens": "512"}, r"max_new_tokens` must be an integer >= 1, got '512'"),
        ({"max_new_tokens": 2.5}, r"max_new_tokens` must be an integer >= 1, got 2.5"),
        ({"temperature": -1}, r"`sdft_generation_kwargs.temperature` must be a finite number > 0, got -1"),
        ({"temperature": "hot"}, r"temperature` must be a finite number > 0, got 'hot'"),
        ({"temperature": math.nan}, r"temperature` must be a finite number > 0, got nan"),
        ({"top_p": 1.5}, r"`sdft_generation_kwargs.top_p` must be a finite number > 0 and <= 1, got 1.5"),
        ({"top_k": -3}, r"`sdft_generation_kwargs.top_k` must be an integer >= 0, got -3"),
        ({"do_sample": "false"}, r"`sdft_generation_kwargs.do_sample` must be true or false, got 'false'"),
        ('{"max_new_tokens": 256', r"`sdft_generation_kwargs` must be a JSON object .* got '\{\"max_new_tokens"),
        ("[256]", r"`sdft_generation_kwargs` must be a JSON object \(a dict of decoding options\), got \[256\]"),
    ],
)
def test_decoding_options_are_checked_with_their_field_named(config_class, decoding, message):
    with pytest.raises(ValueError, match=message):
        make(config_class, sdft_generation_kwargs=decoding)


def test_valid_decoding_options_pass_as_given():
    args = make(SDFTConfig, sdft_generation_kwargs='{"do_sample": false, "max_new_tokens": 256, "top_k": 0}')
    assert args.sdft_generation_kwargs == {"do_sample": False, "max_new_tokens": 256, "top_k": 0}
    assert make(SDFTConfig, sdft_generation_kwargs={"temperature": None}).sdft_generation_kwargs == {
        "temperature": None
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sdft_server_url": "localhost:8000"}, r"`sdft_server_url` must be an http\(s\) URL with a host"),
        ({"sdft_server_url": "http://"}, r"`sdft_server_url` must be an http\(s\) URL with a host"),
        ({"sdft_server_timeout": 0}, r"`sdft_server_timeout` must be a finite number > 0, got 0"),
        ({"sdft_server_timeout": math.nan}, r"`sdft_server_timeout` must be a finite number > 0, got nan"),
        ({"sdft_server_concurrency": 0}, r"`sdft_server_concurrency` must be an integer >= 1, got 0"),
        ({"sdft_server_concurrency": 2.5}, r"`sdft_server_concurrency` must be an integer >= 1, got 2.5"),
        ({"sdft_server_max_retries": -1}, r"`sdft_server_max_retries` must be an integer >= 0, got -1"),
    ],
)
def test_server_settings_are_checked_by_the_config(fields, message):
    server = {"sdft_engine": "server", "sdft_server_url": "http://localhost:8000", **fields}
    with pytest.raises(ValueError, match=message):
        make(SDFTConfig, **server)


def test_a_custom_template_with_a_placeholder_it_cannot_fill_is_refused():
    with pytest.raises(ValueError, match=r"placeholder\(s\) \['\{extra\}'\] that are never filled"):
        make(SDFTConfig, sdft_template="{instruction}\n{reference}\n{extra}")
    # other braces (JSON, code) are text, as before
    assert make(SDFTConfig, sdft_template='{instruction} {reference} {"answer": 1}').sdft_template


@pytest.mark.parametrize("config_class", [SDFTConfig, SDFTDynSDPBConfig])
def test_the_rewrite_batch_size_parses_from_the_command_line_or_is_sized_from_memory(config_class):
    common = ["--output_dir", "unused", "--use_cpu", "true", "--bf16", "false"]
    (given,) = TrlParser((config_class,)).parse_args_and_config([*common, "--sdft_batch_size", "8"])
    (default,) = TrlParser((config_class,)).parse_args_and_config(common)
    assert (given.sdft_batch_size, default.sdft_batch_size) == (8, None)
