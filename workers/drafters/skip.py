"""Layer-skip self-drafting: the model drafts for itself with a skip set of its layers left out.

``SkipChainDrafter`` drafts one token at a time and stops when the drafter's top-1 probability
falls below a threshold that adapts to the acceptance rate (Draft & Verify, arXiv 2309.08168).
``SkipTreeDrafter`` grows an EAGLE-2 dynamic tree (arXiv 2406.16858): each depth expands the
``top_k`` best frontier nodes in one forward, and the ``total_tokens`` best nodes by cumulative
draft log-probability are kept; it stops growing early once the likeliest frontier path's draft
probability falls below the arm's ``draft_exit``.
"""

from __future__ import annotations

import math

import torch

from workers.arm import Arm
from workers.drafters.base import DraftContext, Drafter
from workers.runner import Attention
from workers.tree import DraftTree


def kept_layers(num_layers: int, skip: tuple[int, ...]) -> list[int]:
    bad = [i for i in skip if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"skip layers {bad} out of range for a {num_layers}-layer model")
    return [i for i in range(num_layers) if i not in set(skip)]


class SkipChainDrafter(Drafter):
    def __init__(self, arm: Arm, num_layers: int, target_rate: float = 0.8, step: float = 0.05):
        self.layers = kept_layers(num_layers, arm.skip_layers)
        self.max_depth = arm.depth
        self.vocab = arm.draft_vocab
        self.threshold = arm.draft_exit
        self.target_rate = target_rate
        self.step = step
        self.rate = target_rate

    def propose(self, ctx: DraftContext) -> DraftTree:
        runner, cache = ctx.runner, ctx.cache
        start = cache.length
        token = ctx.tokens[-1]
        drafted: list[int] = []
        for i in range(min(self.max_depth, ctx.max_depth)):
            slot = start + i
            logits = runner.forward(cache, torch.tensor([token]), torch.tensor([slot]),
                                    Attention.causal(slot), self.layers, vocab=self.vocab)
            prob, token = torch.softmax(logits[-1], -1).max(-1)
            token = int(token)
            if drafted and float(prob) < self.threshold:
                break
            drafted.append(token)
            if float(prob) < self.threshold:
                break
        return DraftTree.chain(drafted)

    def observe(self, tree: DraftTree, num_accepted: int) -> None:
        """Draft & Verify's draft-exit rule: raise the bar when acceptance lags the target."""
        if not len(tree):
            return
        self.rate = 0.7 * self.rate + 0.3 * (num_accepted / len(tree))
        delta = self.step if self.rate < self.target_rate else -self.step
        self.threshold = min(0.95, max(0.0, self.threshold + delta))


class SkipTreeDrafter(Drafter):
    def __init__(self, arm: Arm, num_layers: int):
        self.layers = kept_layers(num_layers, arm.skip_layers)
        self.depth = arm.depth
        self.top_k = arm.top_k
        self.total = arm.total_tokens
        self.vocab = arm.draft_vocab
        self.exit = arm.draft_exit

    def propose(self, ctx: DraftContext) -> DraftTree:
        runner, cache = ctx.runner, ctx.cache
        if ctx.max_depth < 1:
            return DraftTree.empty()
        root_slot = cache.length
        # Candidate nodes: token, parent (-1 = root), cumulative log-prob, depth.
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        depths: list[int] = []
        slot_of: dict[int, int] = {}  # expanded node -> scratch slot
        logits = runner.forward(cache, torch.tensor([ctx.tokens[-1]]), torch.tensor([root_slot]),
                                Attention.causal(root_slot), self.layers, vocab=self.vocab)
        frontier = self._add_children(logits.log_softmax(-1), [-1], [0.0], 1,
                                      tokens, parents, scores, depths)
        next_slot = root_slot + 1
        for depth in range(2, min(self.depth, ctx.max_depth) + 1):
            if math.exp(scores[frontier[0]]) < self.exit:
                break  # even the likeliest path so far is unlikely: another pass would not pay
            num = len(frontier)
            # Each frontier node sees the root's slot, its ancestors' slots and itself.
            local = torch.zeros(num, next_slot + num - root_slot, dtype=torch.bool)
            local[:, 0] = True
            for row, node in enumerate(frontier):
                anc = parents[node]
                while anc >= 0:
                    local[row, slot_of[anc] - root_slot] = True
                    anc = parents[anc]
                local[row, next_slot - root_slot + row] = True
                slot_of[node] = next_slot + row
            logits = runner.forward(
                cache, torch.tensor([tokens[n] for n in frontier]),
                torch.full((num,), root_slot + depth - 1),
                Attention(start=next_slot, prefix_len=root_slot, local=local), self.layers,
                vocab=self.vocab)
            next_slot += num
            frontier = self._add_children(logits.log_softmax(-1), frontier,
                                          [scores[n] for n in frontier], depth,
                                          tokens, parents, scores, depths)
        return select_tree(tokens, parents, scores, depths, self.total)

    def _add_children(self, logp: torch.Tensor, nodes: list[int], base: list[float], depth: int,
                      tokens, parents, scores, depths) -> list[int]:
        """Add the top-k children of each node; return the next frontier (best top_k new nodes)."""
        top = logp.topk(self.top_k, dim=-1)
        new: list[int] = []
        for row, node in enumerate(nodes):
            for lp, tok in zip(top.values[row].tolist(), top.indices[row].tolist()):
                new.append(len(tokens))
                tokens.append(tok)
                parents.append(node)
                scores.append(base[row] + lp)
                depths.append(depth)
        new.sort(key=lambda n: -scores[n])
        return new[: self.top_k]


def select_tree(tokens: list[int], parents: list[int], scores: list[float], depths: list[int],
                total: int) -> DraftTree:
    """Keep the ``total`` best candidates by cumulative log-prob as a connected tree.

    A child's score never exceeds its parent's, and ties go to the shallower node, so the best
    ``total`` always include every kept node's parent. Output order: by depth, best first.
    """
    order = sorted(range(len(tokens)), key=lambda n: (-scores[n], depths[n], n))[:total]
    order.sort(key=lambda n: (depths[n], -scores[n], n))
    new_index = {old: i for i, old in enumerate(order)}
    nodes = [(tokens[n], -1 if parents[n] < 0 else new_index[parents[n]]) for n in order]
    return DraftTree.from_nodes(nodes)
