"""S3D mask-token drafting: losslessness, adapter persistence, training, search."""

from collections import Counter

import pytest
import torch

from workers.arm import Arm
from workers.drafters.s3d import (
    BUNDLED_ADAPTER,
    AdapterMismatchError,
    MaskAdapter,
    merged_tree,
    per_position_candidates,
    per_position_tree,
)
from workers.engine import Generation
from workers.tree import DraftTree

pytestmark = pytest.mark.model


def random_adapter(runner, seed=0) -> MaskAdapter:
    """An untrained adapter with non-zero deltas: losslessness must not depend on training."""
    torch.manual_seed(seed)
    adapter = MaskAdapter(runner, gamma=3, rank=4)
    with torch.no_grad():
        for b in adapter.lora_b.values():
            b.normal_(0, 0.02)
    adapter.requires_grad_(False)
    return adapter


def test_frozen_adapter_adds_the_same_delta_in_float32_and_bfloat16(bundled):
    """At inference the delta lands in the draft rows only, in place; for bf16 outputs on CPU it
    is computed in float32 (faster there) and agrees with the float32 delta to bf16 rounding."""
    adapter = random_adapter(bundled.runner)
    group = bundled.runner.matmuls[0].o_group
    x, out = torch.randn(6, 576), torch.randn(6, 576)
    with torch.inference_mode():
        want = adapter.adjust(0, group, x, out.clone(), 2)
        got = adapter.adjust(0, group, x.bfloat16(), out.bfloat16(), 2)
    assert torch.equal(want[:2], out[:2]) and not torch.equal(want[2:], out[2:])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    assert torch.equal(got[:2], out[:2].bfloat16())


def test_frozen_adapter_adds_each_projections_own_delta_to_a_fused_group(bundled):
    """q, k and v come out of one product side by side; the frozen adapter's one pair of
    products over the group adds q's and v's own deltas (as trained, one projection at a time)
    to their columns and leaves k's, which has no adapter, as they were."""
    adapter = random_adapter(bundled.runner)
    group = bundled.runner.matmuls[3].qkv_group
    q_size, k_size, _ = group.sizes
    x, out = torch.randn(5, 576), torch.randn(5, sum(group.sizes))
    with torch.inference_mode():
        got = adapter.adjust(3, group, x, out.clone(), 1)
    with torch.no_grad():
        a, b = adapter.lora_a["3_q_proj"], adapter.lora_b["3_q_proj"]
        want_q = out[1:, :q_size] + x[1:] @ a.t() @ b.t() * adapter.scale
        a, b = adapter.lora_a["3_v_proj"], adapter.lora_b["3_v_proj"]
        want_v = out[1:, q_size + k_size:] + x[1:] @ a.t() @ b.t() * adapter.scale
    torch.testing.assert_close(got[1:, :q_size], want_q)
    torch.testing.assert_close(got[1:, q_size + k_size:], want_v)
    assert torch.equal(got[:, q_size:q_size + k_size], out[:, q_size:q_size + k_size])
    assert torch.equal(got[:1], out[:1])
    # Projections the adapter does not touch at all are returned as they are.
    gate_up = bundled.runner.matmuls[3].gate_up_group
    plain = torch.randn(5, sum(gate_up.sizes))
    with torch.inference_mode():
        assert torch.equal(adapter.adjust(3, gate_up, x, plain.clone(), 1), plain)


def paths(tree: DraftTree) -> list[list[int]]:
    """Root-to-leaf token paths of ``tree``."""
    children, toks, out = tree.children(), tree.tokens.tolist(), []

    def walk(row: int, prefix: list[int]) -> None:
        if not children[row] and prefix:
            out.append(prefix)
        for c in children[row]:
            walk(c + 1, prefix + [toks[c]])

    walk(0, [])
    return out


# Position 1: token 0 (p 0.84), 1 (0.11), 2; position 2: token 1 (0.67), 2 (0.24), 0.
LOGP = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]), -1)


def test_per_position_tree():
    tree = per_position_tree(LOGP, top_k=2, total=4)
    assert tree.tokens.tolist()[:2] == [0, 1]
    assert tree.depths().tolist()[0] == 1
    assert sorted(paths(tree)) == [[0, 1], [0, 2], [1]]
    assert paths(DraftTree.chain([4, 5])) == [[4, 5]]


def test_merged_tree_keeps_the_likeliest_nodes_of_branches_and_masks():
    import math

    masks = per_position_candidates(LOGP, top_k=2)  # scores 0: -0.17, 0-1: -0.58, 0-2: -1.58
    half = math.log(0.5)  # a branch's tokens: -0.69, -1.39, -2.08
    tree = merged_tree([[7, 8, 9]], masks, half, total=4)
    assert sorted(paths(tree)) == [[0, 1], [7, 8]]
    assert tree.tokens.tolist()[0] == 0  # best first: the masks' likeliest path gets masks
    # An unlikely branch gives way to the masks' candidates.
    assert sorted(paths(merged_tree([[7, 8, 9]], masks, math.log(0.1), total=4))) == [
        [0, 1], [0, 2], [1]]
    # A branch through mask nodes shares them, raising their score where it is better.
    tree = merged_tree([[0, 2, 5]], masks, half, total=5)
    assert sorted(paths(tree)) == [[0, 1], [0, 2, 5], [1]]
    assert len(tree) == 5 and tree.tokens.tolist().count(0) == 1
    # Without mask drafts (a step after one that ended without masks), the branches alone.
    assert paths(merged_tree([[4, 5], [6]], ([], [], [], []), half, total=8)) == [[4, 5], [6]]


@pytest.mark.parametrize("kind,depth,top_k,total,attach,vocab", [
    ("s3d", 3, 1, 3, 1, 0), ("s3d", 3, 2, 6, 3, 2048), ("s3d", 3, 2, 6, 7, 0),
    ("hybrid", 5, 2, 10, 2, 0)])
