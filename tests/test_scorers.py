"""Scorers (reference, answer, execution) against hand-checked cases; the execution sandbox's limits."""

import pytest

from nld_lora.evaluation.execution import check_test_code, run_execution
from nld_lora.evaluation.sandbox import SandboxLimits, run_program
from nld_lora.evaluation.scorers import (
    ScorerError,
    edit_similarity,
    extract_answer,
    score_answer,
    score_reference,
    scorer_for,
)
from tests.helpers import skip_without_sandbox

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
    skip_without_sandbox()
    limits = SandboxLimits()
    assert run_execution(PROMPT, "    return a + b\n", TEST, "add", limits).passed
    wrong = run_execution(PROMPT, "    return a - b\n", TEST, "add", limits)
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    broken = run_execution(PROMPT, "    return a +\n", TEST, "add", limits)  # the completion does not parse
    assert broken.status == "failed" and "SyntaxError" in broken.detail


def test_execution_times_out_an_infinite_loop():
    skip_without_sandbox()
    assert run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.5)).status == "timeout"
    # sleeping: the wall clock, not the CPU
    assert run_program("import time\ntime.sleep(30)\n", SandboxLimits(timeout_s=1.0)).status == "timeout"
    assert run_program("x = bytearray(2 * 1024**3)", SandboxLimits(memory_mb=512)).status == "failed"


def test_a_test_that_cannot_score_is_named():
    assert check_test_code("def check(f):\n    assert f(1, 2) == 3\n", "add") is None
    assert "does not compile" in check_test_code("def check(f)\n", "add")
    assert "not a Python name" in check_test_code("def check(f): pass", "add; import os")
