"""HumanEval-style pass@1: prompt + completion + test + check(entry_point) run in the sandbox (sandbox.py), never
in the evaluating process."""

from __future__ import annotations

from nld_lora.evaluation.sandbox import ExecResult, SandboxLimits, run_program


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """HumanEval's layout: the prompt, the model's completion, the test code, then check(entry_point)."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def check_test_code(test: str, entry_point: str) -> str | None:
    """Why a record's test code cannot score anything (it does not compile, or the entry point is not a name), or
    None when it can."""
    if not entry_point.isidentifier():
        return f"entry_point {entry_point!r} is not a Python name"
    try:
        compile(test, "<test>", "exec")
    except SyntaxError as err:
        return f"test does not compile: {err.msg} (line {err.lineno})"
    return None


def run_execution(prompt: str, completion: str, test: str, entry_point: str, limits: SandboxLimits,
                  allow_unisolated: bool = False) -> ExecResult:
    """The record's program in the sandbox: passed, failed (with the last lines of stderr) or timeout."""
    return run_program(humaneval_program(prompt, completion, test, entry_point), limits,
                       allow_unisolated=allow_unisolated)
