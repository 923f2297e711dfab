"""Fixtures of the SDFT tests: tiny tokenizers and models built locally."""

from __future__ import annotations

import pytest
from tiny_models import build_tiny_llama, build_tiny_tokenizer


@pytest.fixture
def make_tiny_tokenizer():
    """Factory fixture: ``make_tiny_tokenizer(chat_template=..., with_bos=...)``."""
    return build_tiny_tokenizer


@pytest.fixture
def tiny_tokenizer():
    """A tiny tokenizer with a BOS token and a chat template."""
    return build_tiny_tokenizer()


@pytest.fixture
def make_tiny_llama():
    """Factory fixture: ``make_tiny_llama(tokenizer, seed=0)``."""
    return build_tiny_llama
