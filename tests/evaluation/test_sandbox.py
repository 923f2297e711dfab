"""Tests of the untrusted-code runner: each escape attempt must stay inside the sandbox."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from trl_selfdistill.evaluation.sandbox import _cgroup_parents, _namespace_support, run_untrusted

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox relies on POSIX rlimits")


def _nobody_processes() -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == 65534:
                count += 1
        except FileNotFoundError:  # exited while scanning
            pass
    return count


def test_passing_program_passes():
    result = run_untrusted("assert 1 + 1 == 2\nprint('hello')", timeout=5)
    assert result.passed, result
    assert result.returncode == 0 and not result.timed_out
    assert result.stdout == "hello\n"


def test_failing_assert_fails():
    result = run_untrusted("assert 1 + 1 == 3, 'wrong'", timeout=5)
    assert not result.passed
    assert result.returncode == 1
    assert "AssertionError: wrong" in result.stderr


def test_infinite_loop_is_killed_by_timeout():
    start = time.monotonic()
    result = run_untrusted("while True:\n    pass", timeout=2)
    assert time.monotonic() - start < 5
    assert result.timed_out and not result.passed
    assert result.reason == "wall-clock timeout"


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "hunter2")
    result = run_untrusted("import os\nprint(sorted(os.environ))", timeout=5)
    assert result.passed, result
    assert "SANDBOX_TEST_SECRET" not in result.stdout


@pytest.mark.skipif(not _namespace_support()[1], reason="fork limit needs the drop to nobody")
def test_fork_bomb_is_contained():
    before = _nobody_processes()
    # Bounded even without limits (at most 2**10 processes); every process then sleeps until the timeout.
    bomb = "import os, time\nfor _ in range(10):\n    try:\n        os.fork()\n    except OSError:\n        break\n"
    bomb += "time.sleep(60)\n"
    result = run_untrusted(bomb, timeout=3, max_processes=16)
    assert result.timed_out and not result.passed
    deadline = time.monotonic() + 5
    while _nobody_processes() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _nobody_processes() == before
    assert run_untrusted("print(1)", timeout=5).passed


def test_huge_allocation_raises_memory_error_inside():
    result = run_untrusted('b"x" * 10**10', timeout=5, memory_bytes=256 * 2**20)
    assert not result.passed
    assert "MemoryError" in result.stderr


def test_home_write_stays_inside():
    name = f"pwned-{uuid.uuid4().hex}"
    result = run_untrusted(
        f"import os\nopen(os.path.expanduser('~/{name}'), 'w').write('x')\nprint(os.path.expanduser('~'))", timeout=5
    )
    assert result.passed, result
    assert not (Path.home() / name).exists()
    assert result.stdout.strip() != str(Path.home())


@pytest.mark.skipif(not _namespace_support()[1], reason="needs the mount namespace")
def test_absolute_writes_outside_fail():
    target = Path.home() / f"pwned-{uuid.uuid4().hex}"
    other = Path("/tmp") / f"pwned-{uuid.uuid4().hex}"
    for path in (target, other):
        result = run_untrusted(f"open({str(path)!r}, 'w').write('x')", timeout=5)
        assert not result.passed
        assert "Error" in result.stderr
        assert not path.exists()


def test_exit_zero_without_the_completion_marker_fails():
    marker = "done-5f1c"
    assert run_untrusted(f"print({marker!r})", timeout=5, completion_marker=marker).passed
    partial = "import os\nprint('done-', flush=True)\nos._exit(0)"  # a prefix of the marker does not count
    for program in ("import os\nos._exit(0)", "import sys\nsys.exit(0)", partial):
        result = run_untrusted(f"{program}\nprint({marker!r})", timeout=5, completion_marker=marker)
        assert not result.passed and result.returncode == 0, program
        assert "before finishing" in result.reason


def test_completion_marker_is_found_beyond_the_captured_tail():
    marker = "done-5f1c"
    program = f"print({marker!r})\nprint('x' * 100_000)"  # the marker scrolls out of the 4096-character tail
    result = run_untrusted(program, timeout=5, completion_marker=marker)
    assert result.passed, result
    assert marker not in result.stdout


@pytest.mark.skipif(not _namespace_support()[1], reason="hiding paths needs the mount namespace (root)")
def test_hidden_paths_are_invisible():
    # Inside what the run's root shows (the system's /usr), where hiding is what keeps a file out of reach.
    shared = Path("/usr/local/share")
    if not os.access(shared, os.W_OK):
        pytest.skip(f"needs a writable {shared}")
    outside = Path(tempfile.mkdtemp(prefix="sandbox-secret-", dir=shared))
    try:
        outside.chmod(0o755)
        kept, lone = outside / "answers.txt", outside / "lone.txt"
        for path, text in ((kept, "42"), (lone, "43")):
            path.write_text(text)
            path.chmod(0o644)
        program = textwrap.dedent(f"""\
            import os
            print(sorted(os.listdir({str(outside)!r})))
            for path in ({str(kept)!r}, {str(lone)!r}):
                try:
                    print(repr(open(path).read()))
                except OSError as error:
                    print(type(error).__name__)
            """)
        seen = run_untrusted(program, timeout=5)  # the control: without hiding, the run reads both files
        assert seen.stdout.splitlines() == ["['answers.txt', 'lone.txt']", "'42'", "'43'"], seen
        hidden = run_untrusted(program, timeout=5, hidden_paths=[outside])
        assert hidden.stdout.splitlines() == ["[]", "FileNotFoundError", "FileNotFoundError"], hidden
        one_file = run_untrusted(program, timeout=5, hidden_paths=[str(lone)])  # a file reads as /dev/null
        assert one_file.stdout.splitlines()[1:] == ["'42'", "''"], one_file
        assert kept.read_text() == "42" and lone.read_text() == "43"  # the host side is untouched
    finally:
        shutil.rmtree(outside)


def test_network_is_unreachable():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        for address in (("1.1.1.1", 53), ("127.0.0.1", port)):
            program = f"import socket\nsocket.create_connection({address!r}, timeout=2)\nprint('connected')"
            result = run_untrusted(program, timeout=5)
            assert not result.passed, address
            assert "connected" not in result.stdout
            assert "Error" in result.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.skipif(not _namespace_support()[0], reason="needs the network namespace")
def test_raw_socket_module_cannot_reach_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        program = f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))"
        result = run_untrusted(program, timeout=5)
        assert not result.passed
        assert "unreachable" in result.stderr.lower()


@pytest.mark.parametrize(
    ("program", "limits", "error"),
    [
        (b"print(1)", {}, "must be Python source text"),
        ("print(1)", {"timeout": -1}, "must be positive"),
        ("print(1)", {"completion_marker": ""}, "must be a non-empty str"),
        ("print(1)", {"hidden_paths": [sys.base_prefix]}, "Cannot hide"),
        ("print(1)", {"hidden_paths": ["/"]}, "Cannot hide"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(program, limits, error):
    with pytest.raises((TypeError, ValueError), match=error):
        run_untrusted(program, **limits)


# ---------------------------------------------------------------- one run cannot reach another, or the host
_NAMESPACES = pytest.mark.skipif(not _namespace_support()[1], reason="needs the mount namespace (root)")


@_NAMESPACES
def test_a_process_that_left_the_group_is_killed_when_the_run_returns():
    program = textwrap.dedent("""\
        import os, time
        if os.fork() == 0:
            os.setsid()  # out of the process group that the final killpg reaches
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            os._exit(0)
        time.sleep(0.5)
        print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
        """)
    result = run_untrusted(program, timeout=10)
    assert result.passed, result
    pids = eval(result.stdout)  # the program sees only its own: itself, the sleeper, the exited middle child
    assert 2 <= len(pids) <= 3
    for pid in pids:  # gone, or a zombie: dead, waiting for an init that may never reap it
        try:
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        assert state == b"Z", (pid, state)


@_NAMESPACES
def test_each_run_has_its_own_identity():
    program = "import os; print(os.getuid(), os.getgid())"
    first, second = (run_untrusted(program, timeout=5).stdout.split() for _ in range(2))
    assert first != second and first[0] == first[1]
    assert int(first[0]) not in (0, 65534)


@_NAMESPACES
def test_other_processes_command_lines_are_invisible():
    secret = f"--hub_token=hf_{uuid.uuid4().hex}"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", secret])
    try:
        program = textwrap.dedent(f"""\
            import os
            found = []
            for pid in os.listdir('/proc'):
                try:
                    if {secret!r}.encode() in open(f'/proc/{{pid}}/cmdline', 'rb').read():
                        found.append(pid)
                except OSError:
                    pass
            print(found, {holder.pid} in [int(p) for p in os.listdir('/proc') if p.isdigit()])
            """)
        result = run_untrusted(program, timeout=5)
        assert result.stdout.strip() == "[] False", result
    finally:
        holder.kill()
        holder.wait()


@_NAMESPACES
def test_sysv_shared_memory_does_not_outlive_the_run():
    key = 0x5EED0000 + os.getpid() % 0xFFFF
    program = textwrap.dedent(f"""\
        import ctypes, ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        flags = {{"create": 0o1000 | 0o666, "open": 0}}  # IPC_CREAT | rw, or only look it up
        print(libc.shmget({key}, 1 << 20, flags["MODE"]))
        """)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    try:
        created = run_untrusted(program.replace('"MODE"', '"create"'), timeout=5)
        assert int(created.stdout) >= 0, created  # the segment was made inside the run
        opened = run_untrusted(program.replace('"MODE"', '"open"'), timeout=5)
        assert int(opened.stdout) == -1, opened  # the next run does not find it
        assert libc.shmget(key, 0, 0) == -1  # nor does the host
    finally:
        segment = libc.shmget(key, 0, 0)
        if segment >= 0:
            libc.shmctl(segment, 0, None)  # IPC_RMID: do not leave a leaked segment behind


@_NAMESPACES
def test_relative_paths_are_written_in_the_work_dir():
    result = run_untrusted("open('rel.txt', 'w').write('x'); print(open('rel.txt').read())", timeout=5)
    assert result.passed and result.stdout.strip() == "x", result


@_NAMESPACES
def test_the_work_dir_bounds_what_all_files_take_together():
    program = textwrap.dedent("""\
        written = 0
        try:
            for i in range(40):
                with open(f'f{i}', 'wb') as f:
                    f.write(b'x' * 15 * 2**20)
                written += 15
        except OSError as error:
            print(written, error.errno)
        """)
    result = run_untrusted(program, timeout=20, max_disk_bytes=64 * 2**20)
    written, errno_ = (int(x) for x in result.stdout.split())
    assert written <= 60 and errno_ == 28, result  # ENOSPC at the tmpfs's 64 MiB, not 600 MB on the host disk


@_NAMESPACES
def test_a_deep_directory_tree_neither_breaks_the_run_nor_is_left_behind():
    before = set(Path(tempfile.gettempdir()).glob("sandbox-*"))
    program = "import os\nfor _ in range(1100):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep')"
    result = run_untrusted(program, timeout=20)
    assert result.passed and result.stdout.strip() == "deep", result
    assert set(Path(tempfile.gettempdir()).glob("sandbox-*")) == before


@_NAMESPACES
def test_the_root_holds_only_what_python_needs():
    checkout = str(Path(__file__).resolve().parents[2])
    program = textwrap.dedent(f"""\
        import os
        print(os.path.exists({checkout!r}), os.path.exists('/etc/passwd'), os.path.exists('/root'),
              os.listdir('/tmp') == [os.path.basename(os.path.dirname(os.getcwd()))])
        """)
    result = run_untrusted(program, timeout=5)
    assert result.stdout.split() == ["False", "False", "True", "True"], result  # /root: the interpreter's prefix


@_NAMESPACES
def test_host_unix_sockets_open_to_everyone_cannot_be_reached():
    path = Path(tempfile.gettempdir(), f"sandbox-test-{uuid.uuid4().hex}.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        path.chmod(0o777)
        server.listen(1)
        program = textwrap.dedent(f"""\
            import socket
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.connect({str(path)!r})
                client.sendall(b'hello')
                print('connected')
            except OSError as error:
                print(type(error).__name__)
            """)
        result = run_untrusted(program, timeout=5)
        assert result.stdout.strip() == "FileNotFoundError", result
    finally:
        server.close()
        path.unlink(missing_ok=True)


_CGROUPS = pytest.mark.skipif(
    not {"memory", "cpu"} <= set(_cgroup_parents()), reason="needs writable cgroup v1 memory and cpu hierarchies"
)


@_CGROUPS
def test_memory_binds_the_run_as_a_whole():
    # each of 6 children may hold 200 MiB under the per-process limit of 512 MiB; together they may not
    program = textwrap.dedent("""\
        import os, time
        children = []
        for _ in range(6):
            pid = os.fork()
            if pid == 0:
                held = b'x' * (200 * 2**20)
                time.sleep(1.5)
                os._exit(0)
            children.append(pid)
        print(sum(os.waitpid(pid, 0)[1] == 0 for pid in children))
        """)
    result = run_untrusted(program, timeout=20, memory_bytes=512 * 2**20)
    held = result.stdout.split()
    assert held == [] or int(held[0]) <= 2, result  # (an empty output: the parent was the one killed)


@_CGROUPS
def test_cpu_time_binds_the_run_as_a_whole():
    # 2 busy children for 2 s: 4 CPU seconds on 2 cores without a group, at most about 2 with one CPU for the run
    program = textwrap.dedent("""\
        import os, resource, time
        children = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                end = time.monotonic() + 2
                while time.monotonic() < end:
                    pass
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(usage.ru_utime + usage.ru_stime)
        """)
    result = run_untrusted(program, timeout=20)
    assert float(result.stdout) < 2.6, result


def test_no_group_or_folder_is_left_behind(monkeypatch):
    made = []  # this run's folder (its groups take its name); other runs may be going on beside it

    def recording_mkdtemp(*args, **kwargs):
        made.append(real_mkdtemp(*args, **kwargs))
        return made[-1]

    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    assert run_untrusted("print(1)", timeout=5).passed
    assert len(made) == 1 and not os.path.exists(made[0])
    for parent in _cgroup_parents().values():
        assert not os.path.exists(os.path.join(parent, os.path.basename(made[0])))


@_NAMESPACES
def test_a_run_cannot_see_signal_trace_or_read_a_concurrent_run():
    from trl_selfdistill.evaluation.sandbox import _RUN_UIDS

    other = subprocess.Popen(  # run B, in its own process (preexec_fn wants a single-threaded parent)
        [sys.executable, "-c", "from trl_selfdistill.evaluation.sandbox import run_untrusted; "
         "run_untrusted('import time; time.sleep(6)', timeout=10)"],
    )  # fmt: skip
    try:
        deadline, pid = time.monotonic() + 30, None
        while pid is None and time.monotonic() < deadline:
            for entry in Path("/proc").iterdir():
                try:
                    if entry.name.isdigit() and entry.stat().st_uid in _RUN_UIDS:
                        pid = int(entry.name)
                except FileNotFoundError:
                    pass
            time.sleep(0.05)
        assert pid is not None, "run B did not start"
        program = textwrap.dedent(f"""\
            import ctypes, ctypes.util, os
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            outcomes = []
            for attempt in (lambda: os.kill({pid}, 0), lambda: open('/proc/{pid}/root/main.py').read()):
                try:
                    attempt()
                    outcomes.append('reached')
                except OSError as error:
                    outcomes.append(type(error).__name__)
            outcomes.append('traced' if libc.ptrace(16, {pid}, None, None) == 0 else 'refused')  # PTRACE_ATTACH
            print(*outcomes)
            """)
        result = run_untrusted(program, timeout=5)
        assert result.stdout.split() in (
            ["ProcessLookupError", "FileNotFoundError", "refused"],
            ["PermissionError", "FileNotFoundError", "refused"],
        ), result
    finally:
        try:
            other.wait(timeout=20)  # B ends by itself and cleans up after its run
        except subprocess.TimeoutExpired:
            other.kill()
            other.wait()
