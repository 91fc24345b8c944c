"""The one acceptance-statistics record, with vLLM's speculative-decoding metric names.

Replicas fill it per request; the HTTP response, Prometheus and the statistics store are its sinks.
Pure Python, importable without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


def mean_acceptance_length(accepted: float, steps: float) -> float:
    """Tokens committed per verify step: accepted drafts plus the bonus token."""
    return (accepted + steps) / steps if steps else 0.0


def nearest_rank(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of sorted values by nearest rank; None for none."""
    if not ordered:
        return None
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


def acceptance_rate(accepted: float, drafted: float) -> float:
    return accepted / drafted if drafted else 0.0


def add_lists(a: list, b: list) -> list:
    """Element-wise sum of two per-position lists of different lengths."""
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    return [x + (shorter[i] if i < len(shorter) else 0) for i, x in enumerate(longer)]


def _add_ones(counts: list[int], n: int) -> None:
    """Count one more step at positions ``0 .. n-1``."""
    if n > len(counts):
        counts.extend([0] * (n - len(counts)))
    for pos in range(n):
        counts[pos] += 1


@dataclass
class SpecDecodeStats:
    num_spec_steps: int = 0  # verify forwards after the prefill
    num_drafts: int = 0  # steps that verified at least one drafted token
    num_draft_tokens: int = 0  # drafted tokens verified (tree nodes)
    num_accepted_tokens: int = 0  # drafted tokens accepted
    accepted_per_pos: list[int] = field(default_factory=list)  # accepted count by draft position
    # Steps whose draft reached position j with positions < j accepted: acceptance at depth j
    # given the walk got there is accepted_per_pos[j] / tried_per_pos[j].
    tried_per_pos: list[int] = field(default_factory=list)
    num_draft_levels: int = 0  # sum over steps of the draft's depth (a skip drafter's passes)
    num_forward_passes: int = 0  # model passes of the steps: verify plus any draft passes
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    num_output_tokens: int = 0
    # The request's own steps after its first token, each from drafting to commit: its decoding
    # time whatever else the replica ran between them (other requests' steps).
    decode_time_s: float = 0.0

    def copy(self) -> SpecDecodeStats:
        return replace(self, accepted_per_pos=list(self.accepted_per_pos),
                       tried_per_pos=list(self.tried_per_pos))

    def observe_step(self, num_draft_tokens: int, num_accepted: int,
                     draft_time_s: float, verify_time_s: float, draft_depth: int,
                     forward_passes: int = 1, reached: int | None = None) -> None:
        """One verify step; ``num_accepted`` counts the accepted drafts the step committed,
        ``draft_depth`` is the draft's deepest position (a chain's length), ``forward_passes``
        the model passes it ran, its verify forward included. ``reached``: the positions the
        acceptance walk tried, its accepted nodes and one more if the last of them (or the
        root) has children; a tree's deepest node may lie on a branch the walk left. Without
        it, a chain's: every position up to the first rejected one."""
        self.num_spec_steps += 1
        self.num_forward_passes += forward_passes
        if num_draft_tokens:
            self.num_drafts += 1
        draft_depth = max(draft_depth, num_accepted) if num_draft_tokens else 0
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        self.num_draft_levels += draft_depth
        _add_ones(self.accepted_per_pos, num_accepted)
        _add_ones(self.tried_per_pos, min(num_accepted + 1,
                                          draft_depth if reached is None else reached))
        self.draft_time_s += draft_time_s
        self.verify_time_s += verify_time_s

    @property
    def mean_acceptance_length(self) -> float:
        return mean_acceptance_length(self.num_accepted_tokens, self.num_spec_steps)

    @property
    def draft_acceptance_rate(self) -> float:
        return acceptance_rate(self.num_accepted_tokens, self.num_draft_tokens)

    @property
    def tokens_per_forward(self) -> float:
        """Tokens committed per model pass: the mean accepted length for drafters without a
        pass of their own, less for those with (a skip drafter's levels, S3D's separate pass)."""
        if not self.num_forward_passes:
            return 0.0
        return (self.num_accepted_tokens + self.num_spec_steps) / self.num_forward_passes

    def merge(self, other: SpecDecodeStats) -> None:
        self.num_spec_steps += other.num_spec_steps
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.num_draft_levels += other.num_draft_levels
        self.num_forward_passes += other.num_forward_passes
        self.accepted_per_pos = add_lists(self.accepted_per_pos, other.accepted_per_pos)
        self.tried_per_pos = add_lists(self.tried_per_pos, other.tried_per_pos)
        self.draft_time_s += other.draft_time_s
        self.verify_time_s += other.verify_time_s
        self.num_output_tokens += other.num_output_tokens
        self.decode_time_s += other.decode_time_s

    def summary(self, arm: str, depth: int | None = None) -> dict:
        """The ``spec_decode`` object of an HTTP response (``depth``: the draft depth the
        request ran with)."""
        return {
            "arm": arm,
            "depth": depth,
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "draft_acceptance_rate": round(self.draft_acceptance_rate, 4),
            "num_spec_steps": self.num_spec_steps,
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "num_accepted_tokens_per_pos": list(self.accepted_per_pos),
            "num_forward_passes": self.num_forward_passes,
        }