def test_fused_s3d_greedy_identical(bundled, kind, depth, top_k, total, attach, vocab):
    adapter = random_adapter(bundled.runner)
    arm = Arm(name=kind, drafter=kind, depth=depth, top_k=top_k, total_tokens=total,
              attach=attach, draft_vocab=vocab)
    bundled.accepted_if_identical(arm, 4, 32, adapter)


def test_hybrid_mask_fallback_is_lossless_and_spends_masks_only_without_ngram_drafts(
        bundled, monkeypatch):
    from workers.drafters.ngram import ngram_continuations
    from workers.drafters.s3d import S3DDrafter

    adapter = random_adapter(bundled.runner, seed=3)
    arm = Arm(name="hybrid", drafter="hybrid", depth=3, top_k=1, total_tokens=3, gamma=2,
              attach=1, mask_fallback=True)
    # Per step: did the n-gram drafter have branches (looked up independently; a request's
    # last token counts as having them: it drafts nothing), and did the verify forward carry
    # mask rows?
    steps: list[tuple[bool, bool]] = []
    propose, mask_groups = S3DDrafter.propose, S3DDrafter.mask_groups

    def recording_propose(self, ctx):
        found = ngram_continuations(ctx.tokens, arm.ngram_max, arm.ngram_min, arm.depth,
                                    max_branches=2)
        steps.append((bool(found) or ctx.max_depth < 1, False))
        return propose(self, ctx)

    def recording_mask_groups(self, tree):
        groups = mask_groups(self, tree)
        steps[-1] = (steps[-1][0], groups is not None)
        return groups

    monkeypatch.setattr(S3DDrafter, "propose", recording_propose)
    monkeypatch.setattr(S3DDrafter, "mask_groups", recording_mask_groups)
    assert bundled.accepted_if_identical(arm, 4, 32, adapter) > 0
    assert all(masks == (not ngram) for ngram, masks in steps)
    assert any(masks for _, masks in steps) and any(ngram for ngram, _ in steps)
    with pytest.raises(ValueError, match="hybrid drafter setting"):
        Arm(name="s3d", drafter="s3d", mask_fallback=True)


@pytest.mark.parametrize("skip,depth,top_k,total,vocab", [
    ((), 4, 1, 4, 0), (tuple(range(12, 18)), 4, 2, 8, 0), (tuple(range(8, 14)), 3, 3, 6, 4096)])
def test_separate_pass_s3d_greedy_identical(bundled, skip, depth, top_k, total, vocab):
    adapter = random_adapter(bundled.runner, seed=5)
    adapter.metadata = {"skip_layers": list(skip)}
    arm = Arm(name="s3d_skip", drafter="s3d_skip", skip_layers=skip, depth=depth, top_k=top_k,
              total_tokens=total, draft_vocab=vocab)
    # the root row alone (skipped model, no adapter) drafts usable tokens
    assert bundled.accepted_if_identical(arm, 4, 32, adapter) > 0


def test_the_last_token_runs_no_draft_pass_and_no_mask_rows(bundled, monkeypatch):
    """A request's last step commits one token: a separate S3D pass, or fused mask rows that
    draft for a next step, are work thrown away (the step's forward passes counted them)."""
    from workers.engine import Generation as Gen

    adapter = random_adapter(bundled.runner, seed=5)
    seen: list[tuple[bool, int]] = []  # per last step: mask rows verified, forward passes
    step = Gen.step

    def spy(self):
        last = bool(self.output) and self.max_tokens - len(self.output) == 1
        forwards = self.runner.num_forwards
        committed = step(self)
        if last and self.arm.drafter != "none":  # (not plain decoding's reference runs)
            seen.append((getattr(self.drafter, "masks_this_step", False),
                         self.runner.num_forwards - forwards))
        return committed

    monkeypatch.setattr(Gen, "step", spy)
    for arm, meta in ((Arm(name="s3d", drafter="s3d", depth=3, top_k=2, total_tokens=6), []),
                      (Arm(name="hybrid", drafter="hybrid", depth=3, top_k=2,
                           total_tokens=6), []),
                      (Arm(name="s3d_skip", drafter="s3d_skip", skip_layers=(12, 13),
                           depth=3), [12, 13])):
        adapter.metadata = {"skip_layers": meta}
        seen.clear()
        for index in range(3):  # max_tokens 2: the step after the prompt's is the last
            gen = bundled.generate(bundled.prompts[index], 2, arm, adapter=adapter)
            assert gen.output == bundled.vanilla(index, 2)
        assert seen == [(False, 1)] * 3, (arm.name, seen)


def test_separate_pass_refuses_an_adapter_for_another_skip_set(bundled):
    adapter = random_adapter(bundled.runner)
    adapter.metadata = {"skip_layers": []}
    arm = Arm(name="s3d_skip", drafter="s3d_skip", skip_layers=(12, 13))
    with pytest.raises(AdapterMismatchError, match="skip set"):
        Generation(bundled.runner, bundled.prompts[0], 4, arm, stop_token_ids=bundled.stops,
                   adapter_for=lambda a: adapter)


def test_bundled_adapter_lossless_and_drafting(bundled):
    if not BUNDLED_ADAPTER.exists():
        pytest.fail(f"the committed adapter {BUNDLED_ADAPTER} is missing")
    adapter = MaskAdapter.load(BUNDLED_ADAPTER, bundled.runner, bundled.loaded.fingerprint)
    meta = adapter.metadata
    assert meta["parameter_fraction"] <= 0.02
    assert meta["expected_accepted_after"] > meta["expected_accepted_before"]
    arm = Arm(name="s3d", drafter="s3d", depth=3, top_k=2, total_tokens=6, attach=3)
    assert bundled.accepted_if_identical(arm, 10, 64, adapter) > 0


