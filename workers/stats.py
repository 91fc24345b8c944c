"""The one acceptance-statistics record, with vLLM's speculative-decoding metric names.

Replicas fill it per request; the HTTP response, Prometheus and the statistics store are its sinks.
Pure Python, importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def mean_acceptance_length(accepted: float, steps: float) -> float:
    """Tokens committed per verify step: accepted drafts plus the bonus token."""
    return (accepted + steps) / steps if steps else 0.0


def acceptance_rate(accepted: float, drafted: float) -> float:
    return accepted / drafted if drafted else 0.0


@dataclass
class SpecDecodeStats:
    num_spec_steps: int = 0  # verify forwards after the prefill
    num_drafts: int = 0  # steps that verified at least one drafted token
    num_draft_tokens: int = 0  # drafted tokens verified (tree nodes)
    num_accepted_tokens: int = 0  # drafted tokens accepted
    accepted_per_pos: list[int] = field(default_factory=list)  # accepted count by draft position
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    num_output_tokens: int = 0

    def observe_step(self, num_draft_tokens: int, num_accepted: int,
                     draft_time_s: float, verify_time_s: float) -> None:
        self.num_spec_steps += 1
        if num_draft_tokens:
            self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if num_accepted > len(self.accepted_per_pos):
            self.accepted_per_pos.extend([0] * (num_accepted - len(self.accepted_per_pos)))
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1
        self.draft_time_s += draft_time_s
        self.verify_time_s += verify_time_s

    @property
    def mean_acceptance_length(self) -> float:
        return mean_acceptance_length(self.num_accepted_tokens, self.num_spec_steps)

    @property
    def draft_acceptance_rate(self) -> float:
        return acceptance_rate(self.num_accepted_tokens, self.num_draft_tokens)

    def merge(self, other: SpecDecodeStats) -> None:
        self.num_spec_steps += other.num_spec_steps
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        if len(other.accepted_per_pos) > len(self.accepted_per_pos):
            self.accepted_per_pos.extend(
                [0] * (len(other.accepted_per_pos) - len(self.accepted_per_pos)))
        for i, n in enumerate(other.accepted_per_pos):
            self.accepted_per_pos[i] += n
        self.draft_time_s += other.draft_time_s
        self.verify_time_s += other.verify_time_s
        self.num_output_tokens += other.num_output_tokens

    def summary(self, arm: str) -> dict:
        """The ``spec_decode`` object of an HTTP response."""
        return {
            "arm": arm,
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "draft_acceptance_rate": round(self.draft_acceptance_rate, 4),
            "num_spec_steps": self.num_spec_steps,
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "num_accepted_tokens_per_pos": list(self.accepted_per_pos),
        }
