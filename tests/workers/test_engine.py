"""Losslessness of the engine on the bundled model in float32 (greedy, token for token)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.arm import NONE_ARM, Arm, Profile
from workers.runner import Attention, KVCache

pytestmark = pytest.mark.model

SKIP = tuple(range(12, 18))


def truncate_at_stop(tokens: list[int], stops) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in stops:
            return tokens[: i + 1]
    return tokens


def test_vanilla_matches_hf_generate(bundled):
    hf = bundled.loaded.model
    pad = bundled.loaded.tokenizer.pad_token_id
    for index in range(12):
        prompt = bundled.prompts[index]
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                          temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        expected = truncate_at_stop(out[0, len(prompt):].tolist(), bundled.stops)
        assert bundled.vanilla(index, 32) == expected, f"prompt {index}"


def test_chunked_prefill_decodes_as_one_step_prefill(bundled):
    """A prompt prefilled a few tokens per step (as a replica does a long prompt, so its other
    streams decode between the chunks) gives the same output; each chunk but the last commits
    nothing, and the cache is allocated by the first step, not when the request is made."""
    from workers.engine import Generation

    arm = Arm(name="ngram", drafter="ngram_tree", depth=4, top_k=2, total_tokens=8)
    for index in range(4):
        prompt = bundled.prompts[index]
        for chunk_arm in (NONE_ARM, arm):
            gen = Generation(bundled.runner, prompt, 32, chunk_arm, stop_token_ids=bundled.stops,
                             prefill_chunk=7)
            assert gen.cache is None
            empty = 0
            while not gen.output:
                empty += not gen.step()
            assert empty == -(-len(prompt) // 7) - 1
            assert gen.run() == bundled.vanilla(index, 32), f"prompt {index}, {chunk_arm.name}"
    with pytest.raises(ValueError, match="prefill_chunk"):
        Generation(bundled.runner, prompt, 4, prefill_chunk=-1)


def test_drafts_stop_at_what_the_request_has_left(bundled, monkeypatch):
    """A step commits its accepted drafts and one token more: near ``max_tokens`` deeper
    drafts are cut (drafters that pay per level stop drafting), and the output is unchanged."""
    from workers.engine import Generation

    seen: list[tuple[int, int]] = []  # (tokens the request had left, verified draft depth)
    verify = Generation._verify

    def spy(self, tree):
        seen.append((self.max_tokens - len(self.output), tree.depth))
        return verify(self, tree)

    monkeypatch.setattr(Generation, "_verify", spy)
    arms = [Arm(name="chain", drafter="skip_chain", skip_layers=SKIP, depth=4),
            Arm(name="tree", drafter="skip_tree", skip_layers=SKIP, depth=4, top_k=2,
                total_tokens=8),
            Arm(name="ngram", drafter="ngram_tree", depth=5, top_k=2, total_tokens=8)]
    for arm in arms:
        for max_tokens in (1, 2, 3, 5):
            for index in range(3):
                gen = bundled.generate(bundled.prompts[index], max_tokens, arm)
                assert gen.output == bundled.vanilla(index, max_tokens), (arm.name, index)
    assert all(depth <= left - 1 for left, depth in seen)
    assert any(depth == left - 1 for left, depth in seen if 2 <= left <= 3)  # the cap bound


def test_skip_chain_identical_to_vanilla(bundled):
    arm = Arm(name="chain", drafter="skip_chain", skip_layers=SKIP, depth=4)
    # the drafter really drafted and was really verified
    assert bundled.accepted_if_identical(arm, 10, 64) > 0


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(skip=st.sets(st.integers(0, 29), min_size=1, max_size=12),
       depth=st.integers(1, 6), index=st.integers(0, 9))
def test_random_skip_sets_identical(bundled, skip, depth, index):
    arm = Arm(name="r", drafter="skip_chain", skip_layers=tuple(sorted(skip)), depth=depth)
    assert bundled.generate(bundled.prompts[index], 24, arm).output == bundled.vanilla(index, 24)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(top_k=st.integers(1, 4), depth=st.integers(1, 5), total=st.integers(1, 20),
       index=st.integers(0, 9), skip_start=st.integers(4, 20), skip_len=st.integers(2, 8),
       vocab=st.sampled_from([0, 300, 8192]))
def test_random_skip_trees_identical(bundled, top_k, depth, total, index, skip_start, skip_len,
                                     vocab):
    arm = Arm(name="t", drafter="skip_tree", skip_layers=tuple(range(skip_start,
              skip_start + skip_len)), depth=depth, top_k=top_k, total_tokens=total,
              draft_vocab=vocab)
    assert bundled.generate(bundled.prompts[index], 24, arm).output == bundled.vanilla(index, 24)


def test_draft_vocab_logits_are_the_first_columns(bundled):
    runner = bundled.runner
    cache = runner.new_cache(16)
    hidden = runner.hidden_states(cache, torch.tensor(bundled.prompts[0][:5]), torch.arange(5),
                                  Attention.causal(0))
    full = runner.logits(hidden)
    assert full.shape == (5, runner.vocab_size)
    for vocab in (1, 300, 8192):
        torch.testing.assert_close(runner.logits(hidden, vocab), full[:, :vocab])
    assert runner.logits(hidden, runner.vocab_size + 5).shape == full.shape


def test_skip_chain_with_draft_vocab_identical(bundled):
    arm = Arm(name="chain", drafter="skip_chain", skip_layers=SKIP, depth=4, draft_vocab=4096)
    assert bundled.accepted_if_identical(arm, 4, 32) > 0


def test_ngram_tree_identical_and_accepts(bundled):
    arm = Arm(name="ng", drafter="ngram_tree", depth=6, top_k=4, total_tokens=16)
    assert bundled.accepted_if_identical(arm, 10, 64) > 0


def test_same_seed_same_output(bundled):
    from workers.sampling import SamplingParams

    arm = Arm(name="t", drafter="skip_tree", skip_layers=SKIP, depth=3, top_k=2, total_tokens=6)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234)
    a = bundled.generate(bundled.prompts[1], 24, arm, params).output
    b = bundled.generate(bundled.prompts[1], 24, arm, params).output
    assert a == b


def test_kv_cache_compaction_and_rollback():
    cache = KVCache(num_layers=2, kv_heads=1, head_dim=2, capacity=8, dtype=torch.float32,
                    device=torch.device("cpu"))
    for layer in range(2):
        values = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1).expand(1, 1, 8, 2)
        cache.write(layer, 0, values + 100 * layer, -values)
    cache.compact([5, 7], 3)
    for layer in range(2):
        assert cache.k[layer][0, 0, :, 0].tolist() == [x + 100 * layer for x in
                                                       [0, 1, 2, 5, 7, 5, 6, 7]]
        assert cache.v[layer][0, 0, 3:5, 1].tolist() == [-5, -7]
    cache.truncate(5)
    assert cache.length == 5
    with pytest.raises(ValueError, match="overflow"):
        cache.write(0, 7, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_is_the_modules_result_bit_for_bit(bundled, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from workers.runner import fused_rms_norm

    module = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    torch.manual_seed(0)
    module.weight.data.normal_()
    norm = fused_rms_norm(module)
    assert norm is not module  # the bundled model's norms are LlamaRMSNorm: the fused path runs
    assert type(bundled.runner.layers[0].input_layernorm) is LlamaRMSNorm
    for rows in (1, 9, 300):
        x = (torch.randn(rows, 576) * torch.rand(rows, 1) * 10).to(dtype)
        with torch.inference_mode():
            assert torch.equal(norm(x), module(x))
    other = torch.nn.LayerNorm(8)
    assert fused_rms_norm(other) is other  # any other norm runs as it is


def test_tree_attention_matches_sequential_decoding(bundled):
    """A tree verify row equals running that node's path causally."""
    runner = bundled.runner
    prompt = bundled.prompts[0][:40]
    cache = runner.new_cache(128)
    runner.forward(cache, torch.tensor(prompt), torch.arange(40), Attention.causal(0))
    # root=prompt[-1] at slot 40 is re-run; nodes: a under root, b under root, c under b
    from workers.tree import DraftTree, tree_attention_mask

    tree = DraftTree(torch.tensor([11, 22, 33]), torch.tensor([-1, -1, 1]))
    tokens = torch.tensor([prompt[-1], 11, 22, 33])
    positions = torch.tensor([39, 40, 40, 41])
    cache.length = 39
    tree_logits = runner.forward(cache, tokens, positions,
                                 Attention(39, 39, tree_attention_mask(tree.parents)))
    seq = runner.forward(cache, torch.tensor([prompt[-1], 22, 33]), torch.tensor([39, 40, 41]),
                         Attention.causal(39))
    assert torch.allclose(tree_logits[[0, 2, 3]], seq, atol=1e-4)


