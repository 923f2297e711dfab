"""Claims on the rows of a shared rewrite cache, so that runs using one cache at once split the work.

Before generating a row, a run creates `claims/<hash of the row key>.claim` in the cache directory with `O_EXCL`:
the filesystem lets exactly one creator win (NFS v3 and later included). The claim names its owner, and the owner keeps
`claims/owner-<token>.alive` fresh from a background thread while it runs. The owner deletes a claim only once the row
is in the cache (or when it gives the row up), so at any moment a row is cached, claimed, or free to claim.

A claim is stale, and the next run to meet it takes it over, when its owner's process is gone (seen at once on the
same machine) or its heartbeat is older than `STALE_AFTER_SECONDS` (another machine: dead, or cut off). Ages are
measured against the filesystem's clock (this run's own heartbeat), never against clocks of different machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

# How often a running owner refreshes its heartbeat.
HEARTBEAT_SECONDS = 20.0
# A heartbeat this old means its owner is gone: several missed beats, with room for slow shared filesystems.
STALE_AFTER_SECONDS = 120.0
# How often a run that waits for rows another run is generating looks at the cache again.
WAIT_POLL_SECONDS = 3.0
# Rows claimed at a time for an engine that does not say how many it generates together.
DEFAULT_CLAIM_BLOCK = 64
# The holder of a claim that cannot be read yet (its owner is writing it).
UNKNOWN_OWNER = {"host": "?", "pid": "?", "token": ""}


class RowClaims:
    """This run's claims in `directory` (`<cache dir>/claims`). Nothing is written before `start()`.

    `token` names the run (its heartbeat file, and its claims' owner); a random one by default.
    """

    def __init__(self, directory: str | os.PathLike, token: str | None = None):
        self.directory = Path(directory)
        self.token = token or secrets.token_hex(6)
        self.owner = {
            "host": socket.gethostname(),
            "machine": _machine_id(),
            "pid": os.getpid(),
            "started": _process_start(os.getpid()),
            "token": self.token,
        }
        self.enabled = True
        self._payload = json.dumps(self.owner).encode()
        self._heartbeat = self.directory / f"owner-{self.token}.alive"
        self._held: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Writes the heartbeat and keeps it fresh. Without write access, claims are off (with one warning)."""
        if self._thread is not None or not self.enabled:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._heartbeat.write_bytes(self._payload)
        except OSError as error:
            self.enabled = False
            logger.warning(
                f"Could not write claims in {self.directory} ({error.strerror}): generating without them, so another "
                "run on this cache at the same time may generate the same rows. Give this run write access to the "
                "cache directory to share the work."
            )
            return
        self._thread = threading.Thread(target=self._beat, name="rewrite-claims-heartbeat", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Gives up the claims still held (their rows were not finished) and removes the heartbeat."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.release(list(self._held))
        _unlink(self._heartbeat)

    def claim(self, keys: Sequence[str]) -> tuple[list[str], dict[str, Any] | None]:
        """Claims `keys` in order, up to the first one another live run holds.

        Returns the keys claimed and that run's owner record (None if all were claimed). Stopping there, rather than
        skipping the row, leaves a batch whole to whichever run claimed its first row: runs with the same settings
        then make the same batches, so the same samples, as one run would.
        """
        self.start()
        if not self.enabled:
            return list(keys), None
        claimed, holder, taken_over = [], None, {}
        for key in keys:
            holder, stale = self._claim_one(key)
            if holder is not None:
                break
            claimed.append(key)
            self._held.add(key)
            if stale is not None:
                taken_over.setdefault(stale, []).append(key)
        for (owner, reason), taken in taken_over.items():
            shown = ", ".join(taken[:5]) + (", ..." if len(taken) > 5 else "")
            logger.warning(
                f"Took over the claims on {len(taken)} row(s) ({shown}) of the run {owner}, because {reason}: this "
                "run generates them."
            )
        return claimed, holder

    def release(self, keys: Iterable[str]) -> None:
        """Deletes this run's claims on `keys`: call it only once their rows are in the cache (or given up)."""
        for key in keys:
            if key not in self._held:
                continue
            self._held.discard(key)
            path = self._path(key)
            try:
                owner = _owner_record(_read(path)[0])
            except FileNotFoundError:
                continue
            # Taken over while this run was silent (suspended, cut off): the claim is the new owner's now.
            if owner is not None and owner["token"] == self.token:
                _unlink(path)

    def _path(self, key: str) -> Path:
        # Row keys are free text: a hash makes a safe, fixed-length file name.
        return self.directory / f"{hashlib.sha256(key.encode('utf-8')).hexdigest()[:32]}.claim"

    def _claim_one(self, key: str) -> tuple[dict | None, tuple[str, str] | None]:
        """(None, None) if claimed, (None, (owner, why)) if taken over from a stale owner, (owner, None) if held."""
        path = self._path(key)
        holder = UNKNOWN_OWNER
        for _ in range(5):  # each lap follows a change made by another run meanwhile; a few in a row are unlikely
            if self._create(path):
                return None, None
            try:
                content, identity = _read(path)
            except FileNotFoundError:
                continue  # released just now: claim it
            holder = _owner_record(content)
            if holder is not None and holder["token"] == self.token:
                return None, None  # ours already
            reason = self._stale_reason(holder, identity[1])
            if reason is None:
                return holder or UNKNOWN_OWNER, None
            if self._take_over(path, content, identity):
                return None, (describe_owner(holder), reason)
        return holder or UNKNOWN_OWNER, None

    def _create(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:  # the claims directory was removed under us: make it again
            self.directory.mkdir(parents=True, exist_ok=True)
            return self._create(path)
        except OSError as error:
            raise _unwritable_claim(path, error) from error
        try:
            try:
                os.write(fd, self._payload)
            finally:
                os.close(fd)  # on NFS a failed write may show only here
        except OSError as error:
            _unlink(path)  # an empty claim would hold the row from other runs until it goes stale
            raise _unwritable_claim(path, error) from error
        return True

    def _take_over(self, path: Path, content: bytes, identity: tuple[int, float]) -> bool:
        """Replaces the stale claim at `path` (as read: `content`, `identity`) with ours; False if another run did.

        Renaming or deleting on the strength of an earlier read could remove a claim made since. So the takers of one
        stale claim first create a marker named after it, with `O_EXCL`: one at a time goes on, and it removes the
        claim only if it is still the one judged stale.
        """
        instance = hashlib.sha256(content + repr(identity).encode()).hexdigest()[:16]
        marker = path.with_name(f"{path.name}.{instance}.takeover")
        if not self._create_marker(marker):
            return False
        try:
            try:
                if _read(path) == (content, identity):
                    _unlink(path)
            except FileNotFoundError:
                pass  # released meanwhile
            return self._create(path)
        finally:
            _unlink(marker)

    def _create_marker(self, marker: Path) -> bool:
        for _ in range(2):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return True
            except FileExistsError:
                pass
            try:  # a marker lives for a moment; an old one was left by a taker killed in that moment
                if self._filesystem_now() - marker.stat().st_mtime <= STALE_AFTER_SECONDS:
                    return False
            except FileNotFoundError:
                continue
            _unlink(marker)
        return False

    def _stale_reason(self, holder: dict | None, claimed_at: float) -> str | None:
        """Why the claim of `holder` (None: empty or unreadable) made at `claimed_at` is stale; None if it is not."""
        now = self._filesystem_now()
        if holder is None:  # being written right now, or its creator died before writing it
            age = now - claimed_at
            return f"its claim has stayed unreadable for {age:.0f} s" if age > STALE_AFTER_SECONDS else None
        if (holder["host"], holder.get("machine")) == (self.owner["host"], self.owner["machine"]):
            if not _process_alive(holder["pid"], holder.get("started")):
                return "its process has ended"
        try:
            age = now - (self.directory / f"owner-{holder['token']}.alive").stat().st_mtime
        except FileNotFoundError:
            return "it has ended"  # an owner removes its heartbeat only after giving up its claims
        return f"it has given no sign of life for {age:.0f} s" if age > STALE_AFTER_SECONDS else None

    def _filesystem_now(self) -> float:
        """The filesystem's clock, which every machine sharing it sees alike: our heartbeat, touched now."""
        try:
            os.utime(self._heartbeat)
            return self._heartbeat.stat().st_mtime
        except OSError:
            return time.time()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self._heartbeat)
            except FileNotFoundError:  # removed by hand: without it our claims would look abandoned
                try:
                    self._heartbeat.write_bytes(self._payload)
                except OSError:
                    pass
            except OSError:
                pass  # a passing filesystem error: the next beat tries again


def describe_owner(owner: dict[str, Any] | None) -> str:
    """How a claim's owner is named to people: machine and process."""
    if not owner or not owner.get("token"):
        return "unknown (its claim is unreadable)"
    return f"{owner['host']} pid {owner['pid']}"


def _read(path: Path) -> tuple[bytes, tuple[int, float]]:
    """A claim's content, and its inode and modification time (to tell it from a new claim at the same path)."""
    with open(path, "rb") as file:
        stat = os.fstat(file.fileno())
        return file.read(), (stat.st_ino, stat.st_mtime)


def _owner_record(content: bytes) -> dict[str, Any] | None:
    try:
        owner = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(owner, dict) or not isinstance(owner.get("token"), str) or not isinstance(owner.get("pid"), int):
        return None
    if not isinstance(owner.get("host"), str):
        return None
    return owner


def _machine_id() -> str:
    """The running kernel and PID namespace: processes of two containers with one host name are told apart."""
    parts = []
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return " ".join(parts)


def _process_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (the command name before them may hold spaces), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def _process_start(pid: int) -> int | None:
    fields = _process_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _process_alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    fields = _process_stat(pid)
    if fields is None:
        return True
    if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    # The pid was reused by a newer process.
    return started is None or len(fields) <= 19 or int(fields[19]) == started


def _unwritable_claim(path: Path, error: OSError) -> OSError:
    """A claim that could not be written (a full disk, a quota), with its path and the way out; errno is kept."""
    return OSError(
        error.errno,
        f"Could not write the claim file {path}: {error.strerror}. Rows finished before this are kept in the rewrite "
        "cache; free some space or point `sdft_cache_dir` elsewhere, then rerun to resume.",
    )


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
