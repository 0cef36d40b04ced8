"""Build the embedded Python-code domain from the running interpreter's standard library.

Writes (a) the pretraining corpus (train files / held-out files) and (b) completion prompts:
data/prompts/code_train.jsonl and data/prompts/code_eval.jsonl. With --root another source tree gives another
domain (the second domain: `--root <site-packages>/transformers --name transformers --max-train 800
--max-eval 200 --no-reference`, transformers 5.24.0). The split is by source file, so no file
feeds both train and eval; a training prompt that is also an eval file's prompt, or whose function is also in an
eval file (copied code: transformers copies functions between model files), is dropped. Deterministic for a given interpreter (seeded hashing, sorted walks).
data/prompts/code_train_all.jsonl (the default recipe's training prompts: every function of the training files) is
`--max-train 100000 --max-eval 0 --no-reference` followed by `--undocumented --name code_undoc` with the same caps,
the two train files concatenated. data/prompts/transformers_train_mix.jsonl (the second domain at the default's
volume) is the same pair on transformers' sources with `--max-train 4000` each. --deep cuts further into each body.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import random
import sysconfig
import textwrap
import tokenize
from pathlib import Path

EXCLUDED_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "ensurepip"}
MAX_PROMPT_CHARS = 1200
MAX_FILE_BYTES = 400_000
DEEP_MIN_LINES = 4  # a deep cut keeps at least this many body lines in the prompt


def stdlib_files(root: Path) -> list[Path]:
    """Every .py file of the stdlib, test packages and third-party folders excluded, sorted."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_PARTS or part.startswith("test_") for part in rel.parts):
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        files.append(path)
    return files


def split_of(rel_path: str, seed: int, eval_fraction: float) -> str:
    """Stable per-file split from a seeded hash of the relative path."""
    h = int(hashlib.sha256(f"{seed}:{rel_path}".encode()).hexdigest()[:8], 16)
    return "eval" if h / 0xFFFFFFFF < eval_fraction else "train"


def _string_chars(source: str) -> int:
    total = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.STRING:
                total += len(tok.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return 0
    return total


def categorize(name: str, in_class: bool, body_source: str) -> str:
    """What kind of code the prompt is: test_like, string_heavy, class_method or plain_function."""
    if name.startswith(("test", "check", "assert", "_test")):
        return "test_like"
    if body_source and _string_chars(body_source) > 0.25 * len(body_source):
        return "string_heavy"
    return "class_method" if in_class else "plain_function"


def prompts_from_source(source: str, rel_path: str, rng: random.Random, documented: bool = True,
                        deep: bool = False) -> list[dict]:
    """Function/method header + docstring + first 1-3 body lines as a completion prompt; documented=False: the
    functions WITHOUT a docstring instead (header + first 1-3 body lines), more contexts from the same files;
    deep=True: cut at a random line 4 or more lines into the body instead (another context per longer function)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    out = []

    def visit(node: ast.AST, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                emit(child, in_class)
                visit(child, False)
            elif isinstance(child, ast.ClassDef):
                visit(child, True)

    def emit(fn: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> None:
        doc = ast.get_docstring(fn)
        body = fn.body
        if bool(doc) != documented or len(body) < 2 or fn.end_lineno is None:
            return
        start = (fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno) - 1
        code_start = body[1 if documented else 0].lineno - 1  # first line after the docstring, if any
        if deep:
            if code_start + DEEP_MIN_LINES > fn.end_lineno - 1:
                return
            cut = rng.randint(code_start + DEEP_MIN_LINES, fn.end_lineno - 1)
        else:
            cut = min(code_start + rng.randint(1, 3), fn.end_lineno - 1)
        if cut <= code_start:
            return
        # no trailing newline: a bare "\n" token is a boundary BPE never saw mid-function (token healing)
        prompt = textwrap.dedent("".join(lines[start:cut])).rstrip("\n")
        rest = textwrap.dedent("".join(lines[start:fn.end_lineno]))[len(prompt):]
        if not prompt.strip() or not rest.strip() or len(prompt) > MAX_PROMPT_CHARS:
            return
        body_source = "".join(lines[code_start:fn.end_lineno])
        out.append({
            "id": f"{rel_path}:{fn.lineno}:{fn.name}" + (f"@{cut + 1}" if deep else ""),
            "prompt": prompt,
            "category": categorize(fn.name, in_class, body_source),
            "source_file": rel_path,
            "reference": rest[:2000],
        })

    visit(tree, False)
    return out


def build(out_dir: Path, corpus_dir: Path, seed: int, eval_fraction: float, max_train: int, max_eval: int,
          root: Path | None = None, name: str = "code", reference: bool = True, documented: bool = True,
          deep: bool = False) -> dict:
    root = root or Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    corpus = {"train": [], "eval": []}
    prompts = {"train": [], "eval": []}
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        split = split_of(rel, seed, eval_fraction)
        corpus[split].append(source)
        prompts[split].extend(prompts_from_source(source, rel, rng, documented, deep))
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    # copied code (transformers' "Copied from" models) puts eval files' functions verbatim in train files; an equal
    # prompt alone is a leak too, since the targets are the model's own continuation of the prompt
    eval_texts = {row["prompt"] for row in prompts["eval"]} | {row["prompt"] + row["reference"] for row in prompts["eval"]}
    counts = {}
    for split, cap in (("train", max_train), ("eval", max_eval)):
        rows = prompts[split]
        random.Random(seed + 1).shuffle(rows)
        rows = sorted(rows[:cap], key=lambda r: r["id"])
        if split == "train":
            kept = [row for row in rows
                    if row["prompt"] not in eval_texts and row["prompt"] + row["reference"] not in eval_texts]
            counts["train_dropped_as_eval_copies"] = len(rows) - len(kept)
            rows = kept
        with open(out_dir / f"{name}_{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                if not reference:
                    row.pop("reference")
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (corpus_dir / f"corpus_{split}.txt").write_text("\n\x00\n".join(corpus[split]), encoding="utf-8")
        counts[split] = {"files": len(corpus[split]), "prompts": len(rows),
                         "corpus_chars": sum(len(s) for s in corpus[split])}
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/prompts", help="folder for code_train.jsonl / code_eval.jsonl")
    parser.add_argument("--corpus", default=".cache/corpus", help="folder for the pretraining corpus (not committed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-fraction", type=float, default=0.15)
    parser.add_argument("--max-train", type=int, default=3000)
    parser.add_argument("--max-eval", type=int, default=400)
    parser.add_argument("--root", default=None, help="source tree (default: this interpreter's stdlib)")
    parser.add_argument("--name", default="code", help="prompt files are NAME_train.jsonl / NAME_eval.jsonl")
    parser.add_argument("--no-reference", action="store_true", help="leave out each prompt's true continuation")
    parser.add_argument("--undocumented", action="store_true",
                        help="prompts from the functions without a docstring (extra training contexts)")
    parser.add_argument("--deep", action="store_true",
                        help=f"cut {DEEP_MIN_LINES}+ lines into each body instead of 1-3 (extra training contexts)")
    args = parser.parse_args()
    counts = build(Path(args.out), Path(args.corpus), args.seed, args.eval_fraction, args.max_train, args.max_eval,
                   Path(args.root) if args.root else None, args.name, not args.no_reference, not args.undocumented,
                   args.deep)
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()
