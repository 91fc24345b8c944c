"""Regenerate the shipped benchmark prompt suite, ``workers/data/prompts.jsonl``.

This script owns the suite's content and how it is cut from real text on this machine:

* ``code``: raw completion prompts cut from the running interpreter's standard library source,
  ending at the start of a line a few statements into a well-known function's body;
* ``chat``: user questions to an assistant, written here;
* ``summary``: a summarization request over a real passage: the long descriptions of installed
  Debian packages (``dpkg-query``) and long module docstrings of the standard library.

Every choice is fixed (no randomness), so running it again on the same machine reproduces the
file byte for byte. Categories are interleaved (code, chat, summary, ...) so a ``--limit`` of a
multiple of three covers all of them. Run: ``.venv/bin/python scripts/make_prompts.py``.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from workers.prompts import SUMMARY_INSTRUCTION, plain_description

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "workers" / "data" / "prompts.jsonl"

CODE_MIN_CHARS, CODE_MAX_CHARS = 300, 1200
SUMMARY_MIN_CHARS, SUMMARY_MAX_CHARS = 400, 1500

# (stdlib file, function qualname, body statements kept after the docstring)
CODE_SOURCES: list[tuple[str, str, int]] = [
    ("textwrap.py", "indent", 1),
    ("json/encoder.py", "py_encode_basestring_ascii", 1),
    ("heapq.py", "heappushpop", 1),
    ("bisect.py", "bisect_right", 2),
    ("shlex.py", "quote", 2),
    ("fnmatch.py", "filter", 3),
    ("string.py", "Template.substitute", 2),
    ("glob.py", "_iglob", 3),
    ("statistics.py", "median", 2),
    ("csv.py", "DictReader.__next__", 3),
    ("functools.py", "cmp_to_key", 1),
    ("calendar.py", "monthrange", 2),
]

CHAT_QUESTIONS: list[str] = [
    "Can you explain what a hash table is and why lookups in it are usually fast?",
    "Write a short Python function that checks whether a string is a palindrome, ignoring "
    "case and spaces.",
    "Give me five tips for writing clear and helpful commit messages.",
    "What is the difference between a process and a thread?",
    "How do I make a good cup of tea? Please give me the steps.",
    "Explain recursion to someone who is just starting to learn programming.",
    "Compare TCP and UDP. When would you choose one over the other?",
    "Write a Python function that returns the n-th Fibonacci number using a loop.",
    "What are some practical ways to stay focused while working from home?",
    "How does a web browser load a page after I type a URL and press Enter?",
    "What is the difference between a list and a tuple in Python?",
    "Give me a simple plan for learning to run five kilometres in two months.",
]

# Debian packages whose long descriptions are mostly prose (read with dpkg-query / apt-cache).
DEBIAN_PACKAGES: list[str] = [
    "grep", "wget", "diffutils", "openssh-client", "mawk", "build-essential",
]

# Standard-library modules with long prose docstrings, and how many leading paragraphs to keep
# (None: as many as fit in SUMMARY_MAX_CHARS).
STDLIB_DOCSTRINGS: list[tuple[str, int | None]] = [
    ("sched.py", None), ("heapq.py", None), ("doctest.py", None), ("copy.py", None),
    ("turtle.py", 3), ("pydoc.py", 9),
]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def find_function(tree: ast.Module, qualname: str) -> tuple[ast.FunctionDef, list[ast.stmt]]:
    """The function named ``qualname`` and the body (module or class) that holds it."""
    body: list[ast.stmt] = tree.body
    parent = body
    node: ast.AST | None = None
    for part in qualname.split("."):
        parent = body
        node = next((n for n in body
                     if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise LookupError(f"{qualname}: no {part!r}")
        body = node.body
    if not isinstance(node, ast.FunctionDef):
        raise LookupError(f"{qualname} is not a function")
    return node, parent


def first_line(node: ast.stmt, lines: list[str]) -> int:
    """0-based first line of ``node``, with its decorators and the comments right above it."""
    decorators = getattr(node, "decorator_list", [])
    start = (decorators[0].lineno if decorators else node.lineno) - 1
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return start


def code_prompt(rel: str, qualname: str, keep: int) -> dict:
    """Cut a prompt from ``rel`` ending at the start of a line inside ``qualname``'s body.

    The cut falls after the docstring (if any) and ``keep`` further body statements. The
    preceding context starts at the function (decorators and comments above it included) and
    takes in whole preceding sibling statements until it reaches ``CODE_MIN_CHARS``.
    """
    path = stdlib_root() / rel
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    func, parent = find_function(ast.parse(text), qualname)
    body = list(func.body)
    has_doc = (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
               and isinstance(body[0].value.value, str))
    skip = (1 if has_doc else 0) + keep
    if skip >= len(body):
        raise ValueError(f"{rel}:{qualname}: only {len(body)} statements in the body")
    cut_line = first_line(body[skip], lines)  # 0-based index of the first line left out
    while not lines[cut_line - 1].strip():  # no trailing blank lines
        cut_line -= 1
    siblings = parent[: parent.index(func)]
    start = first_line(func, lines)
    while siblings and len("".join(lines[start:cut_line])) < CODE_MIN_CHARS:
        start = first_line(siblings.pop(), lines)
    prompt = "".join(lines[start:cut_line])
    if not CODE_MIN_CHARS <= len(prompt) <= CODE_MAX_CHARS:
        raise ValueError(f"{rel}:{qualname}: prompt of {len(prompt)} chars")
    return {"prompt": prompt, "source": f"stdlib:{rel}"}


def debian_description(package: str) -> str:
    """The long description of an installed (or known) Debian package, as plain paragraphs."""
    raw = ""
    if shutil.which("dpkg-query"):
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Description}", package],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            raw = proc.stdout
    if not raw and shutil.which("apt-cache"):
        proc = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                              capture_output=True, text=True, check=False)
        m = re.search(r"^Description(?:-en)?: (.*(?:\n .*)*)", proc.stdout, re.M)
        if m:
            raw = m.group(1)
    if len(raw.splitlines()) < 2:
        raise LookupError(f"debian:{package}: no long description (is the package installed?)")
    return plain_description(raw)


def stdlib_docstring(rel: str, max_paragraphs: int | None = None) -> str:
    """A module docstring's leading paragraphs, at most ``SUMMARY_MAX_CHARS`` in all."""
    text = (stdlib_root() / rel).read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(text), clean=True)
    if not doc:
        raise LookupError(f"stdlib:{rel}: no module docstring")
    passage = ""
    for para in doc.split("\n\n")[:max_paragraphs]:
        candidate = f"{passage}\n\n{para}" if passage else para
        if len(candidate) > SUMMARY_MAX_CHARS:
            break
        passage = candidate
    return passage