def test_step_statistics_and_a_router_depth_cap(bundled):
    """Every step records where its draft reached; ``Engine.generation(depth=d)`` caps a
    layer-skip drafter at ``d`` levels and stays identical to plain decoding."""
    from workers.engine import Engine

    arm = Arm(name="chain", drafter="skip_chain", skip_layers=SKIP, depth=4)
    profile = Profile(model_fingerprint=bundled.loaded.fingerprint, default_arm="chain",
                      arms=[arm, NONE_ARM])
    engine = Engine(bundled.loaded, bundled.runner, bundled.stops, profile)
    full = engine.generation(bundled.prompts[0], 32, "chain")
    full.run()
    stats = full.stats
    assert stats.num_accepted_tokens > 0
    assert stats.tried_per_pos[0] == stats.num_drafts
    assert all(a <= t for a, t in zip(stats.accepted_per_pos, stats.tried_per_pos))
    assert stats.num_draft_levels == stats.num_draft_tokens  # a chain: one token per level
    capped = engine.generation(bundled.prompts[0], 32, "chain", depth=1)
    capped.run()
    assert capped.arm.depth == 1 and capped.output == full.output == bundled.vanilla(0, 32)
    assert len(capped.stats.tried_per_pos) == 1
    assert capped.stats.num_draft_levels == capped.stats.num_drafts
    with pytest.raises(ValueError, match="depth 5"):
        engine.generation(bundled.prompts[0], 32, "chain", depth=5)


