"""Files and folders written whole or not at all: the package's one way to replace something on disk.

A reader (another process, a resumed run) sees the old content or the new, never a cut file: the new content is
written beside the target under a temporary name and renamed over it, which POSIX makes atomic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", *, durable: bool = False) -> Iterator[IO[Any]]:
    """Yields a temporary file that replaces `path` when the block ends without error, and is removed otherwise.

    `mode` is `"w"` (UTF-8 text) or `"wb"`. `durable=True` also flushes it to the device before the rename, for
    files a crash of the machine must not lose (checkpoints). The file is readable by everyone who shares the folder,
    as a plain write would leave it.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes with mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoding = "utf-8" if mode == "w" else None
    handle = tempfile.NamedTemporaryFile(
        mode, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False, encoding=encoding
    )
    try:
        with handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(handle.name, 0o644)  # NamedTemporaryFile makes it private
        os.replace(handle.name, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(handle.name)
        raise


def staging_prefix(path: str | os.PathLike) -> str:
    """The name prefix of `atomic_directory`'s temporary folders for `path` (to clear leftovers of killed runs)."""
    return f".{Path(path).name}.tmp-"


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary sibling folder that replaces `path` when the block ends without error.

    An existing `path` must be removed by the caller first (a folder cannot be renamed over a non-empty one).
    On error the temporary folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(path), dir=path.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the folder may be shared
        yield staging
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
