"""Accuracy scorers for generated text, chosen by the fields an eval record carries.

- `reference` (a reference continuation): exact match of the first line and of the whole reference, and the
  normalised edit similarity 1 - Levenshtein / max(len), as line-level code-completion benchmarks report it;
- `answer` (a final answer): exact match after extracting the answer from the output (GSM8K / MATH style; the
  extraction rule is a regular expression, its first group is the answer, else the last number in the text);
- `test` + `entry_point` (HumanEval style): pass@1 by running prompt + completion + test in a separate Python
  process (execution.py), never in the evaluating one.
"""

from __future__ import annotations

import re
from typing import Any

DEFAULT_ANSWER_PATTERN = r"####\s*(.+)"  # GSM8K's final-answer marker; without it, the last number counts
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
SCORER_FIELDS = {"reference": ("reference",), "answer": ("answer",), "execution": ("test", "entry_point")}


class ScorerError(ValueError):
    """An eval record no scorer can use."""


def scorer_for(record: dict[str, Any], source: str = "record") -> str:
    """The scorer a record's fields choose: execution (test + entry_point), answer, or reference."""
    for name in ("execution", "answer", "reference"):
        if all(record.get(f) not in (None, "") for f in SCORER_FIELDS[name]):
            return name
    wanted = " or ".join("+".join(fields) for fields in SCORER_FIELDS.values())
    raise ScorerError(f"{source}: has none of the scorer fields ({wanted}); fields present: {sorted(record)}")


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / max(len(a), len(b)); 1.0 for two empty strings."""
    if not a and not b:
        return 1.0
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return 1.0 - previous[-1] / max(len(a), len(b))


def first_line(text: str) -> str:
    """The first non-empty line, stripped (what a line-completion benchmark compares)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def score_reference(output: str, reference: str) -> dict[str, float]:
    """Exact match of the first line and of the whole reference (whitespace at the ends ignored), edit similarity
    over the reference's length of output."""
    return {"first_line_exact": float(first_line(output) == first_line(reference)),
            "exact": float(output.strip()[: len(reference.strip())] == reference.strip()),
            "edit_similarity": edit_similarity(output[: len(reference)], reference)}


def extract_answer(text: str, pattern: str = DEFAULT_ANSWER_PATTERN) -> str | None:
    """The answer in a generated text: the pattern's first group, else the last number; normalised (no commas,
    no trailing '.0', no '$')."""
    found = re.search(pattern, text)
    raw = found.group(1) if found else (_NUMBER.findall(text) or [None])[-1]
    return None if raw is None else normalize_answer(raw)


def normalize_answer(answer: str) -> str:
    text = answer.strip().strip(".").replace(",", "").replace("$", "").strip()
    if re.fullmatch(r"-?\d+\.0+", text):
        text = text.split(".")[0]
    return text


def score_answer(output: str, answer: str, pattern: str = DEFAULT_ANSWER_PATTERN) -> dict[str, float]:
    return {"answer_exact": float(extract_answer(output, pattern) == normalize_answer(str(answer)))}
