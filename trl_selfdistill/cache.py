"""An append-only, resumable on-disk cache of generated rows.

One directory per cache key. Each writer (one per process) appends JSON lines to its own file, flushed and synced
after every batch, so a run killed at any point keeps everything it had finished and never corrupts another
process's file. Reading merges every file of the directory; a line cut short by a kill is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serializable parts, used to name cache directories."""
    payload = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


class RowCache:
    """Rows keyed by `record["key"]`, stored as JSON lines under `directory`."""

    def __init__(self, directory: str | os.PathLike, writer: str = "rank0"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._path = self.directory / f"rows-{writer}.jsonl"
        # A kill mid-write leaves a line without its newline: end it, so the next row starts on a line of its own.
        if self._path.exists() and self._path.stat().st_size > 0:
            with open(self._path, "rb+") as file:
                file.seek(-1, os.SEEK_END)
                if file.read(1) != b"\n":
                    file.write(b"\n")

    def load(self) -> dict[str, dict]:
        """Every complete row written so far, by any writer."""
        return self._read(sorted(self.directory.glob("rows-*.jsonl")))

    def load_own(self) -> dict[str, dict]:
        """The rows this writer wrote."""
        return self._read([self._path] if self._path.exists() else [])

    @staticmethod
    def _read(paths: list[Path]) -> dict[str, dict]:
        rows = {}
        for path in paths:
            with open(path, encoding="utf-8") as file:
                for line in file:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # the last line of a killed run
                        continue
                    rows[record["key"]] = record
        return rows

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if not lines:
            return
        with open(self._path, "a", encoding="utf-8") as file:
            file.write(lines)
            file.flush()
            os.fsync(file.fileno())

    def write_metadata(self, metadata: dict) -> None:
        """Records what the key was made of, for people looking at the cache."""
        path = self.directory / "meta.json"
        if not path.exists():
            path.write_text(json.dumps(metadata, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
