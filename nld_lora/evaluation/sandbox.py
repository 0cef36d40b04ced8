"""Run untrusted generated code in an OS-level sandbox.

bubblewrap gives the program its own user (nobody), mount, PID, network, IPC and UTS namespaces, a read-only view of
the interpreter's folders and a private size-capped /tmp, an empty environment and a seccomp filter (libseccomp,
where present). A cgroup (v1 or v2, where writable) caps memory and process count for all its processes together.
Killing bubblewrap kills the whole PID namespace, so the wall-clock timeout holds whatever the code does; output is
read with a cap. Without bubblewrap, execution is refused unless the caller opts in to running unisolated.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

# Syscalls the program never needs and a kernel exploit or namespace escape would (EPERM instead).
DENIED_SYSCALLS = ("ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
                   "unshare", "setns", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
                   "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "swapon",
                   "swapoff", "reboot", "acct", "io_uring_setup", "open_by_handle_at", "name_to_handle_at")
SANDBOX_UID = 65534  # nobody
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}


class SandboxUnavailable(OSError):
    """No OS-level isolation on this machine, and the caller did not opt in to running without it."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, from start to kill
    memory_mb: int = 1024  # all processes together (per process where no cgroup is writable)
    processes: int = 32  # tasks at once, all processes together (per-user rlimit where no cgroup is writable)
    disk_mb: int = 64  # the private /tmp in total (a tmpfs of this size)
    output_kb: int = 64  # stderr kept for the failure reason; the rest is read and dropped

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "processes", "disk_mb", "output_kb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class ExecResult:
    status: str  # passed | failed | timeout
    detail: str = ""  # the last lines of stderr, or why it stopped

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    """What this machine can isolate with; `describe()` is the line eval.json records."""

    bwrap: str | None
    cgroup: str | None  # "v1" | "v2" | None
    seccomp: bool

    def describe(self) -> str:
        if self.bwrap is None:
            return "none: the program runs as this user, with only per-process rlimits"
        limits = f"cgroup {self.cgroup} (memory and processes in total)" if self.cgroup else "per-process rlimits"
        return (f"bubblewrap namespaces (user, mount, pid, net, ipc, uts), {limits}, "
                f"seccomp {'on' if self.seccomp else 'off (libseccomp not found)'}")


