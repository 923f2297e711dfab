"""Session-wide fixtures shared by all test folders."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def bundled_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Directory of the bundled SmolLM2-135M-Instruct model, converted from its GGUF once per session.

    An already-set ``TRL_SELFDISTILL_CACHE`` is respected (so CI can share one conversion across runs);
    otherwise the cache points at a session temporary directory for the whole session.
    """
    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get("TRL_SELFDISTILL_CACHE"):
            patch.setenv("TRL_SELFDISTILL_CACHE", str(tmp_path_factory.mktemp("trl_selfdistill_cache")))
        from trl_selfdistill.models import bundled_model_path

        path = bundled_model_path()
        yield path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of the bundled model (converted once per session, then loaded at 135M parameters) are slow."""
    for item in items:
        if "bundled_model_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama and its tokenizer saved on disk, loaded by path as users load theirs."""
    from tiny_models import build_tiny_llama, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
