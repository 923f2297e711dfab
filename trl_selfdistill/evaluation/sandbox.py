"""Run untrusted, model-generated Python programs (e.g. HumanEval completions) in a contained child process.

:func:`run_untrusted` writes the program to a throwaway directory and runs it with ``python -I`` (isolated mode,
base interpreter, no venv site-packages) in a fresh process group, with a minimal environment (``PATH``, ``LANG``,
``HOME`` and ``TMPDIR`` pointing into the throwaway directory; nothing inherited, so no secrets or tokens).

Containment, in the order it is applied in the child (``preexec_fn``):

* **Network** - when running as root on Linux, the child enters a new network namespace (``unshare(CLONE_NEWNET)``
  via ``ctypes``): only a loopback device exists and it is down, so every connect, including to ``127.0.0.1``,
  fails with ``ENETUNREACH``. If namespaces are not permitted (not root, seccomp, ...), a best-effort fallback
  replaces ``socket.socket``/``socket.create_connection`` with functions that raise before the program runs; a
  program that imports ``_socket`` directly bypasses this fallback.
* **Identity and IPC** - with a mount namespace (root on Linux), each run gets a uid of its own, drawn from a range
  no account uses, and a new IPC namespace: a run cannot signal, trace or read the ``/proc`` of another run's
  processes, its ``RLIMIT_NPROC`` counts its own processes only, its SysV shared memory, semaphores and queues die
  with it, and when it returns every process of that uid is ``SIGKILL``-ed, including those that left the process
  group (``setsid()``, double forks).
* **Filesystem** - in the new mount namespace (root mount made private so nothing leaks back), the program is
  ``chroot``-ed into a root of its own (:func:`_build_root`): the system's programs and libraries (``/usr`` and its
  merged-``/usr`` links) and the interpreter's prefix, read-only; ``/dev/null``, ``zero``, ``random``,
  ``urandom``; a small private ``/dev/shm``; a fresh ``/proc`` with ``hidepid=2`` (the program sees only its own
  processes: no other command line, environment or root); and the work directory, a fresh tmpfs of
  ``max_disk_bytes`` owned by the run's uid, holding ``main.py`` and the program's cwd, so that what the program
  writes is bounded as a whole and vanishes with the run. Nothing else of the host is there: no home, no project
  checkout, no ``/tmp``, no ``/run`` or other unix sockets, no ``/sys``. Each of the caller's ``hidden_paths`` that
  the root does show (e.g. reference answers installed in the interpreter's prefix) is covered as well: a
  directory by an empty read-only tmpfs, a file by ``/dev/null``. ``RLIMIT_FSIZE`` bounds every file it writes,
  stdout/stderr included.
* **Resources** - ``RLIMIT_AS`` (memory: big allocations raise ``MemoryError`` in the child), ``RLIMIT_CPU``,
  ``RLIMIT_FSIZE``, ``RLIMIT_CORE=0`` and ``RLIMIT_NPROC`` (per run, through its uid). Where this process may make
  cgroup v1 groups (its own memory, pids and cpu groups writable, as for root in many containers), the run gets a
  group of each that binds it as a whole: ``memory_bytes`` of memory for all its processes together (the kernel
  kills one that goes over), ``max_processes`` processes, and one CPU's time at most.
* **Time** - a wall-clock timeout, after which (and after every normal exit) the process group and every process of
  the run's uid are ``SIGKILL``-ed. The run's folder and groups are then removed, however deep the program made it.

What it does not contain (with namespaces):

* Without writable cgroup v1 hierarchies (cgroup v2 hosts, unprivileged containers), **memory** and **CPU time** are
  limited per process only: ``max_processes`` processes may each use ``memory_bytes`` and ``cpu_seconds``.
* What ``/usr`` and the interpreter's prefix hold stays **readable** (e.g. packages installed there).

Without namespaces (not root, or namespaces not permitted): only the rlimits, the timeout, the process-group kill, the
``HOME``/``TMPDIR`` redirect and the socket fallback apply. The program runs as the caller's user: it can read and
write whatever that user can, nothing is hidden, ``RLIMIT_NPROC`` counts all of that user's processes (root: not
enforced), SysV IPC is shared, and a program that calls ``setsid()`` survives the final kill (bound by its rlimits).

``preexec_fn`` is not safe in a multi-threaded parent; call this from the main thread of a process without other
threads that hold locks (the usual evaluation loop).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxResult", "run_untrusted"]

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_NOBODY = 65534
# Each run gets its own uid from this range (no user or group of the system owns one): a run cannot signal, trace or
# read the /proc of another, its process limit is its own, and everything it started can be found and killed.
_RUN_UIDS = range(1_500_000_000, 1_600_000_000)
_TAIL_CHARS = 4096

logger = logging.getLogger(__name__)
_TRUE = shutil.which("true") or "/bin/true"  # exec'ed by the killer child once it has done its work

# Load libc in the parent: dlopen after fork (inside preexec_fn) is not async-signal-safe.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

# Runs the program with sockets disabled; used only when no network namespace is available.
_SOCKET_GUARD = """\
import runpy, socket, sys
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
socket.socket = socket.create_connection = socket.socketpair = socket.create_server = _no_network
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``passed`` means exit code 0 within all limits and, when the run asked for a ``completion_marker``, that marker
    in the program's stdout.
    """

    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    reason: str


def _check(rc: int, what: str) -> None:
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {target}")


def _isolate(
    work: str,
    *,
    netns: bool,
    mntns: bool,
    limits: dict[int, tuple[int, int]],
    hidden_paths: tuple[str, ...] = (),
    uid: int = _NOBODY,
    program: bytes | None = None,
    disk_bytes: int = 64 * 2**20,
    cgroups: tuple[str, ...] = (),
) -> None:
    """Child-side setup, run between fork and exec. Any exception aborts the launch.

    ``hidden_paths`` (absolute, resolved, none of them holding the work dir or the interpreter prefix) are covered
    once the prefix and the work dir are bound back, so a path inside the prefix is hidden too. With a mount
    namespace the work dir is a fresh tmpfs of ``disk_bytes`` owned by ``uid``, into which ``program`` is written as
    ``main.py``: what the program writes is bounded as a whole and vanishes with the run.
    """
    for folder in cgroups:  # first, while /sys is still in view: every process the program starts is counted
        with open(os.path.join(folder, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
    if netns:
        _check(_libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    if mntns:
        # IPC: SysV shared memory, semaphores and message queues of the run die with it, and others' are not seen.
        _check(_libc.unshare(_CLONE_NEWNS | _CLONE_NEWIPC), "unshare(CLONE_NEWNS | CLONE_NEWIPC)")
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates to the host
        root = _build_root(work, uid, program or b"", disk_bytes)
        for path in hidden_paths:  # those inside what the root shows (e.g. a package in the interpreter's prefix)
            target = root + path
            if os.path.isdir(target):
                _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_RDONLY, "mode=755,size=4k")
            elif os.path.exists(target):
                _mount("/dev/null", target, None, _MS_BIND)  # a mount cannot remove a file, only cover it
                _mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY)
        _mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        os.chroot(root)
        os.chdir(work)
    for limit, value in limits.items():
        if limit != resource.RLIMIT_AS:
            resource.setrlimit(limit, value)
    if mntns:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    # Last: the forked child may already exceed the new address-space limit.
    resource.setrlimit(resource.RLIMIT_AS, limits[resource.RLIMIT_AS])


# What Python needs from the host, shown read-only in the run's root; symlinks (merged /usr) are copied as links.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


def _bind(source: str, target: str, *, read_only: bool = True) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "ab").close()  # a mount point for a file is a file
    _mount(source, target, None, _MS_BIND | _MS_REC)
    if read_only:
        _mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _build_root(work: str, uid: int, program: bytes, disk_bytes: int) -> str:
    """The run's whole filesystem, on a tmpfs next to `work` (in the run's mount namespace): returns its path.

    It holds the system's programs and libraries and the interpreter's prefix, read-only; four devices; a
    `/dev/shm` and a `/proc` of its own (`hidepid=2`: only the run's processes, no other command line, environment
    or root); and the work dir, a fresh tmpfs of `disk_bytes` owned by `uid` with `main.py` in it, at the same path
    as on the host. Nothing else of the host exists there: no home, no checkout, no `/tmp`, no `/run` sockets.
    """
    root = os.path.join(os.path.dirname(work), "root")
    _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=1m")
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            _bind(path, root + path)
    for path in _SYSTEM_FILES:
        if os.path.isfile(path):
            _bind(os.path.realpath(path), root + path)
    prefix = os.path.realpath(sys.base_prefix)
    if not os.path.isdir(root + prefix):  # a prefix outside /usr (pyenv, conda, a container's /opt)
        _bind(prefix, root + prefix)
    for device in _DEVICES:
        if os.path.exists(device):
            _bind(device, root + device, read_only=False)  # a read-only mount would refuse writes to /dev/null
    os.makedirs(root + "/dev/shm")
    _mount("tmpfs", root + "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m")
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=2")
    os.makedirs(root + work)
    _mount("tmpfs", root + work, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={disk_bytes},mode=700,uid={uid},gid={uid}")
    main = root + os.path.join(work, "main.py")
    with open(main, "wb") as file:
        file.write(program)
    os.chown(main, uid, uid)
    return root


@functools.lru_cache(maxsize=1)
def _namespace_support() -> tuple[bool, bool]:
    """(network namespace, mount namespace + nobody) as far as this machine allows; probed once."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return False, False
    limits = {resource.RLIMIT_AS: (resource.RLIM_INFINITY, resource.RLIM_INFINITY)}
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "work")
        os.makedirs(work, mode=0o777)
        os.makedirs(os.path.join(tmp, "root"))
        for netns, mntns in ((True, True), (True, False)):
            try:
                subprocess.run(
                    [_interpreter(), "-I", "-c", "pass"],
                    cwd=work,
                    env={},
                    preexec_fn=functools.partial(_isolate, work, netns=netns, mntns=mntns, limits=limits),
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
                return netns, mntns
            except (OSError, subprocess.SubprocessError):
                continue
    return False, False


def _interpreter() -> str:
    # The base interpreter, not the venv one: a venv may sit anywhere, the prefix is what gets bound back.
    base = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(base)


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_CHARS))
        return f.read().decode("utf-8", errors="replace")


