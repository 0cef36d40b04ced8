"""Prompt readers: every format, field mapping, chat templates, bad input naming file and line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nld_lora.data.readers import FieldMap, PromptFileError, read_prompts
from nld_lora.data.templates import render_prompt
from tests.helpers import tiny_tokenizer

ROWS = [{"id": "a", "prompt": "def f():\n", "category": "x"}, {"id": "b", "prompt": "class C:\n", "category": "y"}]


def test_each_format_reads_the_same_prompts(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    (tmp_path / "p.json").write_text(json.dumps({"data": ROWS}))
    (tmp_path / "p.csv").write_text('id,prompt,category\na,"def f():\n",x\nb,"class C:\n",y\n')
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    from datasets import Dataset

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    for name in ("p.jsonl", "p.json", "p.csv", "p.parquet", "ds"):
        records, report = read_prompts(tmp_path / name)
        assert [(r.id, r.prompt, r.category) for r in records] == [("a", "def f():\n", "x"), ("b", "class C:\n", "y")]
        assert report.rows == 2


def test_text_lines_and_folders(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond\\nline\n")
    records, _ = read_prompts(tmp_path / "p.txt")
    assert [r.prompt for r in records] == ["first prompt", "second\nline"]
    folder = tmp_path / "snippets"
    folder.mkdir()
    (folder / "one.py").write_text("import os\n")
    (folder / "two.txt").write_text("hello\n")
    records, _ = read_prompts(folder)
    assert [(r.id, r.prompt) for r in records] == [("one.py", "import os\n"), ("two.txt", "hello\n")]


def test_field_mapping_and_messages(tmp_path):
    rows = [{"q": "hi", "uid": 7}, {"conv": [{"role": "user", "content": "yo"}]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = read_prompts(tmp_path / "p.jsonl", FieldMap(prompt="q", messages="conv", id="uid"))
    assert records[0].id == "7" and records[0].prompt == "hi"
    assert records[1].messages == [{"role": "user", "content": "yo"}] and len(records[1].id) == 16


def test_bad_input_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": broken\n{"text": "no prompt field"}\n')
    with pytest.raises(PromptFileError, match=r"bad.jsonl:2: malformed JSON"):
        read_prompts(path)
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(PromptFileError, match=r"bad.jsonl:2: missing field 'prompt'"):
        read_prompts(path)
    path.write_text('{"prompt": "ok"}\n{"prompt": broken\n{"text": "x"}\n')
    records, report = read_prompts(path, skip_bad=True)
    assert len(records) == 1 and report.skipped["bad_row"] == 2
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptFileError, match="empty input"):
        read_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "p.csv").write_text("text\nhello\n")
    with pytest.raises(PromptFileError, match=r"p.csv:1: header has no column 'prompt'"):
        read_prompts(tmp_path / "p.csv")
    with pytest.raises(PromptFileError, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl")


def test_chat_template_is_the_tokenizers_own():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    from nld_lora.data.readers import PromptRecord

    conv = PromptRecord("c", messages=[{"role": "user", "content": "sum two ints"}])
    assert render_prompt(conv, tok) == tok.apply_chat_template(conv.messages, tokenize=False,
                                                               add_generation_prompt=True)
    with_system = render_prompt(conv, tok, system_prompt="be brief")
    assert with_system.startswith("<system>be brief\n<user>sum two ints") and with_system.endswith("<assistant>")
    plain = PromptRecord("p", prompt="def f():")
    assert render_prompt(plain, tok) == "def f():"
    assert render_prompt(plain, tok, use_chat_template=True) == "<user>def f():\n<assistant>"
    tok.chat_template = None
    with pytest.raises(PromptFileError, match="no chat template"):
        render_prompt(conv, tok)
