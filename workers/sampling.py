"""Sampling parameters, the target distribution, and acceptance of a draft tree's path.

Every drafter's proposal is treated as deterministic (a token, not a sample), so acceptance at a
node is *sequential point-mass rejection*: with target distribution ``p`` at the node, the
first child ``x`` is accepted with probability ``p(x)``; on rejection ``p`` loses ``x`` and is
renormalised (the residual ``norm(max(p - 1_x, 0))``), and the next sibling is tried against it.
If every child is rejected, the next token (the *recovered* token) is drawn from what is left.
Each accepted token is therefore distributed exactly as ``p``: this is the recursive rejection
sampling of SpecInfer / EAGLE with one-hot draft distributions, and the output distribution is the
base model's. With ``temperature == 0`` it reduces to following the verifier's argmax down the
tree; the token after the last accepted node is the *bonus* token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from workers.tree import DraftTree

MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Temperatures below ``MIN_TEMPERATURE`` are argmax (dividing by them overflows)."""
        return self.temperature < MIN_TEMPERATURE

    def for_prompt(self, index: int) -> SamplingParams:
        """These settings for prompt ``index`` of a suite: sampled prompts take seed
        ``seed + index`` (0 + index without a seed), so every method or arm that decodes the
        prompt draws from the same seed; greedy settings stay as they are."""
        if self.greedy:
            return self
        return replace(self, seed=(self.seed or 0) + index)

    def generator(self) -> torch.Generator:
        """A CPU generator whatever the model's device: distributions are moved to the CPU
        before drawing (``sample_accept``), so a seed gives the same text on every device."""
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits ``[R, V]`` to the sampling distribution ``[R, V]`` (temperature, top-k, top-p)."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p
        drop = before >= params.top_p
        drop[..., 0] = False  # the most likely token always stays, however small top_p is
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def greedy_accept(target: Callable[[int], int], tree: DraftTree) -> tuple[list[int], int]:
    """Follow the verifier's argmax ``target(row)`` down ``tree``.

    Returns the accepted node indices (root's child first) and the bonus token.
    """
    children = tree.children()
    tokens = tree.tokens.tolist()
    path: list[int] = []
    row = 0
    while True:
        want = target(row)
        nxt = next((c for c in children[row] if tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        row = nxt + 1


def sample_accept(probs: Callable[[int], torch.Tensor], tree: DraftTree,
                  generator: torch.Generator) -> tuple[list[int], int]:
    """Recursive rejection sampling down ``tree``; ``probs(row)`` is the target ``[V]`` there
    (on any device: it is drawn from on the CPU, where ``generator`` is)."""
    children = tree.children()
    tokens = tree.tokens.tolist()
    path: list[int] = []
    row = 0
    while True:
        target = probs(row).cpu()
        p = target.clone()
        accepted = None
        for child in children[row]:
            mass = float(p.sum())
            x = tokens[child]
            if mass > 0 and float(torch.rand((), generator=generator)) * mass < float(p[x]):
                accepted = child
                break
            p[x] = 0.0
        if accepted is None:
            if float(p.sum()) <= 0:  # only reachable through float underflow
                p = target
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(accepted)
        row = accepted + 1