def summary_record(passage: str, source: str) -> dict:
    passage = passage.strip()
    if not SUMMARY_MIN_CHARS <= len(passage) <= SUMMARY_MAX_CHARS:
        raise ValueError(f"{source}: passage of {len(passage)} chars")
    content = f"{SUMMARY_INSTRUCTION}\n\n{passage}"
    return {"messages": [{"role": "user", "content": content}], "source": source}


def check_clean(record: dict) -> None:
    for value in (record.get("prompt"), *(m["content"] for m in record.get("messages", []))):
        if value is None:
            continue
        if _CONTROL.search(value):
            raise ValueError(f"{record['id']}: control character in text")
        value.encode("utf-8")  # raises on lone surrogates


def build() -> list[dict]:
    code = [code_prompt(*spec) for spec in CODE_SOURCES]
    chat = [{"messages": [{"role": "user", "content": q}], "source": "written"}
            for q in CHAT_QUESTIONS]
    summary = [summary_record(debian_description(p), f"debian:{p}") for p in DEBIAN_PACKAGES]
    summary += [summary_record(stdlib_docstring(m, n), f"stdlib:{m}")
                for m, n in STDLIB_DOCSTRINGS]
    groups = {"code": code, "chat": chat, "summary": summary}
    records: list[dict] = []
    for i in range(max(len(g) for g in groups.values())):
        for category, group in groups.items():
            if i < len(group):
                rec = {"id": f"{category}-{i + 1:02d}", "category": category, **group[i]}
                check_clean(rec)
                records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSONL path")
    args = parser.parse_args(argv)
    records = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    counts = {c: sum(r["category"] == c for r in records) for c in ("code", "chat", "summary")}
    print(f"wrote {len(records)} prompts {counts} to {args.out} "
          f"({args.out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