_CGROUP_ROOT = "/sys/fs/cgroup"
_CPU_PERIOD_US = 100_000


@functools.lru_cache(maxsize=1)
def _cgroup_parents() -> dict[str, str]:
    """`{controller: folder}` of the cgroup v1 hierarchies (memory, pids, cpu) in which this process may make a
    child group: the groups it is in, where they are writable. Empty without cgroup v1 (or without the right)."""
    parents = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return parents
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            folder = os.path.join(_CGROUP_ROOT, controller, path.lstrip("/"))
            if controller in ("memory", "pids", "cpu") and os.access(folder, os.W_OK):
                if os.path.isfile(os.path.join(folder, "cgroup.procs")):
                    parents[controller] = folder
    return parents


def _make_cgroups(name: str, memory_bytes: int, max_processes: int) -> list[str]:
    """One group per controller for a run: its memory and processes together, and one CPU's time at most."""
    settings = {
        "memory": [("memory.limit_in_bytes", memory_bytes), ("memory.memsw.limit_in_bytes", memory_bytes)],
        "pids": [("pids.max", max_processes)],
        "cpu": [("cpu.cfs_period_us", _CPU_PERIOD_US), ("cpu.cfs_quota_us", _CPU_PERIOD_US)],
    }
    made = []
    try:
        for controller, parent in _cgroup_parents().items():
            folder = os.path.join(parent, name)
            os.mkdir(folder)
            made.append(folder)
            for setting, value in settings[controller]:
                path = os.path.join(folder, setting)
                if os.path.exists(path):  # memsw exists only with swap accounting
                    Path(path).write_text(str(value))
    except OSError as error:
        logger.warning(f"Sandbox: cgroups unavailable ({error}); only per-process limits apply.")
        _remove_cgroups(made)
        return []
    return made


