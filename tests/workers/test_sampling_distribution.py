"""Sampled speculative decoding has the base model's distribution (statistical test).

A tiny random Llama model (vocabulary 12) makes the exact distribution of the first tokens
enumerable; thousands of seeded generations per drafter are compared with it by total-variation
distance, and a deliberately biased acceptance rule shows the test has the power to fail.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workers import engine as engine_mod
from workers.arm import Arm
from workers.drafters.s3d import MaskAdapter
from workers.engine import Generation
from workers.pool import TokenPool
from workers.runner import ModelRunner
from workers.sampling import SamplingParams, target_probs

VOCAB = 12
STEPS = 3  # tokens compared: the prefill's and the first speculative steps'
DRAWS = 2000
PARAMS = SamplingParams(temperature=0.9, top_p=0.95)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # peaky distributions, so drafts get accepted
        # A prompt that repeats the model's own greedy text, so n-gram drafts get accepted too.
        text = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False)
    text = text[0].tolist()
    return model, text + text[:4]


def exact_marginals(model, prompt) -> list[torch.Tensor]:
    """``[VOCAB]`` marginal of each of the first STEPS generated tokens, by enumeration."""
    marginals = []
    prefixes = [()]
    weights = torch.ones(1)
    for _ in range(STEPS):
        batch = torch.tensor([prompt + list(p) for p in prefixes])
        with torch.no_grad():
            logits = model(batch).logits[:, -1]
        probs = target_probs(logits, PARAMS)
        joint = weights[:, None] * probs  # [prefixes, VOCAB]
        marginals.append(joint.sum(0))
        prefixes = [p + (t,) for p, t in itertools.product(prefixes, range(VOCAB))]
        weights = joint.flatten()
    return marginals


def tiny_adapter(runner: ModelRunner) -> MaskAdapter:
    torch.manual_seed(1)
    adapter = MaskAdapter(runner, gamma=2, rank=4)
    with torch.no_grad():
        adapter.mask_embed.copy_(runner.embed.weight[5])
        for b in adapter.lora_b.values():
            b.normal_(0, 0.05)
    return adapter.requires_grad_(False)


def tiny_pool(model, prompt) -> TokenPool:
    """Sampled continuations of the prompt (earlier answers to the same request): pool drafts
    that are often, not always, what this draw samples."""
    pool = TokenPool(live=False)
    torch.manual_seed(2)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt] * 24), max_new_tokens=STEPS + 2,
                             do_sample=True, temperature=PARAMS.temperature, top_p=PARAMS.top_p)
    for row in out.tolist():
        pool.add(row[len(prompt) - 2:])
    return pool


def empirical_marginals(model, prompt, arm: Arm) -> tuple[list[torch.Tensor], int]:
    runner = ModelRunner(model)
    adapter = tiny_adapter(runner)
    pool = tiny_pool(model, prompt) if arm.pool else None
    counts = torch.zeros(STEPS, VOCAB)
    accepted = 0
    for seed in range(DRAWS):
        params = SamplingParams(PARAMS.temperature, PARAMS.top_p, seed=seed)
        # One token more than compared: drafts are cut to what a request has left, and the
        # first steps must draft their full depth.
        gen = Generation(runner, prompt, STEPS + 1, arm, params,
                         adapter_for=lambda a: adapter, pool=pool)
        # A seeded request drafts without the pool (its text must not depend on it); the
        # distribution must hold with it too, so these seeded draws draft from it.
        gen.draft_pool = pool
        out = gen.run()
        for pos, tok in enumerate(out[:STEPS]):
            counts[pos, tok] += 1
        accepted += gen.stats.num_accepted_tokens
    return list(counts / DRAWS), accepted


def max_tv(tiny, arm: Arm) -> tuple[float, int]:
    exact = exact_marginals(*tiny)
    empirical, accepted = empirical_marginals(*tiny, arm)
    return max(0.5 * float((e - x).abs().sum()) for e, x in zip(empirical, exact)), accepted


ARMS = [
    Arm(name="chain", drafter="skip_chain", skip_layers=(1, 2), depth=2, draft_exit=0.0),
    Arm(name="tree", drafter="skip_tree", skip_layers=(2,), depth=2, top_k=3, total_tokens=6),
    Arm(name="ngram", drafter="ngram_tree", depth=2, top_k=3, total_tokens=6),
    Arm(name="hybrid", drafter="hybrid", depth=2, top_k=2, total_tokens=6, gamma=2, attach=2),
    # Own-text branches only from 4-grams, the pool's from 2-grams up: most drafts the pool's.
    Arm(name="ngram_pool", drafter="ngram_tree", depth=2, top_k=3, total_tokens=6, ngram_min=4,
        pool=True),
]


@pytest.mark.parametrize("arm", ARMS, ids=lambda a: a.name)
def test_sampled_speculative_matches_base_distribution(tiny, arm):
    tv, accepted = max_tv(tiny, arm)
    assert accepted > DRAWS // 4, "drafts were rarely accepted: the test would be vacuous"
    assert tv < 0.05, tv


def test_biased_acceptance_is_detected(tiny, monkeypatch):
    """Accepting every drafted child regardless of the target must be caught."""

    def accept_first_child(probs, tree, generator):
        children, path, row = tree.children(), [], 0
        while children[row]:
            path.append(children[row][0])
            row = children[row][0] + 1
        return path, int(torch.multinomial(probs(row), 1, generator=generator))

    monkeypatch.setattr(engine_mod, "sample_accept", accept_first_child)
    tv, _ = max_tv(tiny, ARMS[1])
    assert tv > 0.1, tv
