"""Runs sharing one rewrite cache at once split the work: two processes started together, a killed run resumed, a dead
run's claims taken over at once, and a row another live run is generating waited for instead of generated again."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import addition_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_selfdistill import distill_dataset
from trl_selfdistill.cache import RowCache
from trl_selfdistill.claims import STALE_AFTER_SECONDS, RowClaims

HERE = Path(__file__).parent
# 41 rows in batches of 4: ten whole batches, and the shortest prompt alone in the last one.
ROWS = 41
REWRITE = {"generation_kwargs": {"max_new_tokens": 24}, "batch_size": 4, "show_progress": False}


@contextlib.contextmanager
def one_thread():
    """Generates as the subprocess runs do (one thread each), so that sampled rewrites can be compared exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(seed, cache_root):
    with one_thread():
        return distill_dataset(seed.model, seed.tokenizer, addition_rows(ROWS), cache_dir=cache_root, **REWRITE)


def rewrites(cache_root: Path) -> dict[str, str]:
    (directory,) = (cache_root / "rewrites").iterdir()
    return {key: record["rewrite"] for key, record in RowCache(directory).load().items()}


def written(cache_root: Path) -> Counter:
    """How many times each row was written, over every run's file."""
    (directory,) = (cache_root / "rewrites").iterdir()
    lines = [line for path in directory.glob("rows-*.jsonl") for line in path.read_text().splitlines()]
    return Counter(json.loads(line)["key"] for line in lines)


@pytest.fixture(scope="module")
def seed(tiny_model_dir, tmp_path_factory):
    """The tiny model and its tokenizer as the runs load them, and what one uninterrupted run writes."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    seed = SimpleNamespace(model=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    root = tmp_path_factory.mktemp("uninterrupted")
    assert run(seed, root).report["generated"] == ROWS
    (directory,) = (root / "rewrites").iterdir()
    (rows_file,) = directory.glob("rows-*.jsonl")
    seed.rewrites = rewrites(root)
    seed.key = directory.name  # the cache key: the same under any cache root
    seed.last = json.loads(rows_file.read_text().splitlines()[-1])["key"]  # the row alone in the last batch
    return seed


def start_worker(seed, cache_root: Path, result: Path, start: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(HERE / "shared_cache_worker.py"), seed.model_dir, str(cache_root), str(result),
               str(start), str(ROWS), json.dumps(REWRITE)]  # fmt: skip
    log = open(result.with_suffix(".log"), "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


@pytest.mark.slow
def test_two_runs_started_together_split_the_rows_and_write_what_one_run_writes(seed, tmp_path):
    start = tmp_path / "start"
    results = [tmp_path / f"run{n}.json" for n in (0, 1)]
    workers = [start_worker(seed, tmp_path / "cache", result, start) for result in results]
    wait_for(lambda: all(Path(f"{result}.ready").exists() for result in results), "both runs to load")
    start.touch()
    for worker, result in zip(workers, results, strict=True):
        assert worker.wait(timeout=300) == 0, result.with_suffix(".log").read_text()[-3000:]

    reports = [json.loads(result.read_text()) for result in results]
    generated = [report["report"]["generated"] for report in reports]
    assert sum(generated) == ROWS and min(generated) > 0, generated  # split, and no row done twice
    assert set(written(tmp_path / "cache").values()) == {1}
    assert reports[0]["completions"] == reports[1]["completions"]
    # Whole batches went to one run or the other: the very samples one uninterrupted run makes.
    assert rewrites(tmp_path / "cache") == seed.rewrites
    assert list((tmp_path / "cache" / "rewrites" / seed.key / "claims").iterdir()) == []  # nothing left claimed


@pytest.mark.slow
def test_a_killed_run_is_resumed_at_once_and_loses_nothing(seed, tmp_path):
    start = tmp_path / "start"
    start.touch()
    worker = start_worker(seed, tmp_path / "cache", tmp_path / "killed.json", start)
    rows = tmp_path / "cache" / "rewrites" / seed.key
    wait_for(lambda: any(path.read_bytes() for path in rows.glob("rows-*.jsonl")), "the first batch on disk")
    worker.send_signal(signal.SIGKILL)  # in the middle of its work, claims held
    worker.wait(timeout=60)
    before = rewrites(tmp_path / "cache")
    assert 0 < len(before) < ROWS

    began = time.monotonic()
    resumed = run(seed, tmp_path / "cache")
    assert time.monotonic() - began < STALE_AFTER_SECONDS / 2  # the dead run's claims were not waited out
    assert resumed.report["generated"] == ROWS - len(before)
    assert rewrites(tmp_path / "cache") == seed.rewrites


def test_claims_of_a_dead_run_are_taken_over_at_once_and_named(seed, tmp_path, caplog):
    claims = tmp_path / "cache" / "rewrites" / seed.key / "claims"
    script = "import os, sys; from trl_selfdistill.claims import RowClaims; RowClaims(sys.argv[1]).claim(sys.argv[2:])"
    dead = subprocess.Popen([sys.executable, "-c", script + "; os._exit(0)", str(claims), *seed.rewrites])
    assert dead.wait(timeout=120) == 0  # it claimed every row, then died without a word
    assert len(list(claims.glob("*.claim"))) == ROWS

    began = time.monotonic()
    with caplog.at_level(logging.WARNING):
        result = run(seed, tmp_path / "cache")
    assert time.monotonic() - began < STALE_AFTER_SECONDS / 2
    assert result.report["generated"] == ROWS
    assert f"of the run {os.uname().nodename} pid {dead.pid}, because its process has ended" in caplog.text
    assert rewrites(tmp_path / "cache") == seed.rewrites
    assert list(claims.glob("*.claim")) == []


def test_a_row_another_live_run_is_generating_is_waited_for_not_generated(seed, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("trl_selfdistill.claims.WAIT_POLL_SECONDS", 0.2)
    directory = tmp_path / "cache" / "rewrites" / seed.key
    other = RowClaims(directory / "claims")  # another run, alive: it is this very process
    assert other.claim([seed.last]) == ([seed.last], None)
    finished = threading.Event()

    def other_run():
        # It finishes its row only once the run under test has done all the others: that run must wait for it.
        while not finished.is_set() and len(RowCache(directory).load() if directory.exists() else {}) < ROWS - 1:
            time.sleep(0.05)
        time.sleep(1.0)
        RowCache(directory, "other").append(
            [{"key": seed.last, "rewrite": "written by the other run", "truncated": False}]
        )
        other.release([seed.last])
        other.close()

    thread = threading.Thread(target=other_run)
    thread.start()
    try:
        with caplog.at_level(logging.WARNING):
            result = run(seed, tmp_path / "cache")
    finally:
        finished.set()
        thread.join()
    assert result.report["generated"] == ROWS - 1
    assert "Waiting for 1 row(s) of this run's share that another run on the same cache is generating" in caplog.text
    assert f"pid {os.getpid()}" in caplog.text
    assert rewrites(tmp_path / "cache") == {**seed.rewrites, seed.last: "written by the other run"}
    assert written(tmp_path / "cache")[seed.last] == 1