class FixedDrafter:
    """Proposes one given tree, then nothing."""

    def __init__(self, tree):
        self.trees = [tree]

    def propose(self, ctx):
        from workers.tree import DraftTree

        return self.trees.pop() if self.trees else DraftTree.empty()

    def observe(self, tree, num_accepted):
        pass

    def mask_groups(self, tree):
        return None


def _step_on(bundled, tree_of, stops=frozenset()):
    """The statistics of the first decode step of prompt 0 verifying ``tree_of(vanilla)``
    (``vanilla``: plain decoding's output), and the tokens it committed."""
    from workers.engine import Generation

    vanilla = bundled.vanilla(0, 8)
    arm = Arm(name="ngram", drafter="ngram_tree", depth=4, top_k=2, total_tokens=8)
    gen = Generation(bundled.runner, bundled.prompts[0], 8, arm, stop_token_ids=stops)
    gen.drafter = FixedDrafter(tree_of(vanilla))
    assert gen.step() == vanilla[:1]  # the prompt
    return gen.stats, gen.step()


def test_a_tree_step_counts_only_the_positions_its_walk_reached(bundled):
    """The root has a leaf A (the right token) and a chain B -> C -> D (wrong): A is accepted
    and has no children, so position 1 was never tried, whatever the tree's depth."""
    from workers.tree import DraftTree

    def tree(vanilla):
        wrong = (vanilla[1] + 1) % len(bundled.loaded.tokenizer)
        return DraftTree.from_nodes([(vanilla[1], -1), (wrong, -1), (wrong, 1), (wrong, 2)])

    stats, committed = _step_on(bundled, tree)
    assert committed == bundled.vanilla(0, 8)[1:3]
    assert stats.num_accepted_tokens == 1 and stats.accepted_per_pos == [1]
    assert stats.tried_per_pos == [1]
    assert stats.num_draft_levels == 3  # the tree's depth, what a level-paying drafter drafted


