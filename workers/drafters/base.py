"""The drafter interface: propose a draft tree from the current decoding state."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from workers.pool import TokenPool
from workers.runner import KVCache, ModelRunner
from workers.tree import DraftTree


@dataclass
class DraftContext:
    """What a drafter may read. ``tokens[-1]`` is the root: committed, not yet in the cache.

    A drafter may write K/V at cache slots ``>= cache.length`` (scratch); the verify forward that
    follows overwrites the slots it uses in every layer.
    """

    runner: ModelRunner
    cache: KVCache
    tokens: list[int]  # prompt + generated so far, ending with the root
    pool: TokenPool | None = None  # earlier outputs (arms with ``pool``)
    # The deepest draft worth verifying: a step commits the accepted drafts and one more token,
    # and the request has ``max_depth + 1`` left. Deeper nodes are cut by the engine; drafters
    # that pay per level stop there.
    max_depth: int = 1 << 30


class Drafter(abc.ABC):
    """Base class: drafters propose; verification, acceptance and cache bookkeeping are shared."""

    @abc.abstractmethod
    def propose(self, ctx: DraftContext) -> DraftTree:
        """The draft tree to verify from the state ``ctx``."""

    def observe(self, tree: DraftTree, num_accepted: int) -> None:
        """Feedback after verification (adaptive drafters override it)."""
        return None

    def mask_groups(self, tree: DraftTree):
        """Mask rows to append to the verify forward (fused S3D); ``None`` for none."""
        return None

    def after_verify(self, groups, mask_logits: torch.Tensor, accepted_row: int) -> None:
        """Receives the mask rows' logits ``[masks, V]`` of the verify forward (fused S3D)."""
        return None


class NoDrafter(Drafter):
    def propose(self, ctx: DraftContext) -> DraftTree:
        return DraftTree.empty()