def _bwrap_path() -> str | None:
    path = shutil.which("bwrap")
    if path is None:
        return None
    probe = subprocess.run([path, "--unshare-all", "--ro-bind", "/", "/", "true"], capture_output=True)
    return path if probe.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Probe once per process: bubblewrap usable, a writable cgroup hierarchy, libseccomp present."""
    return Isolation(bwrap=_bwrap_path(), cgroup=_Cgroup.version(), seccomp=_seccomp_library() is not None)


class _Cgroup:
    """A fresh cgroup with memory and pids limits that the child joins before it execs bubblewrap."""

    ROOT = Path("/sys/fs/cgroup")

    @staticmethod
    def version() -> str | None:
        try:
            return _Cgroup._probe()
        except OSError:  # an unreadable hierarchy: no cgroup limits, rlimits only
            return None

    @staticmethod
    def _probe() -> str | None:
        v1 = [_Cgroup.ROOT / c for c in ("memory", "pids")]
        if all(os.access(p / "cgroup.procs", os.W_OK) for p in v1):
            return "v1"
        if (_Cgroup.ROOT / "cgroup.controllers").exists() and os.access(_Cgroup._v2_parent(), os.W_OK):
            wanted = {"memory", "pids"}
            enabled = set((_Cgroup._v2_parent() / "cgroup.subtree_control").read_text().split())
            return "v2" if wanted <= enabled else None
        return None

    @staticmethod
    def _v2_parent() -> Path:
        own = Path("/proc/self/cgroup").read_text().strip().split("\n")[0].split("::", 1)[-1]
        return _Cgroup.ROOT / own.lstrip("/")

    def __init__(self, version: str, limits: SandboxLimits) -> None:
        name = f"nld_exec_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        memory = str(limits.memory_mb * 2**20)
        if version == "v1":
            self.dirs = [self.ROOT / "memory" / name, self.ROOT / "pids" / name]
            settings = {self.dirs[0]: {"memory.limit_in_bytes": memory, "memory.memsw.limit_in_bytes": memory},
                        self.dirs[1]: {"pids.max": str(limits.processes)}}
        else:
            self.dirs = [self._v2_parent() / name]
            settings = {self.dirs[0]: {"memory.max": memory, "memory.swap.max": "0",
                                       "pids.max": str(limits.processes)}}
        for folder, values in settings.items():
            folder.mkdir()
            for key, value in values.items():
                if (folder / key).exists():
                    (folder / key).write_text(value)
        self.procs = [str(d / "cgroup.procs") for d in self.dirs]

    def join(self) -> None:
        """In the child, before exec (only os calls: no Python-level locks after fork)."""
        for procs in self.procs:
            fd = os.open(procs, os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)

    def remove(self) -> None:
        for folder in self.dirs:
            for _ in range(50):
                pids = [int(p) for p in (folder / "cgroup.procs").read_text().split()]
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    folder.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)


def _new_cgroup(iso: Isolation, limits: SandboxLimits) -> _Cgroup | None:
    """A cgroup for one run where the hierarchy allows; None (rlimits only) where creating it fails."""
    if not (iso.cgroup and iso.bwrap):
        return None
    try:
        return _Cgroup(iso.cgroup, limits)
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _seccomp_library() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("seccomp")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _seccomp_filter(path: Path) -> bool:
    """Write a BPF program denying DENIED_SYSCALLS (EPERM) to path; False without libseccomp."""
    lib = _seccomp_library()
    if lib is None:
        return False
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SCMP_ACT_ALLOW, SCMP_ACT_ERRNO(EPERM)
    ctx = lib.seccomp_init(allow)
    try:
        for syscall in DENIED_SYSCALLS:
            number = lib.seccomp_syscall_resolve_name(syscall.encode())
            if number >= 0:
                lib.seccomp_rule_add(ctx, deny, number, 0)
        with open(path, "wb") as f:
            if lib.seccomp_export_bpf(ctx, f.fileno()) != 0:
                raise OSError("seccomp_export_bpf failed")
    finally:
        lib.seccomp_release(ctx)
    return True


def _bwrap_command(bwrap: str, program: Path, limits: SandboxLimits, seccomp_fd: int | None) -> list[str]:
    prefixes = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    command = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
               "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox"]
    for folder in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        command += ["--ro-bind-try", folder, folder]
    for prefix in prefixes:
        command += ["--ro-bind", prefix, prefix]
    command += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.disk_mb * 2**20), "--tmpfs", "/tmp",
                "--ro-bind", str(program), "/sandbox/program.py", "--remount-ro", "/", "--chdir", "/tmp"]
    for key, value in SANDBOX_ENV.items():
        command += ["--setenv", key, value]
    if seccomp_fd is not None:
        command += ["--seccomp", str(seccomp_fd)]
    return command + ["--", os.path.realpath(sys.executable), "-I", "-B", "/sandbox/program.py"]


def _rlimits(limits: SandboxLimits, cgroup: _Cgroup | None) -> None:
    """In the child before exec: a session of its own, the cgroup, and per-process limits as a second line."""
    os.setsid()
    if cgroup is not None:
        cgroup.join()
    memory = limits.memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = int(limits.timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.disk_mb * 2**20, limits.disk_mb * 2**20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class _CappedReader(threading.Thread):
    """Drain a pipe to its end, keeping the last `cap` bytes (the evaluator's memory stays bounded)."""

    def __init__(self, stream, cap: int) -> None:
        super().__init__(daemon=True)
        self.stream, self.cap, self.kept, self.dropped = stream, cap, b"", 0

    def run(self) -> None:
        while chunk := self.stream.read1(65536):
            self.kept = (self.kept + chunk)[-self.cap:]
            self.dropped += len(chunk)

    def text(self) -> str:
        return "\n".join(self.kept.decode("utf-8", "replace").strip().splitlines()[-3:])[-2000:]


def run_program(program: str, limits: SandboxLimits | None = None, *, allow_unisolated: bool = False) -> ExecResult:
    """Run `program` with python in the sandbox; passed when it exits 0 within the timeout.
    allow_unisolated: where bubblewrap is missing, run it as this user with rlimits only (a warning says so)."""
    limits = limits or SandboxLimits()
    iso = isolation()
    if iso.bwrap is None and not allow_unisolated:
        raise SandboxUnavailable("no OS-level sandbox: install bubblewrap (`apt-get install bubblewrap`; the "
                                 "project's scripts/test.sh does it where it can), or opt in to running generated "
                                 "code unisolated (eval setting unsafe_exec=true)")
    with tempfile.TemporaryDirectory(prefix="nld_exec_") as tmp:
        program_path = Path(tmp) / "program.py"
        program_path.write_text(program + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        os.chmod(program_path, 0o644)
        cgroup = _new_cgroup(iso, limits)
        seccomp_fd = None
        try:
            if iso.bwrap is not None:
                if _seccomp_filter(Path(tmp) / "filter.bpf"):
                    seccomp_fd = os.open(Path(tmp) / "filter.bpf", os.O_RDONLY)
                command = _bwrap_command(iso.bwrap, program_path, limits, seccomp_fd)
                env, cwd = {}, tmp
            else:
                warnings.warn("running generated code WITHOUT isolation (unsafe_exec=true): it can read, write and "
                              "start anything this user can", RuntimeWarning, stacklevel=2)
                command = [sys.executable, "-I", "-B", str(program_path)]
                env, cwd = {**SANDBOX_ENV, "HOME": tmp, "TMPDIR": tmp}, tmp
            return _run(command, env, cwd, limits, cgroup, () if seccomp_fd is None else (seccomp_fd,))
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)
            if cgroup is not None:
                cgroup.remove()


def _run(command: list[str], env: dict[str, str], cwd: str, limits: SandboxLimits, cgroup: _Cgroup | None,
         pass_fds: tuple[int, ...]) -> ExecResult:
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, pass_fds=pass_fds, preexec_fn=lambda: _rlimits(limits, cgroup))
    reader = _CappedReader(proc.stderr, limits.output_kb * 1024)
    reader.start()
    try:
        proc.wait(timeout=limits.timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bubblewrap's death ends its PID namespace; unisolated, the group
    except ProcessLookupError:
        pass
    proc.wait()
    reader.join(timeout=2.0)
    proc.stderr.close()
    if timed_out:
        return ExecResult("timeout", f"no exit within {limits.timeout_s:g} s")
    return ExecResult("passed" if proc.returncode == 0 else "failed", reader.text())
