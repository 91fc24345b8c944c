"""The search's measurements and the training's data and files: what the figures count, which
prompts and sources they use, and files that survive a process killed mid-write."""

import json
import re
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.workers.conftest import Killed, cut_short
from workers.arm import NONE_ARM, Arm, Profile
from workers.stats import SpecDecodeStats

# --- the search's measurements -------------------------------------------------------------------

class FakeEngine:
    """Generations that commit ``depth + 1`` tokens (prefill's first one, then ``depth``) in half
    a second of decoding after the first token (and next to no wall time)."""

    def __init__(self):
        from workers.pool import TokenPool

        self.pool = TokenPool()
        self.calls: list[tuple[int, str, int]] = []

    def generation(self, ids, max_tokens, arm, params=None, pool=None):
        def run():
            self.calls.append((ids[0], arm.name, max_tokens))
            gen.output = [0] * (arm.depth + 1)
            gen.stats.num_output_tokens = len(gen.output)
            gen.stats.decode_time_s = 0.5

        gen = SimpleNamespace(run=run, output=[], stats=SpecDecodeStats(
            num_spec_steps=1, num_accepted_tokens=arm.depth - 1))
        return gen


def test_goodput_is_the_tokens_after_the_first_over_the_requests_own_decoding_time():
    """The figures are what a replica records for the router (``decode_time_s``): prefill and the
    first token, which every arm pays alike, are left out, as they were not in the profile's
    figures (there the ratios between arms were compressed)."""
    from workers.search import measure_interleaved

    arms = [Arm(name=f"a{d}", drafter="ngram_tree", depth=d) for d in (2, 4)]
    prompts = [("code", [0]), ("chat", [1]), ("code", [2])]
    figs = measure_interleaved(FakeEngine(), prompts, arms, 8)
    for fig, arm in zip(figs, arms):
        rate = 2.0 * arm.depth  # depth tokens in half a second
        assert fig["tokens_per_s"] == pytest.approx(rate)
        assert fig["per_prompt"] == pytest.approx([rate] * 3)
        assert fig["by_class"] == pytest.approx({"code": rate, "chat": rate})


def test_each_arm_decodes_a_few_tokens_untimed_before_the_measurement():
    """One-time costs (a draft vocabulary's output layer, tuned row counts) fall on no arm: each
    decodes a few tokens of the first prompt first, and those runs count nowhere."""
    from workers.search import measure_interleaved

    engine = FakeEngine()
    arms = [Arm(name=f"a{d}", drafter="ngram_tree", depth=d) for d in (1, 3)]
    figs = measure_interleaved(engine, [("code", [7]), ("chat", [8])], arms, 16)
    warm, timed = engine.calls[:2], engine.calls[2:]
    assert [(p, a) for p, a, _ in warm] == [(7, "a1"), (7, "a3")]
    assert all(m <= 4 for _, _, m in warm)  # cheap
    assert [(p, m) for p, _, m in timed] == [(7, 16)] * 2 + [(8, 16)] * 2
    assert all(len(f["per_prompt"]) == 2 for f in figs)


def test_trial_prompts_take_every_class_in_turn():
    """Stage 2's default four trial prompts were two code and two summaries of the calibration
    (10 code, 8 chat, 6 doc): no chat question."""
    from workers.search import by_class_in_turn

    prompts = ([("code", [i]) for i in range(10)] + [("chat", [i]) for i in range(8)]
               + [("doc", [i]) for i in range(6)])
    assert by_class_in_turn(prompts, 4) == [("code", [0]), ("chat", [0]), ("doc", [0]),
                                            ("code", [1])]
    assert by_class_in_turn(prompts, 6) == by_class_in_turn(prompts, 4) + [("chat", [1]),
                                                                           ("doc", [1])]
    every = by_class_in_turn(prompts, 100)
    assert sorted(every) == sorted(prompts) and every[-2:] == [("code", [8]), ("code", [9])]
    assert by_class_in_turn(prompts[:2], 4) == prompts[:2]


