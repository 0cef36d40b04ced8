"""Escape attempts against the execution sandbox, each checked from outside: nothing written, deleted or signalled
outside, no process survives, no network, no parent environment, limits hold for all processes together, timeouts
hold, the evaluator's memory stays bounded. Each program prints a verdict line; the test reads it and the world."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

from nld_lora.evaluation.sandbox import SandboxLimits, SandboxUnavailable, isolation, run_program
from tests.helpers import skip_without_sandbox


@pytest.fixture(autouse=True)
def _sandbox():
    skip_without_sandbox()


FAST = SandboxLimits(timeout_s=5)


def attack(body: str, limits: SandboxLimits = FAST):
    """Run `body`; it prints ESCAPED if an attempt worked. Returns (result, wall seconds)."""
    start = time.monotonic()
    result = run_program("import sys\n" + textwrap.dedent(body), limits)
    return result, time.monotonic() - start


def tries(*statements: str) -> str:
    """A program that runs each statement and reports the ones that did not raise."""
    lines = ["import os, sys, io, ctypes, sqlite3, posix, _io, importlib, subprocess", "worked = []"]
    for i, stmt in enumerate(statements):
        lines += ["try:", f"    {stmt}", f"    worked.append({i})", "except BaseException:", "    pass"]
    lines += ["print('worked', worked, file=sys.stderr)", "sys.exit(0 if worked else 7)"]
    return "\n".join(lines)


def test_writes_outside_fail_in_every_form(tmp_path):
    targets = [str(tmp_path / f"w{i}") for i in range(10)]
    prefix_target = Path(sys.prefix) / f"nld_canary_{uuid.uuid4().hex}"
    statements = [
        f"open({targets[0]!r}, 'w').write('x')",
        f"posix.write(posix.open({targets[1]!r}, os.O_CREAT | os.O_WRONLY), b'x')",
        f"io.FileIO({targets[2]!r}, 'w').write(b'x')",
        f"_io.open({targets[3]!r}, 'w').write('x')",
        f"os.open('w4', os.O_CREAT | os.O_WRONLY, dir_fd=os.open({str(tmp_path)!r}, os.O_RDONLY))",
        f"open({targets[5]!r}, 'w', opener=lambda p, f: os.open(p, f | os.O_CREAT)).write('x')",
        f"ctypes.CDLL(None).fopen({targets[6].encode()!r}, b'w') or (_ for _ in ()).throw(OSError())",
        f"sqlite3.connect({targets[7]!r}).execute('create table t(x)')",
        f"os.mkfifo({targets[8]!r})",
        f"importlib.reload(os); os.open({targets[9]!r}, os.O_CREAT | os.O_WRONLY)",
        f"open({str(prefix_target)!r}, 'w').write('x')",
    ]
    result, _ = attack(tries(*statements))
    assert result.status == "failed" and "worked []" in result.detail, result.detail
    assert not list(tmp_path.iterdir()) and not prefix_target.exists()


def test_delete_rename_and_chmod_outside_fail(tmp_path):
    canary = tmp_path / "keep.txt"
    canary.write_text("precious")
    visible = Path(os.__file__)  # the interpreter's own files are visible, read-only
    before = visible.stat()
    result, _ = attack(tries(f"os.remove({str(canary)!r})", f"os.rename({str(canary)!r}, '/tmp/stolen')",
                             f"os.remove({str(visible)!r})", f"os.rename({str(visible)!r}, '/tmp/os.py')",
                             f"os.chmod({str(visible)!r}, 0o777)", f"os.truncate({str(visible)!r}, 0)"))
    assert "worked []" in result.detail, result.detail
    assert canary.read_text() == "precious"
    after = visible.stat()
    assert (after.st_size, after.st_mode, after.st_mtime) == (before.st_size, before.st_mode, before.st_mtime)


def test_files_outside_and_the_parents_environment_are_unreadable(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    canary = f"CANARY_{uuid.uuid4().hex}"
    secret.write_text(canary)
    monkeypatch.setenv("NLD_TEST_TOKEN", canary)
    result, _ = attack(f"""
        import glob, os
        seen = " ".join(f"{{k}}={{v}}" for k, v in os.environ.items())
        for path in [{str(secret)!r}, *glob.glob("/proc/*/environ"), "/proc/1/cmdline"]:
            try:
                seen += open(path, errors="replace").read()
            except OSError:
                pass
        print("env", sorted(os.environ), file=sys.stderr)
        print("ESCAPED" if {canary!r} in seen else "SAFE", file=sys.stderr)
        sys.exit(0 if {canary!r} in seen else 7)
    """)
    assert "SAFE" in result.detail, result.detail
    assert set(eval(result.detail.splitlines()[-2].split(" ", 1)[1])) <= {"PATH", "HOME", "LANG", "LC_CTYPE", "PWD"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_no_outside_process_can_be_signalled():
    victim = subprocess.Popen(["sleep", "60"])
    try:
        result, _ = attack(tries(f"os.kill({victim.pid}, 9)", "os.kill(-1, 9)", f"os.killpg({victim.pid}, 9)",
                                 f"ctypes.CDLL(None).kill({victim.pid}, 9) == 0 or (_ for _ in ()).throw(OSError())"))
        time.sleep(0.2)
        assert victim.poll() is None and _alive(victim.pid), result.detail
    finally:
        victim.kill()
        victim.wait()


def _processes_with(marker: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.parametrize("how", ["posix_spawn", "system", "fork", "popen_detached", "ctypes_system"])
def test_no_process_survives_the_program(how):
    seconds = f"{1000 + (uuid.uuid4().int % 10**6) / 10**7:.7f}"  # a unique sleep argument to look for
    start = {
        "posix_spawn": f"os.posix_spawn('/bin/sleep', ['sleep', '{seconds}'], {{}})",
        "system": f"os.system('sleep {seconds} &')",
        "fork": f"os.fork() or os.execv('/bin/sleep', ['sleep', '{seconds}'])",
        "popen_detached": f"subprocess.Popen(['sleep', '{seconds}'], start_new_session=True)",
        "ctypes_system": f"ctypes.CDLL(None).system(b'setsid sleep {seconds} &')",
    }[how]
    result, _ = attack(f"import os, subprocess, ctypes, time\n{start}\ntime.sleep(0.3)\n")
    time.sleep(0.3)
    assert result.status == "passed", result.detail  # starting processes inside is allowed; they die with it
    assert not _processes_with(seconds)


def test_timeout_holds_with_a_detached_child_keeping_stderr_open():
    result, wall = attack("""
        import subprocess, time
        subprocess.Popen(["sleep", "1000000"], start_new_session=True, stderr=sys.stderr)
        time.sleep(1000000)
    """, SandboxLimits(timeout_s=2))
    assert result.status == "timeout" and wall < 5, (result, wall)
    result, wall = attack("""
        import subprocess
        subprocess.Popen(["sleep", "1000000"], start_new_session=True, stderr=sys.stderr)
    """, SandboxLimits(timeout_s=10))
    assert result.status == "passed" and wall < 5, (result, wall)


def test_no_network_not_even_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    accepted = []

    def serve():
        end = time.monotonic() + 6
        while time.monotonic() < end:
            try:
                accepted.append(server.accept())
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve)
    thread.start()
    port = server.getsockname()[1]
    try:
        result, _ = attack(tries(f"socket.create_connection(('127.0.0.1', {port}), timeout=1)",
                                 "socket.create_connection(('pypi.org', 443), timeout=1)")
                           .replace("import os,", "import socket, os,"))
    finally:
        thread.join()
        server.close()
    assert "worked []" in result.detail and not accepted, result.detail


def test_memory_limit_holds_for_all_processes_together():
    if isolation().cgroup is None:
        pytest.skip("no writable cgroup here: memory is limited per process only")
    result, _ = attack("""
        import os
        children = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                block = bytearray(300 * 2**20)
                block[::4096] = b"x" * len(block[::4096])
                os._exit(0)
            children.append(pid)
        ok = sum(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in children)
        print("children that held 300 MB:", ok, file=sys.stderr)
    """, SandboxLimits(timeout_s=20, memory_mb=512))
    assert "children that held 300 MB: 3" not in result.detail, result.detail


def test_process_count_limit_holds():
    if isolation().cgroup is None:
        pytest.skip("no writable cgroup here: the process count is not limited in total")
    result, _ = attack("""
        import os, time
        made = 0
        for _ in range(64):
            try:
                if os.fork() == 0:
                    time.sleep(3)
                    os._exit(0)
                made += 1
            except OSError:
                break
        print("made", made, file=sys.stderr)
    """, SandboxLimits(timeout_s=10, processes=16))
    made = int(result.detail.split("made")[-1])
    assert made < 16, result.detail


def test_disk_limit_holds_in_total():
    result, _ = attack("""
        written = 0
        for i in range(8):
            try:
                with open(f"/tmp/f{i}", "wb") as f:
                    f.write(b"x" * 15 * 2**20)
                written += 1
            except OSError:
                break
        print("files", written, file=sys.stderr)
    """, SandboxLimits(timeout_s=10, disk_mb=32))
    assert int(result.detail.split("files")[-1]) <= 2, result.detail


def test_escape_syscalls_are_denied():
    result, _ = attack(tries("ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0 or "
                             "(_ for _ in ()).throw(OSError())",
                             "ctypes.CDLL(None).ptrace(16, 1, 0, 0) == 0 or (_ for _ in ()).throw(OSError())",
                             "os.getuid() == 0 or (_ for _ in ()).throw(OSError())"))
    assert "worked []" in result.detail, result.detail


def test_the_evaluators_memory_stays_bounded_under_a_flood_of_output():
    probe = textwrap.dedent("""
        import resource
        from nld_lora.evaluation.sandbox import SandboxLimits, run_program
        def peak_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        run_program("raise SystemExit(1)")
        before = peak_mb()
        result = run_program("import sys\\nfor _ in range(300): sys.stderr.write('y' * 2**20)\\nraise SystemExit(1)",
                             SandboxLimits(timeout_s=30))
        print(result.status, len(result.detail), peak_mb() - before)
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    status, detail_len, growth_mb = out.stdout.split()
    assert status == "failed" and int(detail_len) <= 2000 and int(growth_mb) < 20, out.stdout


def test_without_bubblewrap_execution_is_refused_unless_opted_in(monkeypatch):
    isolation.cache_clear()
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        assert isolation().bwrap is None
        with pytest.raises(SandboxUnavailable, match="unsafe_exec=true"):
            run_program("pass")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run_program("pass", allow_unisolated=True).passed
        assert any("WITHOUT isolation" in str(w.message) for w in caught)
    finally:
        monkeypatch.undo()
        isolation.cache_clear()
    assert isolation().bwrap is not None


def test_a_passing_and_a_failing_program():
    assert run_program("assert 1 + 1 == 2").passed
    failed = run_program("assert 1 + 1 == 3, 'arithmetic'")
    assert failed.status == "failed" and "arithmetic" in failed.detail
