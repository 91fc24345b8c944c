"""N-gram drafter (prompt lookup decoding, into a tree): no model pass at all.

The last ``n`` tokens (``n`` from ``ngram_max`` down to ``ngram_min``) are matched against
everything earlier in the prompt and the generated text; the continuations of the most recent
matches become branches of one draft tree (shared prefixes merged), up to ``depth`` deep and
``total_tokens`` nodes. An arm with ``pool`` fills the branches the request's own text does not
give from the replica's pool of earlier outputs (workers/pool.py).
"""

from __future__ import annotations

import torch

from workers.arm import Arm
from workers.drafters.base import DraftContext, Drafter
from workers.pool import add_branch
from workers.tree import DraftTree


def ngram_continuations(tokens: list[int], ngram_max: int, ngram_min: int, depth: int,
                        max_branches: int) -> list[list[int]]:
    """Continuations following earlier occurrences of the context's last n-gram.

    Longer n-grams first, most recent occurrence first; duplicates dropped.
    """
    seq = torch.tensor(tokens, dtype=torch.long)
    length = seq.shape[0]
    found: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        windows = seq[: length - 1].unfold(0, n, 1)  # windows ending before the last token
        hits = (windows == seq[length - n:]).all(-1).nonzero().flatten().tolist()
        for start in reversed(hits):
            if add_branch(found, seen, tokens[start + n: start + n + depth], max_branches):
                return found
    return found


def draft_branches(ctx: DraftContext, arm: Arm, max_branches: int) -> list[list[int]]:
    """The request's own n-gram continuations, then (arms with ``pool``) the pool's, up to
    ``max_branches`` in all."""
    branches = ngram_continuations(ctx.tokens, arm.ngram_max, arm.ngram_min, arm.depth,
                                   max_branches)
    if arm.pool and ctx.pool is not None and len(branches) < max_branches:
        branches += ctx.pool.continuations(ctx.tokens, arm.depth, max_branches - len(branches),
                                           arm.pool_min, exclude={tuple(b) for b in branches})
    return branches


def trie_tree(branches: list[list[int]], total: int) -> DraftTree:
    """Merge branches (best first) into a tree of at most ``total`` nodes, parents first."""
    nodes: list[tuple[int, int]] = []
    index: dict[tuple[int, ...], int] = {}
    for branch in branches:
        parent = -1
        for depth in range(len(branch)):
            key = tuple(branch[: depth + 1])
            if key not in index:
                if len(nodes) >= total:
                    break
                index[key] = len(nodes)
                nodes.append((branch[depth], parent))
            parent = index[key]
    # Reorder by depth so that a node's parent precedes it and siblings stay best first.
    depth_of = {}
    for i, (_, p) in enumerate(nodes):
        depth_of[i] = 1 if p < 0 else depth_of[p] + 1
    order = sorted(range(len(nodes)), key=lambda i: (depth_of[i], i))
    remap = {old: new for new, old in enumerate(order)}
    return DraftTree.from_nodes(
        [(nodes[i][0], -1 if nodes[i][1] < 0 else remap[nodes[i][1]]) for i in order])


class NgramDrafter(Drafter):
    def __init__(self, arm: Arm):
        self.arm = arm

    def propose(self, ctx: DraftContext) -> DraftTree:
        return trie_tree(draft_branches(ctx, self.arm, self.arm.top_k), self.arm.total_tokens)