@pytest.mark.model
def test_greedy_figures_measured_again_drop_that_dtypes_sampled_ones(bundled, monkeypatch):
    """The router prefers sampled figures for sampled requests: kept beside greedy figures
    measured again (on another machine, perhaps), they would mix two measurements."""
    from workers import search
    from workers.engine import Engine

    ngram = Arm(name="ngram_tree", drafter="ngram_tree", depth=4, top_k=2, total_tokens=6)
    sampled = {"thi": {"measured": {"none": {"tokens_per_s": 1.0},
                                    "ngram_tree": {"tokens_per_s": 3.0}}}}
    old = Profile(model_fingerprint=bundled.loaded.fingerprint, default_arm="none",
                  arms=[NONE_ARM, ngram], notes={
                      "dtype": "float32", "measured": {"none": {"tokens_per_s": 1.0},
                                                       "ngram_tree": {"tokens_per_s": 2.0}},
                      "by_temperature": {"float32": sampled, "bfloat16": sampled}})
    engine = Engine(bundled.loaded, bundled.runner, bundled.stops, old)

    def measured(engine, prompts, arms, max_tokens, labels, log, params=None):
        return [{"tokens_per_s": 5.0 + i, "mean_accepted_length": 1.0, "by_class": {},
                 "per_prompt": []} for i in range(len(arms))]

    monkeypatch.setattr(search, "measure_all_and_log", measured)
    said: list[str] = []
    new = search.remeasure(engine, old, max_prompts=1, log=said.append)
    assert set(new.notes["by_temperature"]) == {"bfloat16"}  # another dtype's stay
    assert new.default_arm == "ngram_tree" and new.notes["goodput"] == "decode"
    assert new.measured_goodput("float32", "thi")[0] == {"none": 5.0, "ngram_tree": 6.0}
    assert any("float32 (thi)" in line and "--temperature" in line for line in said)
    # Figures of another dtype than the profile's go beside them: that dtype's sampled ones go.
    beside = search.remeasure(engine, old.model_copy(update={"notes": {
        **old.notes, "dtype": "bfloat16"}}), max_prompts=1, log=said.append)
    assert set(beside.notes["by_temperature"]) == {"bfloat16"}
    assert beside.notes["measured"] == old.notes["measured"]
    assert set(beside.notes["by_dtype"]) == {"float32"}
    # Sampled figures are added as before, beside the greedy ones.
    hot = search.remeasure(engine, new, max_prompts=1, log=said.append, temperature=1.0)
    assert set(hot.notes["by_temperature"]) == {"bfloat16", "float32"}
    assert hot.notes["measured"] == new.notes["measured"]
    # Nothing to drop: nothing said.
    said.clear()
    search.remeasure(engine, new, max_prompts=1, log=said.append)
    assert not any("dropped" in line for line in said)


def test_the_shipped_profile_reads_with_both_kinds_of_figures():
    """The shipped figures, greedy and sampled in both dtypes, are decoding goodput; figures
    measured before the ``goodput`` note (whole requests timed) read all the same."""
    import copy

    from router.policy import Priors
    from workers.engine import BUNDLED_PROFILE

    shipped = Profile.load(BUNDLED_PROFILE)
    assert shipped.notes["dtype"] == "bfloat16" and shipped.notes["goodput"] == "decode"
    for dtype in ("bfloat16", "float32"):
        assert shipped.measurement(dtype)["goodput"] == "decode"
        sampled = shipped.sampled_measurements(dtype)
        assert set(sampled) == {"thi", "tlo"}
        assert all(m["goodput"] == "decode" for m in sampled.values())
    older = shipped.model_copy(update={"notes": copy.deepcopy(shipped.notes)})
    del older.notes["by_dtype"]["float32"]["goodput"]
    assert "goodput" not in older.measurement("float32")
    names = [a.name for a in shipped.arms]
    for profile, dtype, temperature in ((shipped, "bfloat16", None), (shipped, "bfloat16", "thi"),
                                        (shipped, "float32", None), (older, "float32", None),
                                        (older, "float32", "thi")):
        priors = Priors.measured(profile, names, profile.default_arm, dtype, temperature)
        overall, _ = profile.measured_goodput(dtype, temperature)
        assert priors.overall == overall and set(priors.by_class) >= {"code", "chat", "doc"}
        assert priors.class_weights  # paired per-prompt figures


# --- calibration sources -------------------------------------------------------------------------

def fake_stdlib(tmp_path: Path, monkeypatch) -> Path:
    """A stdlib folder where ``pathlib`` is a package, as from Python 3.13 (its ``__init__.py``
    only imports its submodules), and ``fractions`` a module."""
    import sysconfig

    stdlib = tmp_path / "lib"
    (stdlib / "pathlib").mkdir(parents=True)
    (stdlib / "pathlib" / "__init__.py").write_text("from ._abc import *\nfrom ._local import *\n")
    (stdlib / "pathlib" / "_abc.py").write_text("def abstract():\n    pass\n")
    body = "".join(f"def f{i}(path):\n    return path.join('a', {i})\n\n" for i in range(40))
    (stdlib / "pathlib" / "_local.py").write_text(f"import os\n\n{body}")
    (stdlib / "fractions.py").write_text(
        "def fraction(a, b):\n" + "".join(f"    a += b * {i}\n" for i in range(20)))
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(stdlib)})
    return stdlib


