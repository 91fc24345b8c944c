"""Unit tests of the shipped benchmark prompt suite and its loader (``workers/prompts.py``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from workers.prompts import DEFAULT_PROMPTS_PATH, BenchPrompt, PromptFileError, load_prompts

CATEGORIES = {"code", "chat", "summary"}


def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_PROMPT = json.dumps({"id": "code-01", "category": "code", "prompt": "def f():\n"})
GOOD_CHAT = json.dumps({"id": "chat-01", "category": "chat",
                        "messages": [{"role": "user", "content": "Hi"}]})


# --- the shipped suite ---------------------------------------------------------------------------

def test_shipped_suite_loads_with_three_categories():
    prompts = load_prompts()
    assert len(prompts) >= 30
    counts = Counter(p.category for p in prompts)
    assert set(counts) == CATEGORIES
    assert all(n >= 10 for n in counts.values()), counts
    assert len({p.id for p in prompts}) == len(prompts)


def test_shipped_suite_records_are_well_formed():
    assert DEFAULT_PROMPTS_PATH.stat().st_size < 100_000
    for p in load_prompts():
        assert p.id.startswith(f"{p.category}-")
        assert p.source
        if p.category == "code":
            assert p.prompt is not None and p.messages is None
            assert 300 <= len(p.prompt) <= 1200
        else:
            assert p.messages is not None and p.prompt is None
            assert [m["role"] for m in p.messages] == ["user"]
        if p.category == "summary":
            content = p.messages[0]["content"]
            assert content.startswith("Summarize the following text in two or three sentences:")
            passage = content.split("\n\n", 1)[1]
            assert 400 <= len(passage) <= 1500


def test_shipped_suite_text_is_clean():
    raw = DEFAULT_PROMPTS_PATH.read_bytes()
    text = raw.decode("utf-8")
    for p in load_prompts():
        for s in [p.prompt] if p.prompt is not None else [m["content"] for m in p.messages]:
            bad = [c for c in s if (ord(c) < 32 and c not in "\n\t") or ord(c) == 127]
            assert not bad, (p.id, bad)
    assert text.endswith("\n")


def test_limit_six_covers_all_categories():
    prompts = load_prompts(limit=6)
    assert len(prompts) == 6
    assert {p.category for p in prompts} == CATEGORIES


def test_limit_and_path_forms():
    assert load_prompts(limit=0) == []
    assert [p.id for p in load_prompts(str(DEFAULT_PROMPTS_PATH), limit=3)] == \
        [p.id for p in load_prompts(limit=3)]
    with pytest.raises(ValueError):
        load_prompts(limit=-1)


def test_line_and_paragraph_separators_inside_a_record_stay_in_it(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 raw (a suite written with
    ensure_ascii=False); str.splitlines ended a record there. Windows line ends still end one."""
    text = "First line\u2028second\u2029third\u0085fourth"
    record = json.dumps({"id": "chat-02", "category": "chat",
                         "messages": [{"role": "user", "content": text}]}, ensure_ascii=False)
    path = tmp_path / "prompts.jsonl"
    path.write_bytes("\r\n".join([GOOD_PROMPT, record, "", GOOD_CHAT, ""]).encode())
    prompts = load_prompts(path)
    assert [p.id for p in prompts] == ["code-01", "chat-02", "chat-01"]
    assert prompts[1].messages[0]["content"] == text
    bad = write_lines(tmp_path, [GOOD_PROMPT, "{\"id\": 1\u2028"])
    with pytest.raises(PromptFileError, match=r":2: invalid JSON"):  # line numbers as before
        load_prompts(bad)


# --- invalid files -------------------------------------------------------------------------------

def test_bad_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path, [GOOD_PROMPT, "", GOOD_CHAT, '{"id": "x", "category": '])
    with pytest.raises(PromptFileError, match=rf"{path.name}:4: invalid JSON"):
        load_prompts(path)


def test_non_object_line_names_line(tmp_path):
    path = write_lines(tmp_path, [GOOD_PROMPT, "[1, 2]"])
    with pytest.raises(PromptFileError, match=r":2: expected a JSON object"):
        load_prompts(path)