def test_a_step_counts_no_accepted_drafts_past_a_stop_token(bundled):
    """A chain of plain decoding's next three tokens, the second of which stops the request:
    all three are accepted, two are output (the stop token as the step's last), and the
    statistics count one accepted draft, as committed tokens minus one per step."""
    from workers.tree import DraftTree

    vanilla = bundled.vanilla(0, 8)
    assert vanilla[2] not in vanilla[:2]
    stats, committed = _step_on(bundled, lambda v: DraftTree.chain(v[1:4]),
                                frozenset({vanilla[2]}))
    assert committed == vanilla[1:3]
    assert stats.num_accepted_tokens == 1 and stats.accepted_per_pos == [1]
    assert stats.tried_per_pos == [1, 1]  # the stop token's position, not an accepted draft
    assert stats.num_output_tokens == 3
    assert stats.mean_acceptance_length == len(committed)


def test_decode_time_is_the_request_s_own_steps(bundled):
    """``decode_time_s``: the request's steps after its first token, drafting to commit, not
    the time between them (a busy replica runs other requests' steps there): what the router
    compares arms by."""
    import time

    from workers.engine import Generation
    from workers.sampling import SamplingParams

    arm = Arm(name="ngram", drafter="ngram_tree", depth=4, top_k=2, total_tokens=6)
    gen = Generation(bundled.runner, bundled.prompts[0], 6, arm, SamplingParams(),
                     stop_token_ids=frozenset(), adapter_for=lambda a: None)
    gen.step()  # the prompt and the first token: not decoding time
    assert gen.output and gen.stats.decode_time_s == 0.0
    started, paused = time.perf_counter(), 0.0
    while not gen.finished:
        gen.step()
        time.sleep(0.05)  # another request's step
        paused += 0.05
    wall = time.perf_counter() - started
    assert 0.0 < gen.stats.decode_time_s <= wall - paused
    assert gen.stats.decode_time_s >= gen.stats.draft_time_s + gen.stats.verify_time_s


def test_packed_weights_threshold_and_greedy_agree(bundled):
    """The runner measured a threshold for its packed weights, or dropped them; forcing packs at
    every row count or at none gives the same logits up to float rounding and the same greedy
    tokens, drafting included (with weights packed here if the runner dropped its own)."""
    from workers.gemm import onednn_available, pack

    if not onednn_available():
        pytest.skip("torch built without oneDNN: there is no packed product to compare")
    runner, plan = bundled.runner, bundled.runner.gemm_plan
    assert (plan.packed_from is None) == (plan.packed_bytes() == 0)
    gemms = [g for mm in runner.matmuls for g in mm.gemms()] + [runner._head]
    own_packs = plan.packed_bytes() == 0
    if own_packs:
        for g in gemms:
            g.packed = pack(g.weight)
    tuned = plan.packed_from
    arm = Arm(name="ngram8", drafter="ngram_tree", depth=6, top_k=2, total_tokens=8)
    outputs, logits = {}, {}
    try:
        for packed_from in (1, 10**6):
            plan.packed_from = packed_from
            cache = runner.new_cache(64)
            ids = torch.tensor(bundled.prompts[0][:40])
            logits[packed_from] = runner.forward(cache, ids, torch.arange(40),
                                                 Attention.causal(0))
            outputs[packed_from] = [bundled.generate(bundled.prompts[i], 12, arm).output
                                    for i in (0, 12)]
    finally:
        plan.packed_from = tuned
        if own_packs:
            for g in gemms:
                g.packed = None
    torch.testing.assert_close(logits[1], logits[10**6], atol=2e-3, rtol=1e-4)
    assert outputs[1] == outputs[10**6]
    assert outputs[1] == [bundled.vanilla(i, 12) for i in (0, 12)]


