"""Scorers (reference, answer, execution) against hand-checked cases; the execution sandbox's limits."""

import uuid

import pytest

from nld_lora.evaluation.execution import run_program, score_execution
from nld_lora.evaluation.scorers import (
    ScorerError,
    edit_similarity,
    extract_answer,
    score_answer,
    score_reference,
    scorer_for,
)

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"


def test_edit_similarity_is_one_minus_levenshtein_over_the_longer():
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)  # the textbook distance 3
    assert edit_similarity("", "") == 1.0 and edit_similarity("abc", "") == 0.0
    assert edit_similarity("flaw", "lawn") == pytest.approx(1 - 2 / 4)


def test_reference_and_answer_scores():
    ref = "    return a + b\n"
    assert score_reference("    return a + b\n\nprint(1)", ref) == {"first_line_exact": 1.0, "exact": 1.0,
                                                                     "edit_similarity": 1.0}
    wrong = score_reference("    return a - b\n", ref)
    assert wrong["first_line_exact"] == 0.0 and wrong["exact"] == 0.0 and 0.9 < wrong["edit_similarity"] < 1.0
    assert extract_answer("so 3 + 4 = 7 apples\n#### 1,234") == "1234"
    assert extract_answer("she has 18.0 eggs left.") == "18" and extract_answer("no number") is None
    assert score_answer("The answer is $42.", "42") == {"answer_exact": 1.0}
    assert score_answer("x = 41", "42")["answer_exact"] == 0.0
    assert extract_answer("Answer: (B)", r"Answer:\s*\((\w)\)") == "B"


def test_scorer_is_chosen_by_fields_and_bad_records_are_named():
    assert scorer_for({"prompt": "p", "reference": "r"}) == "reference"
    assert scorer_for({"prompt": "p", "answer": "4"}) == "answer"
    assert scorer_for({"prompt": "p", "test": "t", "entry_point": "f", "reference": "r"}) == "execution"
    with pytest.raises(ScorerError, match=r"eval.jsonl line 3: has none of the scorer fields .*fields present: "
                                          r"\['id', 'prompt'\]"):
        scorer_for({"id": "x", "prompt": "p"}, "eval.jsonl line 3")


def test_execution_passes_correct_code_and_fails_wrong_code():
    assert score_execution(PROMPT, "    return a + b\n", TEST, "add") == {"pass@1": 1.0}
    assert score_execution(PROMPT, "    return a - b\n", TEST, "add") == {"pass@1": 0.0}
    assert score_execution(PROMPT, "    return a +\n", TEST, "add") == {"pass@1": 0.0}  # a syntax error
    result = run_program(PROMPT + "    return a - b\n" + TEST + "check(add)\n")
    assert result.status == "failed" and "AssertionError" in result.detail


def test_execution_times_out_an_infinite_loop():
    result = run_program("while True:\n    pass\n", timeout_s=1.5)
    assert result.status == "timeout"
    result = run_program("import time\ntime.sleep(30)\n", timeout_s=1.0)  # sleeping: the wall clock, not the CPU
    assert result.status == "timeout"


def test_execution_cannot_write_outside_its_directory(tmp_path):
    outside = tmp_path / f"escape-{uuid.uuid4().hex}"
    attempts = [f"open({str(outside)!r}, 'w').write('x')",
                f"import pathlib; pathlib.Path({str(outside)!r}).write_text('x')",
                f"import os; os.close(os.open({str(outside)!r}, os.O_CREAT | os.O_WRONLY))",
                f"import os; os.system('touch {outside}')",
                f"import subprocess; subprocess.run(['touch', {str(outside)!r}])",
                f"import shutil; shutil.rmtree({str(tmp_path)!r})"]
    for code in attempts:
        result = run_program(code)
        assert result.status == "failed" and "sandbox" in result.detail, code
        assert not outside.exists() and tmp_path.exists(), code
    inside = run_program("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n")
    assert inside.passed  # its own temporary directory is writable
    assert run_program("x = bytearray(2 * 1024**3)", memory_mb=512).status == "failed"  # the memory limit