def _remove_cgroups(folders: list[str]) -> None:
    for folder in folders:
        for _ in range(50):  # its killed processes leave it within moments
            try:
                os.rmdir(folder)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)
        else:
            logger.warning(f"Sandbox: could not remove the cgroup {folder}.")


def _uids_in_use() -> set[int]:
    uids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                uids.add(entry.stat().st_uid)  # /proc/<pid> belongs to the process's uid
            except OSError:  # gone meanwhile
                pass
    return uids


def _fresh_uid() -> int:
    """A uid from `_RUN_UIDS` that no running process has."""
    in_use = _uids_in_use()
    while True:
        uid = _RUN_UIDS[secrets.randbelow(len(_RUN_UIDS))]
        if uid not in in_use:
            return uid


def _live_processes_of(uid: int) -> list[int]:
    """Pids running as `uid`, zombies (already dead, waiting to be reaped) left out."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                state = stat.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z":
            pids.append(int(entry.name))
    return pids


def _kill_as(uid: int) -> None:
    """In a child, as `uid`: `kill(-1, SIGKILL)` reaches every process of that uid and nothing else."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    for _ in range(64):  # a few rounds: a forking program may still be making children during the first
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return


def _kill_processes_of(uid: int) -> None:
    """SIGKILL everything the run started, wherever it went (a new session, a double fork), until none is left."""
    for _ in range(32):
        if not _live_processes_of(uid):
            return
        subprocess.run([_TRUE], preexec_fn=functools.partial(_kill_as, uid), env={}, check=False)
    left = _live_processes_of(uid)
    if left:
        logger.warning(f"Sandbox: {len(left)} process(es) of uid {uid} survived SIGKILL: {left[:10]}.")