def test_bfloat16_runner_follows_the_float32_model(bundled):
    """The bf16 runner (packed bf16 weights where oneDNN has bf16 kernels for this CPU; single
    query rows attending in float32 where that is measured faster) scores like the float32
    model: a one-row step, attending either way, and the same row inside a four-row forward
    agree, and its greedy choices at 24 positions are float32's."""
    from workers.engine import Engine

    engine = Engine.load("bundled", dtype="bfloat16", device="cpu")
    runner = engine.runner
    assert runner.dtype == torch.bfloat16
    # The profile's S3D adapters are loaded with the engine, not by a first request on the
    # replica's event loop.
    assert engine._adapters and set(engine._adapters.values()) == {
        engine.adapter_for(a) for a in engine.profile.arms if a.drafter in ("s3d", "hybrid")}
    assert isinstance(runner.upcast_single_row, bool)  # measured at load
    assert not bundled.runner.upcast_single_row  # float32 has nothing to upcast
    ids = torch.tensor(bundled.prompts[0][:40])
    cache = runner.new_cache(64)
    prefill = runner.forward(cache, ids[:36], torch.arange(36), Attention.causal(0))
    ones = []
    for upcast in (False, True):
        runner.upcast_single_row = upcast
        ones.append(runner.forward(cache, ids[36:37], torch.arange(36, 37), Attention.causal(36)))
    four = runner.forward(cache, ids[36:40], torch.arange(36, 40), Attention.causal(36))
    scale = ones[0].abs().max()
    for one in ones:
        assert (one[0] - four[0]).abs().max() < 0.05 * scale
    reference = bundled.runner.forward(bundled.runner.new_cache(64), ids, torch.arange(40),
                                       Attention.causal(0))
    bf16 = torch.cat([prefill, four])
    agree = (bf16.argmax(-1) == reference.argmax(-1))[-24:]
    assert agree.float().mean() >= 0.9, agree


def test_forward_passes_per_step_by_drafter(bundled):
    """A step's verify forward plus its drafter's own passes: none for n-gram drafts and fused
    mask rows, one for S3D's separate pass, one per level (or more) for a layer-skip chain; the
    bundled profile's arms, so tokens per forward sets a separate pass's cost beside its MAL."""
    from workers.engine import Engine, resolve_profile

    profile = resolve_profile(None, bundled.loaded.fingerprint, bundled.runner.num_layers)
    engine = Engine(bundled.loaded, bundled.runner, bundled.stops, profile)
    for arm in profile.arms:
        gen = engine.generation(bundled.prompts[1], 24, arm)
        gen.run()
        stats = gen.stats
        steps = stats.num_spec_steps
        if arm.drafter in ("none", "ngram_tree", "s3d", "hybrid"):
            assert stats.num_forward_passes == steps, arm.name
            assert stats.tokens_per_forward == stats.mean_acceptance_length
        elif arm.drafter == "s3d_skip":
            assert stats.num_forward_passes == 2 * steps, arm.name
        else:
            assert stats.num_forward_passes >= steps + stats.num_draft_levels, arm.name
        assert stats.summary(arm.name)["num_forward_passes"] == stats.num_forward_passes


def test_an_arm_with_a_draft_vocabulary_below_its_top_k_is_refused():
    """Each node's children are its top-k draft tokens among the first ``draft_vocab`` ids:
    fewer ids than k failed every request on the arm ("selected index k out of range")."""
    from pydantic import ValidationError

    for drafter, extra in (("skip_tree", {"skip_layers": SKIP}), ("s3d", {}), ("hybrid", {})):
        with pytest.raises(ValidationError, match="draft_vocab 2 is below top_k 4"):
            Arm(name="a", drafter=drafter, top_k=4, draft_vocab=2, **extra)
        Arm(name="a", drafter=drafter, top_k=4, draft_vocab=4, **extra)


def test_length_dependent_rope_is_refused_and_a_sliding_window_bounds_the_context():
    """The rotary table is computed once for every position: "dynamic" and "longrope"
    scalings change with the sequence's length (a table built past the original maximum
    gave every later request NTK-scaled frequencies). The runner attends to the whole
    sequence, the model itself only within a sliding window: the context stops there."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from workers.model import UnsupportedModelError, check_architecture, context_length

    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    for config in (LlamaConfig(rope_parameters=dynamic), SimpleNamespace(
            model_type="llama", rope_scaling={"type": "dynamic", "factor": 2.0})):
        with pytest.raises(UnsupportedModelError, match="dynamic"):
            check_architecture(config)
    check_architecture(LlamaConfig(rope_parameters={**dynamic, "rope_type": "linear"}))
    check_architecture(LlamaConfig())
    assert context_length(LlamaConfig(max_position_embeddings=2048)) == 2048
    assert context_length(MistralConfig(max_position_embeddings=32768,
                                        sliding_window=4096)) == 4096
    assert context_length(MistralConfig(max_position_embeddings=32768,
                                        sliding_window=None)) == 32768
    assert context_length(Qwen2Config(max_position_embeddings=32768, sliding_window=4096,
                                      use_sliding_window=False)) == 32768
