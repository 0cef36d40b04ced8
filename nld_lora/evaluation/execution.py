"""Run a generated program against its tests in a separate, limited Python process (HumanEval-style pass@1).

Each program runs in its own temporary directory with `python -I` (no site packages path tricks, no environment
PYTHON* variables), a wall-clock timeout that kills its whole process group, resource limits (address space, CPU
seconds, file size, open files) and a guard prepended to the program that refuses writes outside that directory,
process creation and destructive os/shutil calls (the reliability guard HumanEval's harness uses, plus a path
check). The guard is a safety net for mistakes in generated code, not a security boundary against a hostile one.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

GUARD = r'''
import builtins as _b, io as _io, os as _os, shutil as _sh, subprocess as _sp
_ROOT = _os.path.realpath(_os.getcwd())
def _inside(path):
    if isinstance(path, int):
        return True
    real = _os.path.realpath(_os.fspath(path))
    return real == _ROOT or real.startswith(_ROOT + _os.sep)
def _refuse(what):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {what} is not allowed")
    return refused
_open = _b.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"sandbox: writing {file!r} outside the sandbox")
    return _open(file, mode, *args, **kwargs)
_b.open = _io.open = _guarded_open
_os_open = _os.open
def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC) and not _inside(path):
        raise PermissionError(f"sandbox: writing {path!r} outside the sandbox")
    return _os_open(path, flags, *args, **kwargs)
_os.open = _guarded_os_open
def _path_guard(name):
    original = getattr(_os, name)
    def guarded(*paths, **kwargs):
        if not all(_inside(p) for p in paths if isinstance(p, (str, bytes, _os.PathLike))):
            raise PermissionError(f"sandbox: os.{name} outside the sandbox")
        return original(*paths, **kwargs)
    return guarded
for _name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "mkdir", "makedirs",
              "chmod", "truncate", "symlink", "link"):
    setattr(_os, _name, _path_guard(_name))
for _name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp", "execl",
              "spawnv", "spawnl", "chown", "chroot", "putenv", "setuid"):
    if hasattr(_os, _name):
        setattr(_os, _name, _refuse("os." + _name))
for _name in ("rmtree", "move", "chown"):
    setattr(_sh, _name, _refuse("shutil." + _name))
_sp.Popen = _refuse("subprocess")
del _name
'''


@dataclass
class ExecResult:
    status: str  # passed | failed | timeout
    detail: str = ""  # the last lines of stderr, or why it stopped

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(memory_mb: int, cpu_s: int) -> None:
    """Runs in the child before exec: its own session (so a timeout kills every process it made) and limits."""
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**24, 2**24))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(program: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> ExecResult:
    """Run `program` (guard prepended) in a fresh temporary directory; passed when it exits 0 in time."""
    with tempfile.TemporaryDirectory(prefix="nld_exec_") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(GUARD + "\n" + program + "\n")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-I", "-B", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=lambda: _limits(memory_mb, int(timeout_s) + 1))
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return ExecResult("timeout", f"no exit within {timeout_s:g} s")
    tail = "\n".join(err.decode("utf-8", "replace").strip().splitlines()[-3:])
    return ExecResult("passed" if proc.returncode == 0 else "failed", tail)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """HumanEval's layout: the prompt, the model's completion, the test code, then check(entry_point)."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def score_execution(prompt: str, completion: str, test: str, entry_point: str, *, timeout_s: float = 10.0,
                    memory_mb: int = 1024) -> dict[str, float]:
    result = run_program(humaneval_program(prompt, completion, test, entry_point), timeout_s=timeout_s,
                         memory_mb=memory_mb)
    return {"pass@1": float(result.passed)}