def test_both_prompt_and_messages_names_line(tmp_path):
    both = json.dumps({"id": "x-01", "category": "chat", "prompt": "p",
                       "messages": [{"role": "user", "content": "Hi"}]})
    path = write_lines(tmp_path, [GOOD_PROMPT, GOOD_CHAT, both])
    with pytest.raises(PromptFileError, match=r":3: invalid prompt record.*both"):
        load_prompts(path)


def test_neither_prompt_nor_messages_names_line(tmp_path):
    neither = json.dumps({"id": "x-01", "category": "chat"})
    path = write_lines(tmp_path, [neither, GOOD_PROMPT])
    with pytest.raises(PromptFileError, match=r":1: invalid prompt record.*neither"):
        load_prompts(path)


def test_missing_field_and_bad_messages_name_line(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"category": "code", "prompt": "p"})])
    with pytest.raises(PromptFileError, match=r":1: invalid prompt record: id"):
        load_prompts(path)
    bad = json.dumps({"id": "c", "category": "chat", "messages": [{"role": "user"}]})
    path = write_lines(tmp_path, [GOOD_PROMPT, bad])
    with pytest.raises(PromptFileError, match=r":2: invalid prompt record.*messages\[0\]"):
        load_prompts(path)


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_lines(tmp_path, [GOOD_PROMPT, GOOD_CHAT, GOOD_PROMPT])
    with pytest.raises(PromptFileError, match=r":3: duplicate id 'code-01' \(first on line 1\)"):
        load_prompts(path)


def test_missing_file_names_file(tmp_path):
    with pytest.raises(PromptFileError, match="nope.jsonl"):
        load_prompts(tmp_path / "nope.jsonl")


def test_model_validation_directly():
    with pytest.raises(ValueError, match="exactly one"):
        BenchPrompt(id="a", category="code")
    p = BenchPrompt(id="a", category="code", prompt="x", max_tokens=8, source="s")
    assert not p.is_chat and p.max_tokens == 8


# --- to_token_ids --------------------------------------------------------------------------------

class FakeBatchEncoding(dict):
    """Stands in for transformers' BatchEncoding (a mapping holding ``input_ids``)."""


class FakeTokenizer:
    """Maps each character to its code point; the chat template wraps turns in markers."""

    def __init__(self, chat_returns: str = "list"):
        self.chat_returns = chat_returns
        self.calls: list[tuple] = []

    def _encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def __call__(self, text: str) -> FakeBatchEncoding:
        self.calls.append(("call", text))
        return FakeBatchEncoding(input_ids=self._encode(text), attention_mask=[1] * len(text))

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        self.calls.append(("chat", add_generation_prompt, tokenize))
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        ids = self._encode(text)
        if self.chat_returns == "list":
            return ids
        if self.chat_returns == "batch":
            return [ids]
        return FakeBatchEncoding(input_ids=ids)


def test_to_token_ids_plain_prompt():
    tok = FakeTokenizer()
    p = BenchPrompt(id="c", category="code", prompt="def f")
    assert p.to_token_ids(tok) == [ord(c) for c in "def f"]
    assert tok.calls == [("call", "def f")]


@pytest.mark.parametrize("returns", ["list", "batch", "dict"])
def test_to_token_ids_chat_template(returns):
    tok = FakeTokenizer(chat_returns=returns)
    p = BenchPrompt(id="c", category="chat", messages=[{"role": "user", "content": "Hi"}])
    ids = p.to_token_ids(tok)
    assert ids == [ord(c) for c in "<user>Hi<assistant>"]
    assert all(type(t) is int for t in ids)
    assert tok.calls == [("chat", True, True)]


def test_shipped_prompts_tokenize_with_fake_tokenizer():
    tok = FakeTokenizer(chat_returns="dict")
    for p in load_prompts(limit=6):
        assert len(p.to_token_ids(tok)) > 0


def test_loader_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, workers.prompts as m; m.load_prompts(limit=3); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
