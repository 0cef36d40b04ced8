"""Prompt readers: JSONL, JSON, CSV, Parquet, plain text (lines or a folder of files), datasets on disk / hub.

Every reader yields PromptRecord rows; bad rows raise PromptFileError naming the file, line and field, or are
skipped and counted with skip_bad=True.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = {".txt", ".md", ".py"}


class PromptFileError(ValueError):
    """A prompt source that cannot be read; the message names the file, line and field."""


@dataclass
class PromptRecord:
    id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    category: str = ""
    group: str = ""  # what held-out evaluation keeps together (e.g. the source file); "" = the prompt alone


@dataclass
class FieldMap:
    prompt: str = "prompt"
    messages: str = "messages"
    id: str = "id"
    category: str = "category"
    group: str = "group"


@dataclass
class ReadReport:
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)


def _record(row: dict[str, Any], fields: FieldMap, where: str) -> PromptRecord:
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected an object with a {fields.prompt!r} or {fields.messages!r} field, "
                              f"got {type(row).__name__}")
    messages = row.get(fields.messages)
    prompt = row.get(fields.prompt)
    if messages is None and prompt is None:
        raise PromptFileError(f"{where}: missing field {fields.prompt!r} (or {fields.messages!r}); "
                              f"fields present: {sorted(row)[:10]}")
    if messages is not None and (not isinstance(messages, list) or
                                 not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
        raise PromptFileError(f"{where}: field {fields.messages!r} must be a list of {{role, content}} objects")
    if prompt is not None and not isinstance(prompt, str):
        if isinstance(prompt, list):  # conversational prompt stored under the prompt field (TRL style)
            return _record({**row, fields.messages: prompt, fields.prompt: None}, fields, where)
        raise PromptFileError(f"{where}: field {fields.prompt!r} must be a string, got {type(prompt).__name__}")
    rid = row.get(fields.id)
    text_for_id = prompt if prompt is not None else json.dumps(messages, sort_keys=True)
    rid = str(rid) if rid is not None else hashlib.sha256(text_for_id.encode()).hexdigest()[:16]
    return PromptRecord(rid, prompt, messages, str(row.get(fields.category) or ""), str(row.get(fields.group) or ""))


def _jsonl(path: Path, fields: FieldMap, skip_bad: bool, report: ReadReport) -> Iterator[PromptRecord]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PromptFileError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
                yield _record(row, fields, where)
            except PromptFileError:
                if not skip_bad:
                    raise
                report.skipped["bad_row"] += 1


def _rows(rows: list[Any], path: Path, fields: FieldMap, skip_bad: bool, report: ReadReport,
          unit: str) -> Iterator[PromptRecord]:
    for i, row in enumerate(rows):
        try:
            yield _record(row, fields, f"{path}:{unit} {i + (2 if unit == 'line' else 0)}")
        except PromptFileError:
            if not skip_bad:
                raise
            report.skipped["bad_row"] += 1


def _json(path: Path, fields: FieldMap, skip_bad: bool, report: ReadReport) -> Iterator[PromptRecord]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from err
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise PromptFileError(f"{path}: expected a JSON list of objects (or an object holding one)")
    yield from _rows(data, path, fields, skip_bad, report, "item")


def _csv(path: Path, fields: FieldMap, skip_bad: bool, report: ReadReport) -> Iterator[PromptRecord]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or fields.prompt not in reader.fieldnames:
            raise PromptFileError(f"{path}:1: header has no column {fields.prompt!r} (columns: {reader.fieldnames})")
        yield from _rows(list(reader), path, fields, skip_bad, report, "line")


def _parquet(path: Path, fields: FieldMap, skip_bad: bool, report: ReadReport) -> Iterator[PromptRecord]:
    import pyarrow.parquet as pq

    yield from _rows(pq.read_table(path).to_pylist(), path, fields, skip_bad, report, "row")


def _text_lines(path: Path) -> Iterator[PromptRecord]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.rstrip("\n")
            if text.strip():
                yield PromptRecord(f"{path.name}:{lineno}", text.replace("\\n", "\n"))


def _dataset(ds: Any, where: str, fields: FieldMap, skip_bad: bool, report: ReadReport) -> Iterator[PromptRecord]:
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict: take "train" or the first split
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    yield from _rows(list(ds), Path(where), fields, skip_bad, report, "row")


def iter_prompts(source: str | Path, fields: FieldMap | None = None, *, skip_bad: bool = False,
                 report: ReadReport | None = None) -> Iterator[PromptRecord]:
    """Yield prompts from a file, a folder, a `datasets` folder, or a hub dataset name."""
    fields = fields or FieldMap()
    report = report if report is not None else ReadReport()
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (
                path / "state.json").exists():
            from datasets import load_from_disk

            yield from _dataset(load_from_disk(str(path)), str(path), fields, skip_bad, report)
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        for f in files:
            text = read_text(f)
            if text.strip():
                yield PromptRecord(f.relative_to(path).as_posix(), text)
        return
    if not path.exists():
        if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/")):
            try:
                from datasets import load_dataset

                ds = load_dataset(source)
            except Exception as err:
                raise PromptFileError(f"{source}: no such file, and loading it as a hub dataset failed: {err}") from err
            yield from _dataset(ds, source, fields, skip_bad, report)
            return
        raise PromptFileError(f"{source}: no such file or folder")
    readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}
    suffix = path.suffix.lower()
    if suffix in readers:
        yield from readers[suffix](path, fields, skip_bad, report)
    elif suffix in TEXT_SUFFIXES or suffix == "":
        yield from _text_lines(path)
    else:
        raise PromptFileError(f"{path}: unknown prompt format {suffix!r} (jsonl, json, csv, parquet, txt, folder)")


def read_text(path: str | Path) -> str:
    """A whole UTF-8 file; an error names the file (not UTF-8, a folder, unreadable)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except IsADirectoryError as err:
        raise PromptFileError(f"{path}: is a folder, not a file") from err
    except FileNotFoundError as err:
        raise PromptFileError(f"{path}: no such file") from err


def read_prompts(source: str | Path, fields: FieldMap | None = None, *, skip_bad: bool = False,
                 limit: int | None = None) -> tuple[list[PromptRecord], ReadReport]:
    """All prompts of a source (first `limit`), with counts of skipped rows; an empty source is an error."""
    if limit is not None and limit < 1:
        raise PromptFileError(f"limit: must be >= 1 (leave it out for every prompt), got {limit!r}")
    report = ReadReport()
    records = []
    try:
        for rec in iter_prompts(source, fields, skip_bad=skip_bad, report=report):
            records.append(rec)
            if limit is not None and len(records) >= limit:
                break
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not records:
        raise PromptFileError(f"{source}: no prompts found (empty input)")
    report.rows = len(records)
    return records, report
