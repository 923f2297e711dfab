"""Fault injection on the rewrite cache (damaged lines, read-only caches, a full disk, a broken meta.json), its
incremental re-reading, and the claims that let runs share it."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from tiny_models import addition_rows, build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill import distill_dataset
from trl_selfdistill.cache import RowCache
from trl_selfdistill.claims import STALE_AFTER_SECONDS, RowClaims

REWRITE = dict(generation_kwargs={"max_new_tokens": 4}, batch_size=2, show_progress=False)


@pytest.fixture
def rewritten(tmp_path):
    """Four rows rewritten by a tiny model into `tmp_path/cache`: (model, tokenizer, dataset, cache directory)."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    dataset = addition_rows(4)  # short prompts: they fit the tiny model's positions
    first = distill_dataset(model, tokenizer, dataset, cache_dir=tmp_path / "cache", **REWRITE)
    assert first.report["generated"] == 4
    (directory,) = (tmp_path / "cache" / "rewrites").iterdir()
    return model, tokenizer, dataset, directory


def test_damaged_lines_are_skipped_named_and_regenerated(rewritten, caplog):
    model, tokenizer, dataset, directory = rewritten
    (path,) = directory.glob("rows-*.jsonl")
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
    assert not any((directory / "claims").glob("*")), "a finished cache needs no claims and no heartbeat"


def test_a_full_disk_names_the_cache_file_and_keeps_what_was_written(rewritten, monkeypatch, tmp_path):
    model, tokenizer, dataset, _ = rewritten

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("trl_selfdistill.cache.os.fsync", no_space)
    with pytest.raises(OSError, match=r"rows-rank0-\w+\.jsonl: No space left on device.*sdft_cache_dir") as failure:
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


def row(key: str, text: str = "rewritten") -> dict:
    return {"key": key, "rewrite": text, "truncated": False}


def test_refresh_reads_only_what_was_appended_and_waits_for_a_line_to_end(tmp_path, caplog):
    reader, writer = RowCache(tmp_path), RowCache(tmp_path, "rank0")
    assert reader.load() == {}
    writer.append([row("a"), row("b")])
    assert set(reader.refresh()) == {"a", "b"} and reader.refresh() == {}

    # What was read is not read again: damaging it in place goes unnoticed by a refresh (a new reader sees it).
    (written,) = tmp_path.glob("rows-rank0-*.jsonl")
    first_line = written.read_bytes().index(b"\n")
    with open(written, "r+b") as file:
        file.write(b"x" * first_line)
    with caplog.at_level(logging.WARNING):
        writer.append([row("c"), row("d")])
        assert set(reader.refresh()) == {"c", "d"}
        assert caplog.text == ""
        assert set(RowCache(tmp_path).load()) == {"b", "c", "d"}
        assert f"rewrite cache {written} (line 1: not complete JSON" in caplog.text
    caplog.clear()

    # Another run's new file, its last line still being written: read once it ends, never half.
    other = tmp_path / "rows-rank0-otherrun.jsonl"
    line = json.dumps(row("e", "from the other run")).encode()
    other.write_bytes(line[:12])
    assert reader.refresh() == {}
    with open(other, "ab") as file:
        file.write(line[12:] + b"\n" + b"not json\n")
    with caplog.at_level(logging.WARNING):
        assert reader.refresh() == {"e": row("e", "from the other run")}
    assert f"Skipped 1 unusable line(s) of the rewrite cache {other} (line 2: not complete JSON" in caplog.text
    assert set(reader.rows) == {"a", "b", "c", "d", "e"}
    assert set(RowCache(tmp_path, "rank0").load_own()) == {"b", "c", "d", "e"}


def test_each_run_appends_to_its_own_file(tmp_path):
    first, second = RowCache(tmp_path, "rank0"), RowCache(tmp_path, "rank0")
    first.append([row("a")])
    second.append([row("b")])
    files = sorted(tmp_path.glob("rows-*.jsonl"))
    assert len(files) == 2 and {first.run, second.run} == {path.stem.rsplit("-", 1)[1] for path in files}


