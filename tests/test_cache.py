"""Fault injection on the rewrite cache: damaged lines, read-only caches, a full disk, a broken meta.json."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys

import pytest
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill import distill_dataset
from trl_selfdistill.cache import RowCache
from trl_selfdistill.data import bundled_gsm8k, gsm8k_to_prompt_completion

REWRITE = dict(generation_kwargs={"max_new_tokens": 4}, batch_size=2, show_progress=False)


@pytest.fixture
def rewritten(tmp_path):
    """Four rows rewritten by a tiny model into `tmp_path/cache`: (model, tokenizer, dataset, cache directory)."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=4))
    first = distill_dataset(model, tokenizer, dataset, cache_dir=tmp_path / "cache", **REWRITE)
    assert first.report["generated"] == 4
    (directory,) = (tmp_path / "cache" / "rewrites").iterdir()
    return model, tokenizer, dataset, directory


def test_damaged_lines_are_skipped_named_and_regenerated(rewritten, caplog):
    model, tokenizer, dataset, directory = rewritten
    path = directory / "rows-rank0.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    good = json.loads(lines[3])
    damaged = [b'{"key": "0:0", "rewrite": "caf\xe9"}\n', b"[1, 2]\n", b'{"key": "2:0", "rewrite": null}\n', lines[3]]
    path.write_bytes(b"".join(damaged))
    keys = {json.loads(line)["key"] for line in lines[:3]}

    with caplog.at_level(logging.WARNING):
        rerun = distill_dataset(model, tokenizer, dataset, cache_dir=directory.parent.parent, **REWRITE)
    assert (rerun.report["generated"], rerun.report["from_cache"]) == (3, 1)
    assert f"Skipped 3 unusable line(s) of the rewrite cache {path} (line 1: not UTF-8)" in caplog.text
    rows = RowCache(directory).load()
    assert set(rows) == keys | {good["key"]} and rows[good["key"]] == good  # the good row was kept as it was
    assert all(isinstance(row["rewrite"], str) for row in rows.values())


def test_a_finished_cache_is_read_without_write_access(rewritten):
    model, tokenizer, dataset, directory = rewritten
    opened_for_writing = []

    def audit(event, args):
        if event == "open" and str(args[0]).startswith(str(directory)) and args[1] not in (None, "r", "rb"):
            opened_for_writing.append(args)

    sys.addaudithook(audit)  # cannot be removed: it only looks at this test's directory
    for path in directory.iterdir():
        path.chmod(0o444)
    directory.chmod(0o555)
    try:
        rerun = distill_dataset(model, tokenizer, dataset, cache_dir=directory.parent.parent, **REWRITE)
    finally:
        directory.chmod(0o755)
    assert rerun.report["from_cache"] == 4
    assert opened_for_writing == []


def test_a_full_disk_names_the_cache_file_and_keeps_what_was_written(rewritten, monkeypatch, tmp_path):
    model, tokenizer, dataset, _ = rewritten

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("trl_selfdistill.cache.os.fsync", no_space)
    with pytest.raises(OSError, match=r"rows-rank0\.jsonl: No space left on device.*distill_cache_dir") as failure:
        distill_dataset(model, tokenizer, dataset, cache_dir=tmp_path / "full", **REWRITE)
    assert failure.value.errno == errno.ENOSPC


def test_an_empty_or_broken_meta_json_is_rewritten_whole(tmp_path):
    cache = RowCache(tmp_path)
    (tmp_path / "meta.json").write_text("")  # what a full disk left behind
    cache.write_metadata({"generator": {"name": "seed"}})
    assert json.loads((tmp_path / "meta.json").read_text()) == {"generator": {"name": "seed"}}
    cache.write_metadata({"generator": {"name": "another"}})  # a whole one is kept
    assert json.loads((tmp_path / "meta.json").read_text())["generator"]["name"] == "seed"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temporary file left