def _remove_tree(path: str) -> None:
    """Removes a run's folder; never raises (a deep tree makes `shutil.rmtree` recurse past Python's limit)."""
    if subprocess.run(["rm", "-rf", "--one-file-system", path], capture_output=True, check=False).returncode:
        logger.warning(f"Sandbox: could not remove {path}.")


def _reason(returncode: int, timed_out: bool, finished: bool) -> str:
    if timed_out:
        return "wall-clock timeout"
    if returncode == 0:
        return "ok" if finished else "exited before finishing (exit code 0, but no completion marker in stdout)"
    if returncode < 0:
        sig = signal.Signals(-returncode)
        hint = {signal.SIGXCPU: " (cpu limit)", signal.SIGXFSZ: " (file size limit)"}.get(sig, "")
        return f"killed by {sig.name}{hint}"
    return f"exit code {returncode}"


def run_untrusted(
    program: str,
    *,
    timeout: float = 10.0,
    memory_bytes: int = 512 * 2**20,
    cpu_seconds: int | None = None,
    max_processes: int = 32,
    max_file_bytes: int = 16 * 2**20,
    max_disk_bytes: int = 64 * 2**20,
    completion_marker: str | None = None,
    hidden_paths: Iterable[str | os.PathLike[str]] = (),
) -> SandboxResult:
    """Run ``program`` (Python source) in a contained child process; see the module docstring for what applies.

    ``cpu_seconds`` defaults to ``ceil(timeout) + 1``. ``max_file_bytes`` bounds every file written, including
    stdout and stderr (of which the last 4096 characters are returned). ``max_disk_bytes`` bounds all the program
    writes together (its work dir is a tmpfs of that size; with a mount namespace only).

    ``completion_marker``: exit code 0 alone does not show that a program did its work, since ``os._exit(0)``,
    ``sys.exit(0)`` or ``unittest.main()`` (also from an ``atexit`` handler, after an error) end it early with
    code 0. A caller that ends the program with code printing a fresh random marker passes that marker here; the
    run then passes only if the marker is somewhere in the whole stdout (not just the returned tail, so that later
    output, e.g. from an ``atexit`` handler, cannot push it out). The marker is in the program's own source: this
    catches programs that stop early, not one written to find the marker and print it.

    ``hidden_paths``: host files or directories the program must not see (e.g. reference solutions), covered in
    its mount namespace; they may not hold the interpreter or the temporary directory. Without a mount namespace
    (not root, or namespaces not permitted) nothing can be hidden: they are then ignored, and stay readable.
    """
    if not isinstance(program, str):
        raise TypeError(f"`program` must be Python source text (a str), got {type(program).__name__}.")
    if completion_marker is not None and not (isinstance(completion_marker, str) and completion_marker):
        raise ValueError(f"`completion_marker` must be a non-empty str, got {completion_marker!r}.")
    hidden = tuple(os.path.realpath(path) for path in hidden_paths)
    for path in hidden:
        for needed in (sys.base_prefix, tempfile.gettempdir()):
            if Path(os.path.realpath(needed)).is_relative_to(path):
                raise ValueError(f"Cannot hide {path!r}: the sandbox needs {needed!r} inside it.")
    limits_given = {
        "timeout": timeout, "memory_bytes": memory_bytes, "max_processes": max_processes,
        "max_file_bytes": max_file_bytes, "max_disk_bytes": max_disk_bytes,
        "cpu_seconds": 1 if cpu_seconds is None else cpu_seconds,
    }  # fmt: skip
    bad = {name: value for name, value in limits_given.items() if not value > 0}
    if bad:
        raise ValueError(f"Sandbox limits must be positive, got {bad}; e.g. `timeout=10.0` (seconds).")
    netns, mntns = _namespace_support()
    cpu = cpu_seconds if cpu_seconds is not None else int(-(-timeout // 1)) + 1
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_FSIZE: (max_file_bytes, max_file_bytes),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_NPROC: (max_processes, max_processes),
        resource.RLIMIT_AS: (memory_bytes, memory_bytes),
    }
    # Outer dir (root, 0o711) keeps the captured output out of the program's reach; only ``work`` is its own.
    outer = tempfile.mkdtemp(prefix="sandbox-")
    cgroups: list[str] = []
    try:
        os.chmod(outer, 0o711)
        work = Path(outer, "work")
        work.mkdir()
        Path(outer, "root").mkdir()  # where the run's own root is mounted, in its namespace
        uid = _fresh_uid() if mntns else None
        cgroups += _make_cgroups(os.path.basename(outer), memory_bytes, max_processes)
        if uid is None:  # no mount namespace: the program runs from the host folder
            (work / "main.py").write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        code = ["main.py"] if netns else ["-c", _SOCKET_GUARD]
        out_path, err_path = Path(outer, "stdout"), Path(outer, "stderr")
        isolate = functools.partial(
            _isolate,
            str(work),
            netns=netns,
            mntns=mntns,
            limits=limits,
            hidden_paths=hidden,
            uid=_NOBODY if uid is None else uid,
            program=program.encode("utf-8"),
            disk_bytes=max_disk_bytes,
            cgroups=tuple(cgroups),
        )
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [_interpreter(), "-I", *code],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=isolate,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Also after a normal exit: background children must not outlive the run. Its own uid finds them
                # all, even those that left the process group; without namespaces, the group is what there is.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                if uid is not None:
                    _kill_processes_of(uid)
                proc.wait()
                _remove_cgroups(cgroups)
        returncode = proc.returncode
        # The whole file, at most max_file_bytes: the marker may have scrolled out of the returned tail.
        finished = completion_marker is None or completion_marker.encode() in out_path.read_bytes()
        return SandboxResult(
            passed=returncode == 0 and not timed_out and finished,
            returncode=returncode,
            timed_out=timed_out,
            stdout=_tail(out_path),
            stderr=_tail(err_path),
            reason=_reason(returncode, timed_out, finished),
        )
    finally:
        _remove_cgroups(cgroups)  # again, in case the launch itself failed
        _remove_tree(outer)