def test_fused_drafts_come_from_the_verify_forwards_own_mask_rows(bundled, monkeypatch):
    """The mask rows' logits come out of the verify's output-layer product, over the whole
    vocabulary, and ``draft_vocab`` narrows the drafts' choice after it. With the committed
    adapter in the committed arm's shape, the drafts taken from them are accepted far more often
    than tokens taken from the wrong rows would be (the verify rows predict the token before)."""
    from workers.drafters.s3d import S3DDrafter

    adapter = MaskAdapter.load(BUNDLED_ADAPTER, bundled.runner, bundled.loaded.fingerprint)
    shapes: list[tuple[int, ...]] = []
    drafted: list[int] = []
    after_verify, propose = S3DDrafter.after_verify, S3DDrafter.propose

    def recording_after_verify(self, groups, mask_logits, accepted_row):
        shapes.append(tuple(mask_logits.shape))
        return after_verify(self, groups, mask_logits, accepted_row)

    def recording_propose(self, ctx):
        tree = propose(self, ctx)
        drafted.extend(tree.tokens.tolist())
        return tree

    monkeypatch.setattr(S3DDrafter, "after_verify", recording_after_verify)
    monkeypatch.setattr(S3DDrafter, "propose", recording_propose)
    arm = Arm(name="s3d", drafter="s3d", depth=1, top_k=1, total_tokens=1, gamma=1, attach=2)
    steps = accepted = 0
    for index in range(4):
        gen = bundled.generate(bundled.prompts[index], 32, arm, adapter=adapter)
        assert gen.output == bundled.vanilla(index, 32), f"prompt {index}"
        steps += gen.stats.num_spec_steps
        accepted += gen.stats.num_accepted_tokens
    # one mask row after each attach row: the root alone on a step without a draft, else the
    # root and the drafted token
    assert shapes and all(shape[1] == bundled.runner.vocab_size for shape in shapes)
    assert {shape[0] for shape in shapes} == {1, 2}
    assert accepted / steps > 0.2, (accepted, steps)
    drafted.clear()
    narrow = arm.model_copy(update={"draft_vocab": 1000})
    bundled.accepted_if_identical(narrow, 2, 32, adapter)  # asserts outputs equal plain decoding
    assert drafted and max(drafted) < 1000


def test_masks_after_every_row_leave_no_step_without_drafts(bundled, monkeypatch):
    """With as many attach points as verify rows, the accepted path always ends at a row with
    masks, so every step after the first verifies a full draft tree, wherever in the tree (off
    the principal path too) the previous step's acceptance stopped; with masks after the principal
    rows only, a step whose path ends off them drafts nothing."""
    from workers.drafters.s3d import S3DDrafter

    adapter = MaskAdapter.load(BUNDLED_ADAPTER, bundled.runner, bundled.loaded.fingerprint)
    sizes: list[int] = []
    ends_off_principal: list[bool] = []
    propose, after_verify = S3DDrafter.propose, S3DDrafter.after_verify

    def recording_propose(self, ctx):
        tree = propose(self, ctx)
        if ctx.max_depth >= 1:  # (a request's last token drafts nothing)
            sizes.append(len(tree))
        self.last_tree = tree
        return tree

    def recording_after_verify(self, groups, mask_logits, accepted_row):
        ends_off_principal.append(accepted_row not in self.last_tree.principal_rows())
        return after_verify(self, groups, mask_logits, accepted_row)

    monkeypatch.setattr(S3DDrafter, "propose", recording_propose)
    monkeypatch.setattr(S3DDrafter, "after_verify", recording_after_verify)
    every = Arm(name="s3d", drafter="s3d", depth=2, top_k=2, total_tokens=4, gamma=2, attach=5)
    for index in range(3):
        sizes.clear()
        gen = bundled.generate(bundled.prompts[index], 32, every, adapter=adapter)
        assert gen.output == bundled.vanilla(index, 32), f"prompt {index}"
        assert sizes[0] == 0 and all(size == 4 for size in sizes[1:]), sizes
    assert any(ends_off_principal), "no step ended off the principal path: nothing was tested"
    sizes.clear()
    principal_only = every.model_copy(update={"attach": 3})
    for index in range(3):
        bundled.generate(bundled.prompts[index], 32, principal_only, adapter=adapter)
    assert 0 in sizes[1:]


def test_adapter_round_trip_and_refusal(bundled, tmp_path):
    adapter = random_adapter(bundled.runner, seed=3)
    path = tmp_path / "a.safetensors"
    adapter.save(path, {"model_fingerprint": bundled.loaded.fingerprint})
    loaded = MaskAdapter.load(path, bundled.runner, bundled.loaded.fingerprint)
    for key, value in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert loaded.metadata["gamma"] == 3
    with pytest.raises(AdapterMismatchError):
        MaskAdapter.load(path, bundled.runner, "another-model")


@pytest.mark.parametrize("skip", [(), tuple(range(10, 16))])
def test_training_lowers_draft_loss(bundled, skip):
    from workers.train import mask_forward, sample_attach, targets_for

    class EngineView:
        runner = bundled.runner

    torch.manual_seed(0)
    bundled.loaded.model.requires_grad_(False)
    layers = [i for i in range(30) if i not in skip] if skip else None
    adapter = MaskAdapter(bundled.runner, gamma=3, rank=8, layers=layers)
    chunk = bundled.prompts[0][:96]
    attach = sample_attach(len(chunk), 3, 16, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(adapter.parameters(), lr=5e-3)
    losses = []
    for _ in range(8):
        logits, greedy = mask_forward(EngineView, adapter, chunk, attach, layers)
        target = targets_for(greedy, attach, 3)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is None for p in bundled.loaded.model.parameters())  # base stays frozen