def test_claims_are_exclusive_and_released(tmp_path):
    directory = tmp_path / "claims"
    ours, theirs = RowClaims(directory), RowClaims(directory)
    assert not directory.exists()  # nothing is written before the first claim
    assert ours.claim(["1:0", "2:0"]) == (["1:0", "2:0"], None)

    claimed, holder = theirs.claim(["1:0", "2:0"])
    assert claimed == [] and (holder["token"], holder["pid"]) == (ours.token, os.getpid())
    ours.release(["1:0"])  # its row is on disk
    claimed, holder = theirs.claim(["1:0", "2:0", "3:0"])
    assert claimed == ["1:0"] and holder["token"] == ours.token  # stops at the held row: batches stay whole

    ours.close()  # gives up what it still held, and its heartbeat
    assert theirs.claim(["2:0", "3:0"]) == (["2:0", "3:0"], None)
    theirs.release(["1:0", "2:0", "3:0"])
    theirs.close()
    assert list(directory.iterdir()) == []


def claim_and_die(directory, keys) -> int:
    """Claims `keys` in a process that then ends without releasing them, as a killed run would; returns its pid."""
    script = (
        "import os, sys; from trl_selfdistill.claims import RowClaims\n"
        "RowClaims(sys.argv[1]).claim(sys.argv[2:])\n"
        "os._exit(0)  # killed: no release, heartbeat left behind"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(directory), *keys])
    assert process.wait(timeout=120) == 0
    return process.pid


def test_concurrent_takers_of_stale_claims_never_both_win(tmp_path):
    directory = tmp_path / "claims"
    keys = [f"{i}:0" for i in range(120)]
    claim_and_die(directory, keys)
    takers = [RowClaims(directory) for _ in range(6)]
    start = threading.Barrier(len(takers))
    won = {}

    def take(taker):
        start.wait()
        won[taker.token] = [key for key in keys if taker.claim([key])[0]]

    threads = [threading.Thread(target=take, args=(taker,)) for taker in takers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [key for claimed in won.values() for key in claimed]
    assert sorted(winners) == sorted(keys)  # every stale claim taken over, each by exactly one run
    owners = {json.loads(path.read_text())["token"] for path in directory.glob("*.claim")}
    assert owners <= set(won) and len(list(directory.glob("*.claim"))) == len(keys)
    assert not list(directory.glob("*.takeover"))  # no marker left behind
    for taker in takers:
        taker.close()


def test_a_claim_from_another_machine_is_stale_once_its_heartbeat_stops(tmp_path, caplog):
    directory = tmp_path / "claims"
    far = RowClaims(directory)
    far.claim(["7:0"])
    # As the run on the other machine wrote it: its own host name, a pid that means nothing here.
    (claim,) = directory.glob("*.claim")
    owner = {"host": "node-17", "machine": "elsewhere", "pid": 1, "started": 0, "token": far.token}
    claim.write_text(json.dumps(owner))

    here = RowClaims(directory)
    claimed, holder = here.claim(["7:0"])
    assert claimed == [] and holder["host"] == "node-17"  # its heartbeat is fresh: it is alive

    # Its machine went silent: no heartbeat for longer than the limit.
    silent_since = time.time() - STALE_AFTER_SECONDS - 30
    os.utime(directory / f"owner-{far.token}.alive", (silent_since, silent_since))
    with caplog.at_level(logging.WARNING):
        assert here.claim(["7:0"]) == (["7:0"], None)
    assert "claims on 1 row(s) (7:0) of the run node-17 pid 1, because it has given no sign of life" in caplog.text
    assert json.loads(claim.read_text())["token"] == here.token
    far.close()  # back after all: it gives up what it thinks it holds, which leaves the new owner's claim alone
    assert json.loads(claim.read_text())["token"] == here.token
    here.close()
    assert list(directory.glob("*.claim")) == []


def test_without_write_access_claims_are_off_with_one_warning(tmp_path, caplog):
    blocked = tmp_path / "claims"
    blocked.write_text("")  # not a directory: nothing can be created there, whoever runs this (root included)
    claims = RowClaims(blocked)
    with caplog.at_level(logging.WARNING):
        assert claims.claim(["1:0"]) == (["1:0"], None)
        assert claims.claim(["2:0"]) == (["2:0"], None)
    assert caplog.text.count("generating without them") == 1
    claims.close()
