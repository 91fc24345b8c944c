"""The router's policy: a context bucket from cheap request features, and an arm per request.

Arms are scored by goodput (output tokens per second of decoding) measured by the whole fleet and
read from the statistics store's in-process snapshot (never awaited per request). Exploration is
Thompson sampling: each arm's goodput gets a normal posterior around its decayed mean, with the
profile's measured figure (for the bucket's prompt class when the search measured one) as a prior
worth ``prior_weight`` requests. The router first calibrates the prior to the bucket
(``calibrated_prior``): profile figures, or the unit-less defaults when there are none, only say
how arms compare, while the bucket's observations set the scale.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.store import StatsStore
    from workers.arm import Profile

CODE_PATTERN = re.compile(
    r"(^\s*(def|class|import|from|return|for|if|while)\b|[{};]\s*$|==|->|\(\))", re.MULTILINE)


def classify_prompt(text: str, is_chat: bool) -> str:
    """``code`` when the text looks like source code, else ``chat`` for messages, ``prose``."""
    lines = [line for line in text.splitlines() if line.strip()][-40:]
    if lines:
        code_lines = sum(1 for line in lines if CODE_PATTERN.search(line))
        if code_lines / len(lines) >= 0.3:
            return "code"
    return "chat" if is_chat else "prose"


def temperature_bucket(temperature: float) -> str:
    if temperature <= 0:
        return "t0"
    return "tlo" if temperature <= 0.7 else "thi"


def length_bucket(prompt_tokens: int) -> str:
    if prompt_tokens < 256:
        return "ps"
    return "pm" if prompt_tokens < 1024 else "pl"


def context_bucket(text: str, is_chat: bool, temperature: float, prompt_tokens: int) -> str:
    return ".".join((classify_prompt(text, is_chat), temperature_bucket(temperature),
                     length_bucket(prompt_tokens)))


@dataclass(frozen=True)
class ArmEstimate:
    """What the router knows of one arm in one bucket."""

    goodput: float  # tokens / s
    requests: float  # decayed count of requests behind the figure


def thompson_choice(estimates: dict[str, ArmEstimate], prior: dict[str, float],
                    prior_weight: float = 2.0, rel_noise: float = 0.3,
                    rng: random.Random | None = None) -> str:
    """Sample a goodput for each arm from its posterior; return the arm with the highest sample.

    The posterior mean blends the prior (profile figure, weight ``prior_weight``) with the
    observed mean (weight = requests); its spread is ``rel_noise * mean / sqrt(weight)``.
    """
    rng = rng or random
    best, best_value = None, -math.inf
    for arm, prior_goodput in prior.items():
        est = estimates.get(arm)
        n = est.requests if est else 0.0
        mean = ((prior_goodput * prior_weight + (est.goodput * n if est else 0.0))
                / (prior_weight + n))
        value = rng.gauss(mean, rel_noise * max(mean, 1e-6) / math.sqrt(prior_weight + n))
        if value > best_value:
            best, best_value = arm, value
    return best


def calibrated_prior(estimates: dict[str, ArmEstimate],
                     prior: dict[str, float]) -> dict[str, float]:
    """The prior rescaled so that, over the observed arms, it matches what was observed.

    The factor is the request-weighted ratio of observed to prior goodput. Without it a prior on
    another scale than the bucket's goodput (the unit-less defaults, a profile measured on other
    hardware or prompts) pulls every posterior towards that scale: arms seen rarely or never look
    hopeless next to an observed one and are never explored. Unchanged when nothing is observed.
    """
    observed = sum(est.requests * est.goodput for arm, est in estimates.items() if arm in prior)
    expected = sum(est.requests * prior[arm] for arm, est in estimates.items() if arm in prior)
    if observed <= 0 or expected <= 0:
        return prior
    return {arm: value * observed / expected for arm, value in prior.items()}


class ArmRouter:
    """Picks an arm per request: pinned, fixed (the default arm) or adaptive (Thompson)."""

    def __init__(self, arms: list[str], default_arm: str, prior: dict[str, float] | None = None,
                 mode: str = "adaptive",
                 estimates: Callable[[str], dict[str, ArmEstimate]] | None = None,
                 rng: random.Random | None = None,
                 class_priors: dict[str, dict[str, float]] | None = None,
                 prior_weight: float = 2.0):
        if default_arm not in arms:
            raise ValueError(f"default arm {default_arm!r} is not one of {arms}")
        self.arms = list(arms)
        self.default_arm = default_arm
        # Without measured priors every arm starts equal, the default slightly ahead.
        self.prior = {a: (prior or {}).get(a, 1.0 if a == default_arm else 0.9) for a in arms}
        # Per prompt class (the bucket's first field), falling back to the overall prior per arm.
        self.class_priors = {cls: {a: values.get(a, self.prior[a]) for a in arms}
                             for cls, values in (class_priors or {}).items()}
        self.prior_weight = prior_weight
        self.mode = mode
        self.estimates = estimates or (lambda bucket: {})
        self.rng = rng or random.Random()

    def choose(self, bucket: str, pinned: str | None = None) -> str:
        if pinned is not None:
            if pinned not in self.arms:
                raise KeyError(pinned)
            return pinned
        if self.mode == "fixed":
            return self.default_arm
        estimates = self.estimates(bucket)
        prior = self.class_priors.get(bucket.split(".", 1)[0], self.prior)
        return thompson_choice(estimates, calibrated_prior(estimates, prior),
                               prior_weight=self.prior_weight, rng=self.rng)

    @classmethod
    def for_profile(cls, profile: Profile, default_arm: str | None = None,
                    mode: str = "adaptive",
                    estimates: Callable[[str], dict[str, ArmEstimate]] | None = None,
                    rng: random.Random | None = None) -> ArmRouter:
        """A router over a profile's arms, its measured goodput (overall and per prompt class)
        as the prior, weighed as many requests as the search decoded per class."""
        prior, class_priors = profile.measured_goodput()
        return cls([a.name for a in profile.arms], default_arm or profile.default_arm,
                   prior or None, mode, estimates, rng, class_priors,
                   float(profile.notes.get("prior_weight", 2.0)))


def store_estimates(store: StatsStore, model: str) -> Callable[[str], dict[str, ArmEstimate]]:
    """The router's view of a store: per-arm estimates of one bucket from ``snapshot()``."""

    def estimates(bucket: str) -> dict[str, ArmEstimate]:
        return {key.arm: ArmEstimate(stats.goodput_tokens_per_s, stats.requests)
                for key, stats in store.snapshot(model).items()
                if key.bucket == bucket and stats.requests > 0}

    return estimates