def test_consistent_targets_follow_the_base_models_own_choices():
    from workers.train import consistent_targets

    chunk = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])
    # The base model's next-token choices: it agrees with the text after positions 0, 1, 3-5.
    greedy = torch.tensor([6, 7, 0, 9, 10, 11, 0, 0])
    got = consistent_targets(chunk, greedy, torch.tensor([0, 2, 3]), 3)
    assert got.tolist() == [[True, True, False],  # the text leaves the base's path at 3
                            [False, False, False],  # at once: 8 follows 7, the base chose 0
                            [True, True, True]]


def test_learning_rate_follows_the_cosine_and_warms_up_a_run_that_starts_mid_schedule():
    from workers.train import learning_rate

    assert learning_rate(1.0, 0, 100) == pytest.approx(1.0)
    assert learning_rate(1.0, 50, 100) == pytest.approx(0.55)
    assert learning_rate(1.0, 100, 100) == learning_rate(1.0, 150, 100) == pytest.approx(0.1)
    # A run started at step 50 with 10 warm-up steps: a tenth of the schedule's rate at its
    # first step, all of it from its tenth on.
    assert learning_rate(1.0, 50, 100, 0, 10) == pytest.approx(0.055)
    assert learning_rate(1.0, 59, 100, 9, 10) == pytest.approx(learning_rate(1.0, 59, 100))
    assert learning_rate(1.0, 70, 100, 20, 10) == learning_rate(1.0, 70, 100)


