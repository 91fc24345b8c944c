"""Draft trees: the structure every drafter proposes and the verifier checks in one forward.

Node ``i`` of a tree holds ``tokens[i]``; ``parents[i]`` is the index of its parent node, or ``-1``
for a child of the root. The root is the last committed token (not yet in the KV cache), so the
verify forward runs ``[root, *tokens]``: row 0 is the root, row ``i + 1`` is node ``i``.
Parents always come before their children; siblings are ordered best first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [N] long, drafted tokens
    parents: torch.Tensor  # [N] long, parent node index or -1 for the root

    @staticmethod
    def empty() -> DraftTree:
        return DraftTree(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))

    @staticmethod
    def chain(tokens: list[int]) -> DraftTree:
        return DraftTree(torch.tensor(tokens, dtype=torch.long),
                         torch.arange(-1, len(tokens) - 1, dtype=torch.long))

    @staticmethod
    def from_nodes(nodes: list[tuple[int, int]]) -> DraftTree:
        """``nodes``: ``(token, parent)`` pairs in order."""
        if not nodes:
            return DraftTree.empty()
        tokens, parents = zip(*nodes)
        return DraftTree(torch.tensor(tokens, dtype=torch.long),
                         torch.tensor(parents, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def depths(self) -> torch.Tensor:
        """``[N]`` depth of each node; children of the root have depth 1."""
        return tree_depths(self.parents)

    @property
    def depth(self) -> int:
        """The deepest node's depth (0 for an empty tree)."""
        return int(self.depths().max()) if len(self) else 0

    def pruned(self, max_depth: int) -> DraftTree:
        """The nodes at most ``max_depth`` deep (a node keeps all its children or none: any
        tree shape verifies losslessly)."""
        keep = (self.depths() <= max_depth).nonzero().flatten().tolist()
        if len(keep) == len(self):
            return self
        index = {old: new for new, old in enumerate(keep)}
        parents = self.parents.tolist()
        return DraftTree.from_nodes([(int(self.tokens[i]), index.get(parents[i], -1))
                                     for i in keep])

    def children(self) -> list[list[int]]:
        """Children of each verify row: entry 0 is the root's, entry ``i + 1`` node ``i``'s."""
        out: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for node, parent in enumerate(self.parents.tolist()):
            out[parent + 1].append(node)
        return out

    def principal_rows(self) -> list[int]:
        """Verify rows of the root and its chain of first children (the likeliest path)."""
        rows, children, row = [0], self.children(), 0
        while children[row]:
            row = children[row][0] + 1
            rows.append(row)
        return rows

    def attach_rows(self, count: int) -> list[int]:
        """``count`` verify rows to draft the next step from (fused S3D): the principal rows
        first, then the other nodes' rows in tree order (by depth, best first). The accepted path
        ends at one of them unless the tree has more rows than ``count``."""
        principal = self.principal_rows()
        if count <= len(principal):
            return principal[:count]
        taken = set(principal)
        rest = [row for row in range(1, len(self) + 1) if row not in taken]
        return principal + rest[:count - len(principal)]


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    depths: list[int] = []  # built in Python, one tensor at the end: called every step
    for i, p in enumerate(parents.tolist()):
        if p >= i:
            raise ValueError("a node's parent must come before it")
        depths.append(1 if p < 0 else depths[p] + 1)
    return torch.tensor(depths, dtype=torch.long)


def tree_attention_mask(parents: torch.Tensor) -> torch.Tensor:
    """``[N+1, N+1]`` bool: row ``r`` of ``[root, *nodes]`` sees itself and its ancestors."""
    n = parents.shape[0]
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[0, 0] = True
    for i, p in enumerate(parents.tolist()):
        row = i + 1
        mask[row] = mask[p + 1]
        mask[row, row] = True
    return mask


def path_to(parents: torch.Tensor, node: int) -> list[int]:
    """Node indices from the root's child down to ``node``."""
    path = []
    while node >= 0:
        path.append(node)
        node = int(parents[node])
    return path[::-1]
