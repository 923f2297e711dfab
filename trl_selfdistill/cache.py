"""An append-only, resumable, self-healing on-disk cache of generated rows.

One directory per cache key. Each writer (one per process and run) appends JSON lines to its own file, flushed and
synced after every group of rows, so a run killed at any point keeps everything it had finished and never corrupts
another process's file. Reading merges every file of the directory and needs no write access (a finished cache on a
read-only mount is usable); re-reading reads only what was appended since, so runs sharing a cache can look often. A
line that cannot be used (damaged, not a row) is skipped with a warning that names the file and line, and its row is
generated again: one bad line never costs the good ones. A last line without its end is left until it is complete
(another run may be writing it); if a kill cut it, its row is generated again.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .files import atomic_file

logger = logging.get_logger(__name__)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serializable parts, used to name cache directories."""
    payload = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


class RowCache:
    """Rows keyed by `record["key"]` (a string), each with a string `record["rewrite"]` and a boolean
    `record["truncated"]` (it stopped at `max_new_tokens`), stored as JSON lines.

    `writer` names this process's file, `rows-<writer>-<run>.jsonl`, where `run` is random per `RowCache`: two runs
    sharing the cache never append to one file.
    """

    def __init__(self, directory: str | os.PathLike, writer: str = "rank0"):
        self.directory = Path(directory)
        self.writer = writer
        self.run = secrets.token_hex(6)
        self._path = self.directory / f"rows-{writer}-{self.run}.jsonl"
        self.rows: dict[str, dict] = {}  # every usable row read or appended so far
        self._read_up_to: dict[Path, tuple[int, int]] = {}  # per file: bytes and lines consumed, always whole lines

    def load(self) -> dict[str, dict]:
        """Every usable row written so far, by any writer, read from scratch."""
        self.rows, self._read_up_to = {}, {}
        self.refresh()
        return dict(self.rows)

    def refresh(self) -> dict[str, dict]:
        """Reads only what was appended since the last read (and new files); returns the rows read now.

        A last line without its newline is left for a later read: another run may be writing it right now.
        """
        fresh = {}
        for path in sorted(self.directory.glob("rows-*-*.jsonl")):
            offset, lines = self._read_up_to.get(path, (0, 0))
            records, offset, lines = _read_whole_lines(path, offset, lines)
            self._read_up_to[path] = (offset, lines)
            fresh.update(records)
        self.rows.update(fresh)
        return fresh

    def load_own(self) -> dict[str, dict]:
        """The rows this writer wrote, in this run and earlier ones."""
        rows = {}
        for path in sorted(self.directory.glob(f"rows-{self.writer}-*.jsonl")):
            rows.update(_read_whole_lines(path, 0, 0)[0])
        return rows

    def append(self, records: Iterable[dict]) -> None:
        records = list(records)
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if not lines:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self._path, "ab") as file:
                # A failed or killed write leaves a line without its newline: end it, so this row starts a line.
                if file.tell() > 0 and not _ends_with_newline(self._path):
                    lines = "\n" + lines
                file.write(lines.encode("utf-8"))
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            raise OSError(
                error.errno,
                f"Could not write the rewrite cache {self._path}: {error.strerror}. Rows finished before this are "
                "kept; free some space or point `sdft_cache_dir` elsewhere, then rerun to resume.",
            ) from error
        self.rows.update((record["key"], record) for record in records)

    def write_metadata(self, metadata: dict) -> None:
        """Records what the key was made of, for people looking at the cache; written atomically, repaired if bad."""
        path = self.directory / "meta.json"
        try:
            json.loads(path.read_text(encoding="utf-8"))
            return  # already there and whole
        except (OSError, ValueError):
            pass
        try:
            with atomic_file(path) as file:
                json.dump(metadata, file, indent=2, default=str, ensure_ascii=False)
        except OSError as error:  # informational only: a read-only cache is still usable
            logger.warning(f"Could not write {path} ({error.strerror}); the cache works without it.")


def _read_whole_lines(path: Path, offset: int, lines: int) -> tuple[dict[str, dict], int, int]:
    """The rows of `path`'s complete lines after byte `offset` (line `lines`), and how far that reads."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < offset:  # shorter than what was read: replaced by hand, so read it again from the start
                offset, lines = 0, 0
            file.seek(offset)
            data = file.read(size - offset)
    except FileNotFoundError:  # removed between listing and reading
        return {}, offset, lines
    whole = data.rfind(b"\n") + 1
    rows, skipped = {}, []
    for number, line in enumerate(data[:whole].split(b"\n")[:-1], start=lines + 1):
        record, problem = _parse_row(line)
        if record is None:
            skipped.append((number, problem))
        else:
            rows[record["key"]] = record
    if skipped:
        first, problem = skipped[0]
        logger.warning(
            f"Skipped {len(skipped)} unusable line(s) of the rewrite cache {path} (line {first}: {problem}); "
            "their rows will be generated again."
        )
    return rows, offset + whole, lines + data.count(b"\n", 0, whole)


def _parse_row(line: bytes) -> tuple[dict | None, str]:
    """The row a cache line holds, or None and why it cannot be used."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError:
        return None, "not complete JSON (cut by a kill?)"
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        return None, "not a row with a string 'key'"
    if not isinstance(record.get("rewrite"), str):
        return None, "its 'rewrite' is not a string"
    if not isinstance(record.get("truncated"), bool):
        return None, "its 'truncated' is not true or false"
    return record, ""


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"
