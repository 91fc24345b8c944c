"""Training data for `s3d train`: offline text and the base model's own rollouts.

Offline text is Python standard-library source, Debian package descriptions and Python docs
when installed. Rollouts are the base model's greedy continuations of three kinds of request,
the kinds of traffic the server decodes: ``chat`` (general questions, and questions about
installed packages and stdlib modules), ``code`` (a stdlib function's first lines to continue)
and ``summary`` (a request to summarise a package description or a module docstring). Nothing
the benchmark suite or the search's calibration decodes is used: their sources (stdlib files,
Debian packages) are left out of the text and of the rollout requests (``held_back_sources``).
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import json
import random
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import torch
from tqdm import tqdm

from workers.engine import Engine
from workers.files import write_text
from workers.prompts import (
    SUMMARY_INSTRUCTION,
    BenchPrompt,
    as_id_list,
    load_prompts,
    plain_description,
)
from workers.search import (
    CALIBRATION_DOCSTRINGS,
    CALIBRATION_FUNCTIONS,
    CALIBRATION_MODULES,
    stdlib_source,
)

HELD_OUT_EVERY = 10  # every 10th chunk or rollout is held out
ROLLOUT_KINDS = ("chat", "code", "summary")


class TrainingDataError(ValueError):
    """Too little training text to train on and hold some out (no sources installed, or a
    ``max_chars`` too small): names the sources found and the setting."""


@dataclass
class Sequence:
    """A training sequence: token ids, and where mask attach points may start (a rollout's
    request is not the base model's text, so attach points sit in its answer)."""

    tokens: list[int]
    first_attach: int = 8


@dataclass(frozen=True)
class HeldBack:
    """What training must not see: stdlib files (relative paths) and Debian packages."""

    stdlib: frozenset[str]
    debian: frozenset[str]

    @property
    def modules(self) -> frozenset[str]:
        """Top-level module names of the held-back stdlib files (``json/encoder.py``: json)."""
        return frozenset(p.split("/")[0].removesuffix(".py") for p in self.stdlib)


@functools.cache
def held_back_sources() -> HeldBack:
    """The benchmark suite's sources and the search's calibration modules."""
    sources = [p.source or "" for p in load_prompts()]
    stdlib = {s.removeprefix("stdlib:") for s in sources if s.startswith("stdlib:")}
    calibration = (*CALIBRATION_MODULES, *CALIBRATION_FUNCTIONS, *CALIBRATION_DOCSTRINGS)
    root = Path(sysconfig.get_paths()["stdlib"])
    # The files the calibration reads on this Python too (pathlib's is a package's from 3.13).
    stdlib |= {*calibration, *(path.relative_to(root).as_posix()
                               for path in map(stdlib_source, calibration) if path is not None)}
    debian = {s.removeprefix("debian:") for s in sources if s.startswith("debian:")}
    return HeldBack(frozenset(stdlib), frozenset(debian))


def _stdlib_files(held: HeldBack) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of stdlib modules one level deep, tests and held-back files
    left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        rel = path.relative_to(root).as_posix()
        if ("test" in path.parts[-2] or path.name.startswith("test") or rel in held.stdlib
                or path.parts[-2] in ("site-packages", "dist-packages")):  # not the stdlib
            continue
        out.append((rel, path))
    return out


@functools.cache
def _installed_descriptions() -> tuple[tuple[str, str], ...]:
    """``(package, description field)`` of every installed package (read once per process)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Package}: ${Description}\n\n"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    pairs = (entry.partition(": ") for entry in out.split("\n\n"))
    return tuple((package, description) for package, _, description in pairs if package)


def _debian_descriptions(held: HeldBack) -> list[tuple[str, str]]:
    """``(package, description field)`` of installed packages, held-back ones left out."""
    return [(p, d) for p, d in _installed_descriptions() if p not in held.debian]


def _debian_texts(held: HeldBack) -> list[str]:
    """The longer descriptions of installed packages (held-back ones left out), as text."""
    return [f"{package}: {description}" for package, description in _debian_descriptions(held)
            if len(package) + len(description) > 198]


def _pydoc_files(held: HeldBack) -> list[str]:
    """Python's documentation sources, when installed (python3-doc), held-back modules' left
    out."""
    return [path for path in sorted(glob.glob("/usr/share/doc/python3*/html/_sources/**/*.txt",
                                              recursive=True))
            if Path(path).name.split(".")[0] not in held.modules]


def source_counts() -> dict[str, int]:
    """How many texts each source of ``corpus_texts`` offers on this machine (for an error
    that finds too few)."""
    held = held_back_sources()
    return {"stdlib files": len(_stdlib_files(held)),
            "Debian descriptions": len(_debian_texts(held)),
            "Python docs pages": len(_pydoc_files(held))}


def corpus_texts(max_chars: int = 3_000_000, sources: tuple[str, ...] = ("stdlib", "debian",
                                                                          "pydoc")) -> list[str]:
    """Offline real text: stdlib source, Debian package descriptions, Python docs if installed
    (held-back sources left out)."""
    held = held_back_sources()
    texts: list[str] = []
    if "stdlib" in sources:
        texts.extend(path.read_text(errors="ignore") for _, path in _stdlib_files(held))
    if "debian" in sources:
        texts.extend(_debian_texts(held))
    if "pydoc" in sources:
        texts.extend(Path(path).read_text(errors="ignore") for path in _pydoc_files(held))
    random.Random(0).shuffle(texts)
    out, total = [], 0
    for t in texts:
        out.append(t)
        total += len(t)
        if total >= max_chars:
            break
    return out


def chunk_tokens(tokenizer, texts: list[str], length: int) -> list[list[int]]:
    chunks = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for i in range(0, len(ids) - length + 1, length):
            chunks.append(ids[i:i + length])
    return chunks


# Chat requests for rollouts, filled with installed Debian packages and standard library modules
# (the benchmark's chat questions are hand-written and not among them).
CHAT_TEMPLATES = (
    "What is the Debian package {pkg} used for?",
    "Explain in a few sentences what {pkg} does and who would install it.",
    "How do I get started with {pkg} on Linux? Give me the first steps.",
    "What does the Python module {mod} do? Show a short example.",
    "Write a small Python function that uses the {mod} module, and explain it.",
    "When should I use Python's {mod} module, and what are common mistakes with it?",
)
# General chat requests: templates per kind of topic in data/chat-topics.json (everyday and
# technical subjects, none a benchmark or calibration question).
CHAT_TOPICS = Path(__file__).parent / "data" / "chat-topics.json"
TOPIC_TEMPLATES = {
    "explain": ("Explain {0} in simple terms.",
                "Can you give me a short introduction to {0}?",
                "I am new to this: what should I know about {0}?"),
    "tips": ("Give me some practical tips for {0}.",
             "What are common mistakes people make when {0}?"),
    "howto": ("How do I {0}?", "Walk me through how to {0}, step by step."),
    "compare": ("What is the difference between {0} and {1}?",
                "How do {0} and {1} differ, and when does each make sense?"),
    "python": ("Write a Python function that {0}.",
               "Write a Python function that {0}, and explain how it works."),
}
SUMMARY_TEMPLATES = (
    SUMMARY_INSTRUCTION,
    "Give a short summary of the following text:",
    "What is this about? Explain it briefly in your own words.",
)
SUMMARY_CHARS = 1200  # longest text to summarise
CODE_LINES = (4, 20)  # a code request: a function's first 4-20 lines
CODE_TOKENS = 256


def general_questions() -> list[str]:
    """Every general chat question: each topic of ``CHAT_TOPICS`` in each template of its kind."""
    topics = json.loads(CHAT_TOPICS.read_text())
    return [template.format(*([topic] if isinstance(topic, str) else topic))
            for kind, templates in TOPIC_TEMPLATES.items()
            for topic in topics[kind] for template in templates]


def chat_requests(count: int, seed: int = 0) -> list[list[dict]]:
    """``count`` single-turn chat requests (fixed order for a seed), general questions and
    questions about installed packages and stdlib modules (``CHAT_TEMPLATES``) in turn while
    both last."""
    held = held_back_sources()
    packages = sorted({p for p, _ in _debian_descriptions(held) if not p.startswith("lib")})
    modules = sorted(m for m in sys.stdlib_module_names
                     if not m.startswith("_") and m not in held.modules)
    named = [t.format(pkg=name, mod=name) for t in CHAT_TEMPLATES
             for name in (packages if "{pkg}" in t else modules)]
    general = general_questions()
    rng = random.Random(seed)
    rng.shuffle(named)
    rng.shuffle(general)
    questions = [q for pair in zip_longest(general, named) for q in pair if q is not None]
    return [[{"role": "user", "content": q}] for q in questions[:count]]


def summary_requests(count: int, seed: int = 0) -> list[list[dict]]:
    """``count`` requests to summarise a package description or a module docstring, each
    with one of ``SUMMARY_TEMPLATES``."""
    held = held_back_sources()
    texts = [t for t in (plain_description(d) for _, d in _debian_descriptions(held))
             if len(t) > 300]
    for _, path in _stdlib_files(held):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(errors="ignore")))
        except (SyntaxError, ValueError):
            continue
        if doc and len(doc) > 300:
            texts.append(doc)
    rng = random.Random(seed)
    rng.shuffle(texts)
    return [[{"role": "user", "content": f"{rng.choice(SUMMARY_TEMPLATES)}\n\n"
                                         f"{text[:SUMMARY_CHARS]}"}] for text in texts[:count]]


def code_requests(count: int, seed: int = 0) -> list[str]:
    """``count`` stdlib functions' first lines (from the ``def``, decorators included), to be
    continued as raw text."""
    held = held_back_sources()
    rng = random.Random(seed)
    starts: list[tuple[list[str], int]] = []
    for _, path in _stdlib_files(held):
        lines = path.read_text(errors="ignore").splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith("def "):
                first = i
                while first > 0 and lines[first - 1].lstrip().startswith("@"):
                    first -= 1
                starts.append((lines, first))
    rng.shuffle(starts)
    return ["\n".join(lines[first:first + rng.randint(*CODE_LINES)]) + "\n"
            for lines, first in starts[:count]]


def rollout_prompts(tokenizer, kind: str, count: int) -> list[list[int]]:
    """Token ids of ``count`` requests of ``kind`` (one of ``ROLLOUT_KINDS``)."""
    if kind == "code":
        return [as_id_list(tokenizer(text))[:CODE_TOKENS] for text in code_requests(count)]
    requests = {"chat": chat_requests, "summary": summary_requests}[kind](count)
    return [BenchPrompt(id=kind, category=kind, messages=m).to_token_ids(tokenizer)
            for m in requests]


def rollouts(engine: Engine, prompts: list[list[int]], new_tokens: int = 64, batch: int = 32,
             desc: str = "rollouts") -> list[Sequence]:
    """The base model's greedy continuations of ``prompts`` (batched, left-padded), each cut
    after its first stop token."""
    model = engine.loaded.model
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Sequence | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=len(prompts) < batch)
    for b in range(0, len(order), batch):
        rows = order[b:b + batch]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for row, i in enumerate(rows):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        with torch.inference_mode():
            gen = model.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        for row, i in enumerate(rows):
            answer = gen[row, width:].tolist()
            cut = next((n + 1 for n, t in enumerate(answer) if t in engine.stops), len(answer))
            out[i] = Sequence(prompts[i] + answer[:cut], first_attach=len(prompts[i]) - 1)
        bar.update(len(rows))
    bar.close()
    return [s for s in out if s is not None]


def rollouts_path(out: Path, kind: str) -> Path:
    """Where an adapter's rollouts of ``kind`` are kept (beside its checkpoint)."""
    return out.with_name(f"{out.stem}.rollouts-{kind}.json")


def load_rollouts(engine: Engine, path: Path, kind: str, count: int, new_tokens: int,
                  log: Callable[[str], None] = print) -> list[Sequence]:
    """``count`` rollouts of ``kind``, generated once and kept in ``path`` (regenerated when
    the model, the requests or the answer length change)."""
    if count <= 0:
        return []
    prompts = rollout_prompts(engine.tokenizer, kind, count)
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    key = {"model_fingerprint": engine.loaded.fingerprint, "kind": kind, "count": count,
           "new_tokens": new_tokens, "requests_sha256": digest}
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("key") == key:
            log(f"{kind} rollouts: {len(data['sequences'])} from {path}")
            return [Sequence(**s) for s in data["sequences"]]
    sequences = rollouts(engine, prompts, new_tokens, desc=f"{kind} rollouts")
    log(f"{kind} rollouts: {len(sequences)} answers, "
        f"{sum(len(s.tokens) - s.first_attach - 1 for s in sequences)} tokens generated")
    write_text(path, json.dumps({"key": key, "sequences": [  # whole, or the old cache stays
        {"tokens": s.tokens, "first_attach": s.first_attach} for s in sequences]}))
    return sequences


def split_held_out(items: list, limit: int) -> tuple[list, list]:
    """Every ``HELD_OUT_EVERY``-th item held out (the first ``limit`` of them), the rest
    trained (the every-``HELD_OUT_EVERY``-th items past ``limit`` too)."""
    held = set(range(0, len(items), HELD_OUT_EVERY)[:limit])
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])