class CharTokenizer:
    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(map(chr, ids))

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return self(messages[-1]["content"])["input_ids"]


def test_calibration_reads_a_module_that_became_a_package(tmp_path, monkeypatch):
    """``pathlib.py`` is a package from Python 3.13: its code prompt was skipped there."""
    from workers.search import calibration_prompts

    stdlib = fake_stdlib(tmp_path, monkeypatch)
    tokenizer = CharTokenizer()
    code = [tokenizer.decode(ids) for c, ids in calibration_prompts(tokenizer) if c == "code"]
    assert len(code) == 2 and "return path.join" in code[0]
    assert code[1].startswith("def fraction(a, b):")
    from workers.search import stdlib_source

    assert stdlib_source("pathlib.py") == stdlib / "pathlib" / "_local.py"
    assert stdlib_source("fractions.py") == stdlib / "fractions.py"
    assert stdlib_source("os.py") is None


def test_training_leaves_out_the_files_calibration_reads_on_this_python(tmp_path, monkeypatch):
    from workers.corpus import _stdlib_files, held_back_sources

    fake_stdlib(tmp_path, monkeypatch)
    held_back_sources.cache_clear()
    try:
        held = held_back_sources()
        assert "pathlib/_local.py" in held.stdlib and "pathlib" in held.modules
        assert not any(rel.startswith("pathlib/_local") for rel, _ in _stdlib_files(held))
    finally:
        monkeypatch.undo()
        held_back_sources.cache_clear()


# --- training ------------------------------------------------------------------------------------

def test_consistent_targets_follow_the_models_device():
    """The text's tokens and attach points are made on the CPU, the base model's choices on its
    device (here ``meta``, standing for a GPU): compared there."""
    from workers.train import consistent_targets, targets_for

    greedy = torch.tensor([6, 7, 0, 9, 10, 11, 0, 0], device="meta")
    attach = torch.tensor([0, 2, 3])
    got = consistent_targets(torch.tensor([5, 6, 7, 8, 9, 10, 11, 12]), greedy, attach, 3)
    assert got.device.type == "meta" and got.shape == (3, 3) and got.dtype == torch.bool
    assert targets_for(greedy, attach, 3).device.type == "meta"


def engine_of(bundled):
    from workers.engine import Engine, resolve_profile

    return Engine(bundled.loaded, bundled.runner, bundled.stops,
                  resolve_profile(None, bundled.loaded.fingerprint, 30))


# About 60 chunks of 32 tokens: training and its evaluations take a moment.
TEXT = Path(textwrap.__file__).read_text()[:8000]


@pytest.mark.model
def test_training_refuses_too_little_text_before_the_model_runs(bundled, tmp_path, monkeypatch):
    """No text at all, or too little to train on one chunk and hold another out, failed in
    ``torch.randint`` or on a missing accuracy; it is refused before the rollouts and the model's
    passes, naming the sources and the setting."""
    from workers import train as train_module
    from workers.corpus import TrainingDataError

    def evaluate(*args, **kwargs):
        raise AssertionError("the model ran (held-out figures or rollouts)")

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    monkeypatch.setattr(train_module, "load_rollouts", evaluate)
    for texts in ([], ["Only a few words."], [TEXT[:150]]):
        monkeypatch.setattr(train_module, "corpus_texts", lambda max_chars, texts=texts: texts)
        with pytest.raises(TrainingDataError,
                           match=r"max_chars 1234; found \d+ stdlib files, .*--max-chars"):
            train_module.train(engine_of(bundled), tmp_path / "a.safetensors", steps=1,
                               chunk_len=32, max_chars=1234, rollouts={"chat": 1},
                               progress=False, log=lambda m: None)