def test_train_on_rollouts_writes_an_adapter_and_resumes(bundled, tmp_path):
    import json

    from workers.corpus import rollouts_path
    from workers.engine import Engine, resolve_profile
    from workers.train import train

    engine = Engine(bundled.loaded, bundled.runner, bundled.stops,
                    resolve_profile(None, bundled.loaded.fingerprint, 30))
    out = tmp_path / "adapter.safetensors"
    kwargs = dict(gamma=2, rank=4, eval_every=1, eval_chunks=1, rollout_tokens=10,
                  max_chars=20_000, attach_per_chunk=4, progress=False, log=lambda m: None)
    meta = train(engine, out, steps=2, rollouts={"chat": 2, "code": 2}, **kwargs)
    written = {}
    for kind in ("chat", "code"):
        path = rollouts_path(out, kind)
        sequences = json.loads(path.read_text())["sequences"]
        assert len(sequences) == 2
        for seq in sequences:  # each answer is the base model's own greedy continuation
            split = seq["first_attach"] + 1
            prompt, answer = seq["tokens"][:split], seq["tokens"][split:]
            assert 0 < len(answer) <= 10
            assert answer == bundled.generate(prompt, len(answer)).output
        written[kind] = path.stat().st_mtime_ns
        assert len(meta[f"accuracy_{kind}_after"]) == 2
    assert meta["steps"] == 2 and "2 chat requests" not in meta["data"]  # one of 2 held out
    assert "1 chat requests, 1 code requests" in meta["data"]
    MaskAdapter.load(out, bundled.runner, bundled.loaded.fingerprint)
    meta = train(engine, out, steps=3, rollouts={"chat": 2, "code": 2}, warmup=5,
                 **kwargs)  # resumes
    assert meta["steps"] == 3 and meta["warmup"] == 5
    assert all(rollouts_path(out, k).stat().st_mtime_ns == t for k, t in written.items())
    history = json.loads(out.with_suffix(".json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    assert all(h["targets"] == "consistent" and "accuracy_code" in h for h in history)
    # New data: the resumed adapter is measured again on this run's held-out sets.
    meta = train(engine, out, steps=4, rollouts={"chat": 2, "code": 2, "summary": 2}, **kwargs)
    history = json.loads(out.with_suffix(".json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 1, 2, 3, 3, 4]
    assert history[4]["resumed"] and "accuracy_summary" in history[4]
    assert history[4]["held_out"] != history[3]["held_out"] == history[0]["held_out"]
    # "Before" is the untrained adapter on this run's held-out sets, summary included.
    untrained = history[4]["untrained"]
    assert meta["accuracy_summary_before"] == [round(a, 4) for a in untrained["accuracy_summary"]]
    assert meta["accuracy_before"] == [round(a, 4) for a in untrained["accuracy"]]
    # Another machine has the adapter file but not its checkpoint: --init continues from it.
    rollouts = {"chat": 2, "code": 2, "summary": 2}
    for kind in rollouts:  # (the rollouts would be generated again, the same greedy answers)
        rollouts_path(tmp_path / "b.safetensors", kind).write_text(
            rollouts_path(out, kind).read_text())
    copy = train(engine, tmp_path / "b.safetensors", steps=4, init=out, rollouts=rollouts,
                 **kwargs)
    assert copy["steps"] == 4  # nothing left to train: the same weights, written anew
    first = MaskAdapter.load(out, bundled.runner, bundled.loaded.fingerprint).state_dict()
    again = MaskAdapter.load(tmp_path / "b.safetensors", bundled.runner,
                             bundled.loaded.fingerprint).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    train(engine, tmp_path / "b.safetensors", steps=5, init=out, resume=False,
          rollouts=rollouts, **kwargs)
    history = json.loads((tmp_path / "b.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 1, 2, 3, 3, 4, 5]
    bare = tmp_path / "bare.safetensors"  # an adapter file with no history beside it
    bare.write_bytes(out.read_bytes())
    alone = train(engine, tmp_path / "e.safetensors", steps=5, init=bare, rollouts=rollouts,
                  **kwargs)
    assert alone["steps"] == 5
    assert [h["step"] for h in json.loads((tmp_path / "e.json").read_text())["history"]] == [
        0, 4, 5]
    with pytest.raises(AdapterMismatchError, match="rank"):
        train(engine, tmp_path / "c.safetensors", steps=5, init=out,
              rollouts=rollouts, **{**kwargs, "rank": 8})


def test_training_refuses_a_checkpoint_of_another_model_or_shape(bundled, tmp_path):
    """A checkpoint resumed with another gamma trained silently on (the mask embedding's size
    does not depend on it), one of another model too; each is refused before any data is
    prepared, old checkpoints by their weights' sizes."""
    from workers.engine import Engine, resolve_profile
    from workers.train import train

    engine = Engine(bundled.loaded, bundled.runner, bundled.stops,
                    resolve_profile(None, bundled.loaded.fingerprint, 30))
    out = tmp_path / "adapter.safetensors"
    logged: list[str] = []
    kwargs = dict(eval_every=1000, eval_chunks=1, max_chars=20_000, attach_per_chunk=4,
                  progress=False, log=logged.append)
    train(engine, out, steps=1, gamma=2, rank=4, **kwargs)
    ckpt = out.with_suffix(".ckpt.pt")
    state = torch.load(ckpt, weights_only=False)
    assert state["fingerprint"] == bundled.loaded.fingerprint
    logged.clear()
    with pytest.raises(AdapterMismatchError, match="gamma.*--no-resume"):
        train(engine, out, steps=2, gamma=3, rank=4, **kwargs)
    with pytest.raises(AdapterMismatchError, match="gamma"):
        train(engine, out, steps=2, gamma=2, rank=8, **kwargs)
    assert not any(m.startswith("corpus") for m in logged)  # refused before the data
    torch.save({**state, "fingerprint": "another-model"}, ckpt)
    with pytest.raises(AdapterMismatchError, match="another-model"):
        train(engine, out, steps=2, gamma=2, rank=4, **kwargs)
    old = {k: v for k, v in state.items() if k not in ("shape", "fingerprint")}
    torch.save(old, ckpt)
    with pytest.raises(AdapterMismatchError, match="another rank"):
        train(engine, out, steps=2, gamma=2, rank=8, **kwargs)
    assert train(engine, out, steps=2, gamma=2, rank=4, **kwargs)["steps"] == 2  # resumes
    # Without resuming, another shape starts afresh.
    train(engine, out, steps=1, gamma=3, rank=4, resume=False, **kwargs)
    assert MaskAdapter.load(out, bundled.runner, bundled.loaded.fingerprint).gamma == 3


def test_training_stopped_by_its_deadline_keeps_its_steps(bundled, tmp_path, monkeypatch):
    """Stopped by its deadline between evaluations, training once lost every step since the
    last one (only evaluations saved the checkpoint); a sequence with no attach point skipped
    its step's evaluation and checkpoint too."""
    import json
    import time as time_module

    from workers import train as train_module
    from workers.engine import Engine, resolve_profile

    engine = Engine(bundled.loaded, bundled.runner, bundled.stops,
                    resolve_profile(None, bundled.loaded.fingerprint, 30))
    out = tmp_path / "adapter.safetensors"
    clock = {"now": 1000.0}

    def time():  # each reading a second later: a 30-second deadline stops it within steps
        clock["now"] += 1.0
        return clock["now"]

    monkeypatch.setattr(time_module, "time", time)
    real = train_module.sample_attach
    calls = {"n": 0}

    def sample_attach(*args, **kwargs):
        calls["n"] += 1
        attach = real(*args, **kwargs)
        return attach[:0] if calls["n"] == 2 else attach

    monkeypatch.setattr(train_module, "sample_attach", sample_attach)
    meta = train_module.train(engine, out, steps=100, minutes=0.5, gamma=2, rank=4,
                              eval_every=1000, eval_chunks=1, max_chars=20_000,
                              attach_per_chunk=4, progress=False, log=lambda m: None)
    assert 2 <= meta["steps"] < 100
    history = json.loads(out.with_suffix(".json").read_text())["history"]
    assert history[-1]["step"] == meta["steps"]
    checkpoint = torch.load(out.with_suffix(".ckpt.pt"), weights_only=False)
    assert checkpoint["step"] == meta["steps"]


def test_held_out_items_are_the_first_of_every_tenth_and_the_rest_train():
    from workers.corpus import HELD_OUT_EVERY, split_held_out

    train_items, held = split_held_out(list(range(100)), 2)
    assert held == [0, HELD_OUT_EVERY]
    assert len(train_items) == 98 and set(train_items) | set(held) == set(range(100))


def test_training_data_leaves_out_what_the_benchmark_and_search_decode():
    from workers.corpus import (
        chat_requests,
        code_requests,
        corpus_texts,
        held_back_sources,
        summary_requests,
    )
    from workers.prompts import load_prompts

    held = held_back_sources()
    suite = load_prompts()
    assert {"textwrap.py", "json/encoder.py", "os.py"} <= held.stdlib and "grep" in held.debian
    def words(text: str) -> str:
        return " ".join(text.split())

    texts = [words(t) for t in corpus_texts(max_chars=10**9, sources=("stdlib", "debian"))]
    # Every benchmark prompt's opening text (a function's first lines, a passage to summarise)
    # is absent from the training text and from every rollout request.
    needles = [words(p.prompt or p.messages[-1]["content"].split("\n\n", 1)[-1])[:60]
               for p in suite]
    requests = [words(r) for r in [m[0]["content"] for m in chat_requests(10**6)
                                   + summary_requests(10**6)] + code_requests(10**6)]
    for needle in needles:
        assert not any(needle in t for t in texts + requests), needle
    assert not any("heapq" in m[0]["content"] for m in chat_requests(10**6))
    # General questions and questions about packages and modules take turns; the search's
    # calibration questions are none of them.
    from workers.corpus import general_questions
    from workers.search import CALIBRATION_QUESTIONS

    general = set(general_questions())
    first = [m[0]["content"] for m in chat_requests(100)]
    assert sum(q in general for q in first) == 50 and len(set(first)) == 100
    asked = {m[0]["content"] for m in chat_requests(10**6)}
    assert general <= asked and not asked & set(CALIBRATION_QUESTIONS)


def test_calibration_prompts_cover_the_routers_classes(bundled):
    from workers.search import calibration_prompts

    prompts = calibration_prompts(bundled.loaded.tokenizer)
    classes = Counter(prompt_class for prompt_class, _ in prompts)
    # Each prompt carries the class the router gives it: stdlib code (a function's surroundings,
    # at least 150 tokens, or a function's first lines from its ``def``), short chat questions,
    # and docstrings to summarise.
    assert classes == {"code": 10, "chat": 8, "doc": 6}
    code = [ids for prompt_class, ids in prompts if prompt_class == "code"]
    assert all(len(ids) >= 150 for ids in code[:5])
    starts = [bundled.loaded.tokenizer.decode(ids).lstrip() for ids in code[5:]]
    assert all(s.startswith(("def ", "@")) and s.count("\n") == 16 for s in starts), starts


def test_search_returns_valid_arms(bundled):
    from workers.engine import Engine, resolve_profile
    from workers.search import search

    engine = Engine(bundled.loaded, bundled.runner, bundled.stops,
                    resolve_profile(None, bundled.loaded.fingerprint, 30))
    profile = search(engine, max_tokens=8, finalists=1, lengths=(4,), max_prompts=2, trials=3,
                     trial_prompts=2, log=lambda m: None)
    names = [a.name for a in profile.arms]
    assert "none" in names and "skip_chain" in names and "ngram_tree" in names
    assert profile.default_arm in names
    for arm in profile.arms:
        if arm.drafter.startswith("skip"):
            assert arm.skip_layers and all(0 < i < 29 for i in arm.skip_layers)
    assert profile.model_fingerprint == bundled.loaded.fingerprint
    trials = profile.notes["trials"]
    assert trials and all(t["tokens_per_s"] > 0 for t in trials)
    assert [t["tokens_per_s"] for t in trials] == sorted((t["tokens_per_s"] for t in trials),
                                                         reverse=True)
    overall, by_class = profile.measured_goodput()
    assert set(overall) == set(names) and set(by_class["code"]) == set(names)
    chain = next(a for a in profile.arms if a.drafter == "skip_chain")
    assert list(chain.skip_layers) in [t["skip"] for t in trials]
    assert profile.notes["calibration_prompts"] == {"code": 2}
    assert profile.notes["prior_weight"] == 2
    per_prompt = profile.measured_per_prompt()  # every arm on the same two prompts, in order
    assert set(per_prompt) == {"code"} and set(per_prompt["code"]) == set(names)
    assert all(len(v) == 2 and min(v) > 0 for v in per_prompt["code"].values())


def test_remeasure_keeps_the_arms_and_renews_the_figures(bundled):
    from workers.arm import NONE_ARM, Arm, Profile
    from workers.engine import Engine
    from workers.search import remeasure

    ngram = Arm(name="ngram_tree", drafter="ngram_tree", depth=4, top_k=2, total_tokens=6)
    old = Profile(model_fingerprint=bundled.loaded.fingerprint, default_arm="none",
                  arms=[NONE_ARM, ngram], notes={"method": "by hand", "measured": {
                      "none": {"tokens_per_s": 1.0}, "ngram_tree": {"tokens_per_s": 2.0}}})
    engine = Engine(bundled.loaded, bundled.runner, bundled.stops, old)
    new = remeasure(engine, old, max_tokens=6, max_prompts=2, log=lambda m: None)
    assert new.arms == old.arms and new.notes["method"] == "by hand"
    # Where it was measured: the weights' quantization and the pool drafted from, too.
    assert new.notes["quantization"] == "none"
    assert new.notes["pool_tokens"] == len(engine.pool)
    measured = new.notes["measured"]
    assert set(measured) == {"none", "ngram_tree"}
    assert all(m["tokens_per_s"] > 2.0 for m in measured.values())  # real figures, not 1 and 2
    assert new.default_arm == max(measured, key=lambda k: measured[k]["tokens_per_s"])
    # A profile measured in another dtype keeps its figures; these go beside them.
    other = old.model_copy(update={"notes": {**old.notes, "dtype": "bfloat16"}})
    kept = remeasure(engine, other, max_tokens=6, max_prompts=2, log=lambda m: None)
    assert kept.notes["measured"] == old.notes["measured"] and kept.default_arm == "none"
    assert kept.measurement("float32")["dtype"] == "float32"
    assert set(kept.measured_goodput("float32")[0]) == {"none", "ngram_tree"}
    assert kept.measured_goodput("bfloat16")[0] == {"none": 1.0, "ngram_tree": 2.0}


def test_sampled_remeasure_goes_beside_the_greedy_figures(bundled, monkeypatch):
    from workers.arm import NONE_ARM, Arm, Profile
    from workers.engine import Engine
    from workers.search import remeasure

    ngram = Arm(name="ngram_tree", drafter="ngram_tree", depth=4, top_k=2, total_tokens=6)
    old = Profile(model_fingerprint=bundled.loaded.fingerprint, default_arm="none",
                  arms=[NONE_ARM, ngram], notes={"method": "by hand", "dtype": "float32",
                                                 "measured": {"none": {"tokens_per_s": 1.0},
                                                              "ngram_tree": {"tokens_per_s": 2.0}}})
    engine = Engine(bundled.loaded, bundled.runner, bundled.stops, old)
    seen = []
    generation = engine.generation

    def spy(prompt, max_tokens, arm=None, params=None, *args, **kwargs):
        seen.append((arm.name, params, max_tokens))
        return generation(prompt, max_tokens, arm, params, *args, **kwargs)

    monkeypatch.setattr(engine, "generation", spy)
    hot = remeasure(engine, old, max_tokens=6, max_prompts=2, log=lambda m: None,
                    temperature=1.0)
    # Every arm decoded each prompt sampled, with that prompt's seed (after a few untimed tokens
    # of the first prompt).
    warm, timed = seen[:2], seen[2:]
    assert sorted((name, p.temperature, p.seed) for name, p, _ in warm) == [
        ("ngram_tree", 1.0, 0), ("none", 1.0, 0)] and all(n < 6 for *_, n in warm)
    assert sorted((name, p.temperature, p.seed, n) for name, p, n in timed) == [
        ("ngram_tree", 1.0, 0, 6), ("ngram_tree", 1.0, 1, 6), ("none", 1.0, 0, 6),
        ("none", 1.0, 1, 6)]
    assert hot.default_arm == "none" and hot.notes["measured"] == old.notes["measured"]
    sampled = hot.sampled_measurements("float32")
    assert set(sampled) == {"thi"} and sampled["thi"]["temperature"] == 1.0
    assert all(m["tokens_per_s"] > 2.0 and len(m["per_prompt"]) == 2
               for m in sampled["thi"]["measured"].values())
    assert hot.measured_goodput("float32", "thi")[0] == {
        arm: m["tokens_per_s"] for arm, m in sampled["thi"]["measured"].items()}
    assert hot.measured_goodput("float32", "tlo")[0] == {"none": 1.0, "ngram_tree": 2.0}
    # Another temperature bucket goes beside it.
    warm = remeasure(engine, hot, max_tokens=6, max_prompts=1, log=lambda m: None,
                     temperature=0.5)
    assert set(warm.sampled_measurements("float32")) == {"thi", "tlo"}


def test_search_can_reuse_a_profiles_skip_sets_and_search_only_the_arms(bundled):
    from workers.arm import NONE_ARM, Profile
    from workers.engine import Engine
    from workers.search import REUSED, search

    trials = [{"skip": [6, 7], "tokens_per_s": 9.0, "mean_accepted_length": 2.0},
              {"skip": [3, 4, 6, 7], "tokens_per_s": 8.0, "mean_accepted_length": 1.5}]
    old = Profile(model_fingerprint=bundled.loaded.fingerprint, default_arm="none",
                  arms=[NONE_ARM], notes={"method": "by hand", "trials": trials})
    engine = Engine(bundled.loaded, bundled.runner, bundled.stops, old)
    lines: list[str] = []
    new = search(engine, max_tokens=6, finalists=1, max_prompts=2, skip_sets_from=old,
                 log=lines.append)
    assert not any(line.startswith(("skip ", "trial ")) for line in lines)  # stages 1-2 skipped
    layer_skip = [a for a in new.arms if a.drafter in ("skip_chain", "skip_tree")]
    assert layer_skip and all(a.skip_layers == (6, 7) for a in layer_skip)
    assert new.notes["trials"] == trials
    assert new.notes["method"] == "by hand" + REUSED
    # The fused mask drafter's arm is `s3d_fused`; `s3d` names the faster of it and `s3d_skip`.
    assert [a.name for a in new.arms if a.drafter in ("s3d", "s3d_skip")] == ["s3d_fused",
                                                                              "s3d_skip"]
    assert new.fastest(("s3d", "s3d_skip")) in {"s3d_fused", "s3d_skip"}
    # Hybrids: the fastest that merges n-gram branches into the mask tree, and the fastest whose
    # masks fill in for missing n-gram drafts; only the first drafts with S3D on every step.
    hybrids = {a.name: a for a in new.arms if a.drafter == "hybrid"}
    assert set(hybrids) == {"hybrid", "hybrid_merged"}
    assert hybrids["hybrid"].mask_fallback and not hybrids["hybrid"].drafts_s3d
    assert not hybrids["hybrid_merged"].mask_fallback and hybrids["hybrid_merged"].drafts_s3d
    assert new.fastest(lambda a: a.drafts_s3d) in {"s3d_fused", "s3d_skip", "hybrid_merged"}
    with pytest.raises(ValueError, match="no search trials"):
        search(engine, max_tokens=6, max_prompts=2, log=lambda m: None,
               skip_sets_from=old.model_copy(update={"notes": {}}))
    # Another model's profile, or layers this model has not, are refused before any stage.
    with pytest.raises(ValueError, match="made for model other"):
        search(engine, max_tokens=6, max_prompts=2, log=lambda m: None,
               skip_sets_from=old.model_copy(update={"model_fingerprint": "other"}))
    deep = old.model_copy(update={"notes": {"trials": [{"skip": [6, 40]}]}})
    with pytest.raises(ValueError, match=r"skips layers \[40\]"):
        search(engine, max_tokens=6, max_prompts=2, log=lambda m: None, skip_sets_from=deep)
    # One kind searched again: the other arms stay exactly as they were, all measured together.
    lines.clear()
    again = search(engine, max_tokens=6, finalists=1, max_prompts=2, skip_sets_from=new,
                   kinds=("ngram_tree",), log=lines.append)
    assert [a for a in again.arms if a.drafter != "ngram_tree"] == \
        [a for a in new.arms if a.drafter != "ngram_tree"]
    assert [a.name for a in again.arms if a.drafter == "ngram_tree"] == ["ngram_tree"]
    assert not any(line.startswith(("skip_chain ", "hybrid ", "hybrid_merged ", "s3d_fused "))
                   for line in lines)
    assert sum(line.startswith("ngram_tree ") for line in lines) >= 2  # its variants, measured
    assert set(again.notes["measured"]) == {a.name for a in again.arms}
    assert again.notes["method"].endswith("; ngram_tree searched again alone")


def test_searching_some_kinds_alone_needs_known_kinds_and_a_profile():
    from workers.search import check_kinds

    check_kinds(None, reusing=False)
    check_kinds(("hybrid", "s3d"), reusing=True)
    with pytest.raises(ValueError, match="give the profile"):
        check_kinds(("hybrid",), reusing=False)
    for wrong in (("hybird",), ("none",), ("",)):
        with pytest.raises(ValueError, match="not drafter kinds.*the kinds: skip_chain"):
            check_kinds(wrong, reusing=True)


def test_a_variant_much_faster_on_one_class_joins_as_that_classs_specialist():
    """The kind's best overall stays its arm; a variant 10% faster on one class than that arm
    (same measurement) becomes ``<arm>_<class>``, and it stays in the profile only if it leads
    its class beside every chosen arm."""
    from workers.arm import NONE_ARM, Arm
    from workers.search import class_leaders, specialist_candidates

    shallow, mid, deep = (Arm(name="hybrid", drafter="hybrid", depth=d, total_tokens=d)
                          for d in (3, 5, 8))
    figs = [{"by_class": {"code": 60.0, "chat": 43.0}},
            {"by_class": {"code": 65.0, "chat": 42.0}},   # better on code, by less than 10%
            {"by_class": {"code": 74.0, "chat": 41.0}}]
    found = specialist_candidates([shallow, mid, deep], figs, shallow)
    assert list(found.values()) == ["code"]
    (code_arm,) = found
    assert code_arm.name == "hybrid_code" and code_arm.depth == 8
    # Best on chat is the chosen arm itself: no chat specialist; a 9% lead is not enough.
    assert not specialist_candidates([shallow, mid], figs[:2], shallow)
    arms = [NONE_ARM, shallow, code_arm]
    leads = [{"by_class": {"code": 33.0}}, {"by_class": {"code": 60.0}},
             {"by_class": {"code": 70.0}}]
    assert class_leaders(arms, leads, found) == arms
    trails = [{"by_class": {"code": 33.0}}, {"by_class": {"code": 71.0}},
              {"by_class": {"code": 70.0}}]
    assert class_leaders(arms, trails, found) == [NONE_ARM, shallow]


def test_interleaved_measurement_pairs_arms_prompt_by_prompt():
    """Every arm decodes a prompt before the next prompt starts, the order rotating, each from
    the same frozen pool, and each arm's figures are its own (here: an arm's output length is its
    depth, and it commits three times that in one step on even prompts, in three steps on odd ones:
    the mean accepted length is pooled over all steps, as the benchmark counts it)."""
    from types import SimpleNamespace

    from workers.arm import Arm
    from workers.pool import TokenPool
    from workers.search import measure_interleaved
    from workers.stats import SpecDecodeStats

    order, pools = [], set()

    class Engine:
        pool = TokenPool()

        def generation(self, ids, max_tokens, arm, params=None, pool=None):
            def run():
                order.append((ids[0], arm.name))
                pools.add(pool)
                gen.output = [0] * arm.depth

            steps = 1 if ids[0] % 2 == 0 else 3
            gen = SimpleNamespace(run=run, output=[], stats=SpecDecodeStats(
                num_spec_steps=steps, num_accepted_tokens=3 * arm.depth - steps))
            return gen

    arms = [Arm(name=f"a{d}", drafter="ngram_tree", depth=d) for d in (1, 2, 3)]
    prompts = [("code", [0]), ("chat", [1]), ("code", [2]), ("chat", [3])]
    figs = measure_interleaved(Engine(), prompts, arms, 8)
    # every arm drafts from one frozen copy of the engine's pool: none sees another's answers
    (pool,) = pools
    assert pool is not Engine.pool and not pool.live
    assert order[:3] == [(0, "a1"), (0, "a2"), (0, "a3")]  # untimed warm-ups
    order = order[3:]
    assert [p for p, _ in order] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert [a for _, a in order[:6]] == ["a1", "a2", "a3", "a2", "a3", "a1"]
    # 12 x depth tokens in 8 steps (the mean of the per-prompt figures would be 2 x depth)
    assert [f["mean_accepted_length"] for f in figs] == [1.5, 3.0, 4.5]
    assert all(len(f["per_prompt"]) == 4 and set(f["by_class"]) == {"code", "chat"}
               for f in figs)


def test_search_takes_the_s3d_drafters_only_with_an_adapter_for_its_model(tmp_path):
    """A search for another model leaves the S3D kinds out rather than failing on the bundled
    adapter after its long stages; an adapter given for another model is refused at once."""
    from workers.drafters.s3d import BUNDLED_ADAPTER, AdapterMismatchError, MaskAdapter
    from workers.search import arm_candidates, s3d_adapter_fits

    bundled_model = MaskAdapter.read_metadata(BUNDLED_ADAPTER)["model_fingerprint"]
    said: list[str] = []
    assert s3d_adapter_fits(None, bundled_model, said.append) and not said
    assert not s3d_adapter_fits(None, "another-model", said.append)
    assert "s3d train" in said[0]
    with pytest.raises(AdapterMismatchError):
        s3d_adapter_fits(str(BUNDLED_ADAPTER), "another-model", said.append)
    with pytest.raises(FileNotFoundError):
        s3d_adapter_fits(str(tmp_path / "missing.safetensors"), bundled_model, said.append)
    # An adapter trained over a skip set fits none of the search's S3D candidates (fused,
    # hybrid, s3d_skip with no skip set): refused at once, not by s3d_skip after the search.
    import json

    from safetensors.torch import load_file, save_file

    skipped = tmp_path / "skipped.safetensors"
    meta = {**MaskAdapter.read_metadata(BUNDLED_ADAPTER), "skip_layers": [10, 11]}
    save_file(load_file(str(BUNDLED_ADAPTER)), str(skipped), metadata={"s3d": json.dumps(meta)})
    with pytest.raises(AdapterMismatchError, match="skipped"):
        s3d_adapter_fits(str(skipped), bundled_model, said.append)
    kinds = set(arm_candidates([(3, 4)], None, s3d=False))
    assert kinds == {"skip_chain", "skip_tree", "ngram_tree"}
    assert {"s3d", "hybrid", "s3d_skip"} <= set(arm_candidates([(3, 4)], None))