@pytest.mark.model
def test_training_files_survive_a_save_cut_short_and_an_unreadable_checkpoint_is_named(
        bundled, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from workers import train as train_module
    from workers.drafters.s3d import AdapterMismatchError, MaskAdapter
    from workers.train import CheckpointError

    monkeypatch.setattr(train_module, "corpus_texts", lambda max_chars: [TEXT])
    engine = engine_of(bundled)
    out = tmp_path / "adapter.safetensors"
    ckpt = out.with_suffix(".ckpt.pt")
    logged: list[str] = []
    kwargs = dict(gamma=2, rank=4, chunk_len=32, attach_per_chunk=2, eval_chunks=1,
                  eval_every=1, progress=False, log=logged.append)
    train_module.train(engine, out, steps=1, **kwargs)
    adapter, beside = out.read_bytes(), out.with_suffix(".json").read_text()
    # Killed while saving the checkpoint of step 2: step 1's stays, and resumes.
    with monkeypatch.context() as m:
        cut_short(m, torch, "save")
        with pytest.raises(Killed):
            train_module.train(engine, out, steps=2, **kwargs)
    assert torch.load(ckpt, weights_only=False)["step"] == 1
    # Killed while writing the adapter: the last one stays, with its history beside it.
    with monkeypatch.context() as m:
        cut_short(m, MaskAdapter, "save")
        with pytest.raises(Killed):
            train_module.train(engine, out, steps=2, **kwargs)
    assert out.read_bytes() == adapter and out.with_suffix(".json").read_text() == beside
    assert load_file(str(out))  # readable
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter.ckpt.pt", "adapter.json", "adapter.safetensors"]  # no half-written file left
    # A checkpoint that cannot be read is named, with the way out, before the data is prepared.
    logged.clear()
    ckpt.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError,
                       match=rf"{re.escape(str(ckpt))} cannot be read.*--no-resume") as err:
        train_module.train(engine, out, steps=3, **kwargs)
    assert isinstance(err.value, AdapterMismatchError)  # the CLI's usage error
    assert not any(line.startswith("corpus") for line in logged)
    torch.save({"step": 3}, ckpt)
    with pytest.raises(CheckpointError, match="lacks adapter, history, optimizer"):
        train_module.train(engine, out, steps=3, **kwargs)


# --- other files written whole -------------------------------------------------------------------

def test_a_profile_saved_over_itself_survives_a_write_cut_short(tmp_path, monkeypatch):
    """``s3d search --remeasure p.json --out p.json`` rewrites the profile it read."""
    path = tmp_path / "profile.json"
    first = Profile(model_fingerprint="m", default_arm="none", arms=[NONE_ARM])
    first.save(path)
    with monkeypatch.context() as m:
        cut_short(m, Path, "write_text", target=0)
        with pytest.raises(Killed):
            first.model_copy(update={"notes": {"measured": {}}}).save(path)
    assert Profile.load(path) == first
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]


def test_rollouts_kept_survive_a_write_cut_short(tmp_path, monkeypatch):
    from workers import corpus

    monkeypatch.setattr(corpus, "rollout_prompts", lambda tokenizer, kind, count: [[1, 2]] * count)
    monkeypatch.setattr(corpus, "rollouts", lambda engine, prompts, new_tokens, desc: [
        corpus.Sequence(p + [3, 4], first_attach=1) for p in prompts])
    engine = SimpleNamespace(tokenizer=None, loaded=SimpleNamespace(fingerprint="m"))
    path = tmp_path / "a.rollouts-chat.json"
    assert len(corpus.load_rollouts(engine, path, "chat", 1, 8, log=lambda m: None)) == 1
    with monkeypatch.context() as m:
        cut_short(m, Path, "write_text", target=0)
        with pytest.raises(Killed):
            corpus.load_rollouts(engine, path, "chat", 2, 8, log=lambda m: None)
    assert json.loads(path.read_text())["key"]["count"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_write_removes_the_temporaries_a_killed_writer_left(tmp_path):
    """A writer killed mid-write (SIGKILL: no cleanup runs) leaves its hidden temporary file;
    the next write of that file removes it once a day old, and leaves a younger one (another
    process may be writing it) and other files' alone."""
    import os

    from workers.files import STALE_TEMPORARY_S, write_text

    path = tmp_path / "ckpt[1].pt"  # a name with glob's brackets
    stale = tmp_path / ".ckpt[1].pt.4242.deadbeef.tmp"
    young = tmp_path / ".ckpt[1].pt.4243.cafe.tmp"
    other = tmp_path / ".ckpt1.pt.4242.deadbeef.tmp"
    for left in (stale, young, other):
        left.write_text("half a checkpoint")
    day_ago = time.time() - STALE_TEMPORARY_S - 60
    for old in (stale, other):
        os.utime(old, (day_ago, day_ago))
    write_text(path, "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, young.name, other.name])


def test_replacing_keeps_the_old_file_on_an_error_and_writes_with_the_usual_permissions(tmp_path):
    from workers.files import replacing, write_text

    path = tmp_path / "f.txt"
    write_text(path, "old")
    with pytest.raises(ValueError), replacing(path) as tmp:
        tmp.write_text("half")
        raise ValueError
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    write_text(path, "new")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.read_text() == "new" and path.stat().st_mode == plain.stat().st_mode
