"""A pure, deterministic simulation of the router against an in-process statistics store.

The harness of the router's simulation tests: simulated requests drawn from a traffic
mix of context buckets, each routed by ``ArmRouter``, served at a goodput sampled from a known
truth per (bucket, arm), and recorded in an ``InProcessStatsStore`` the router follows (each
record prepares its bucket's next route), as in the ingress. Time is an injected clock advanced
per request, so the store's decay is deterministic; everything random flows from one seed. (The
router's decision time is measured where it is timed against real decoding: ``s3d bench``.)
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.policy import ArmRouter, Priors
from router.store import InProcessStatsStore, StatsKey
from workers.stats import SpecDecodeStats

MODEL = "sim-model"


@dataclass(frozen=True)
class ArmTruth:
    """The true goodput of one arm in one bucket: a mean and a relative (lognormal) noise."""

    mean: float  # tokens / s, the mean of one request's draws
    rel_noise: float = 0.1

    def sample(self, rng: random.Random) -> float:
        """A mean-preserving lognormal draw."""
        sigma = math.sqrt(math.log1p(self.rel_noise ** 2))
        return self.mean * math.exp(rng.gauss(-sigma ** 2 / 2, sigma))

    @property
    def throughput(self) -> float:
        """Tokens over decoding time of many requests, what the store estimates and the router
        ranks arms by: every request decodes the same tokens, so it is the harmonic mean of the
        draws, ``1 / E[1 / g]``. For ``g = mean * exp(Z)``, ``Z ~ N(-s^2 / 2, s^2)`` with
        ``s^2 = log(1 + rel_noise^2)``, ``E[exp(-Z)] = exp(s^2)``: ``mean / (1 + rel_noise^2)``.
        Below ``mean``, the more so the noisier the arm, so a noisy arm with the higher mean can
        be the slower one."""
        return self.mean / (1 + self.rel_noise ** 2)


Truth = Mapping[str, Mapping[str, ArmTruth]]  # bucket -> arm -> truth


def best_arm(arms: Mapping[str, ArmTruth]) -> str:
    return max(arms, key=lambda arm: arms[arm].throughput)


def total_rate(goodputs: Sequence[float]) -> float:
    """Tokens over time of requests that decode the same tokens each at these goodputs."""
    return len(goodputs) / sum(1 / g for g in goodputs) if goodputs else 0.0


@dataclass(frozen=True)
class SimRecord:
    """One simulated request: what the router chose and what the best choice was worth."""

    index: int
    time_s: float
    bucket: str
    arm: str
    best_arm: str
    goodput: float  # sampled goodput of the chosen arm
    arm_throughput: float  # true throughput of the chosen arm (``ArmTruth.throughput``)
    best_throughput: float  # true throughput of the bucket's best arm at the time

    @property
    def regret(self) -> float:
        """Expected goodput lost to the choice (pseudo-regret: free of the sampling noise)."""
        return self.best_throughput - self.arm_throughput


@dataclass(frozen=True)
class SimSummary:
    """Figures over a window of requests; the goodputs are its tokens over its decoding time
    (``total_rate``), as the bench and the store count them."""

    requests: int
    regret: float  # summed over the window
    achieved_goodput: float  # at the sampled goodputs of the chosen arms
    expected_goodput: float  # at the true throughputs of the chosen arms
    best_goodput: float  # at the true throughputs of the per-bucket best arms
    best_arm_share: dict[str, float]  # per bucket, share of its requests on the best arm

    @property
    def regret_per_request(self) -> float:
        return self.regret / self.requests if self.requests else 0.0

    @property
    def goodput_ratio(self) -> float:
        """Expected goodput achieved relative to always choosing each bucket's best arm."""
        return self.expected_goodput / self.best_goodput if self.best_goodput else 0.0


@dataclass(frozen=True)
class SimResult:
    records: list[SimRecord]

    @property
    def cumulative_regret(self) -> float:
        return sum(r.regret for r in self.records)

    def summary(self, start: int = 0, stop: int | None = None) -> SimSummary:
        """Figures over ``records[start:stop]``."""
        window = self.records[start:stop]
        return SimSummary(requests=len(window),
                          regret=sum(r.regret for r in window),
                          achieved_goodput=total_rate([r.goodput for r in window]),
                          expected_goodput=total_rate([r.arm_throughput for r in window]),
                          best_goodput=total_rate([r.best_throughput for r in window]),
                          best_arm_share=_best_arm_share(window))

    def best_arm_share_last(self, k: int) -> dict[str, float]:
        """Per bucket, the share of that bucket's last ``k`` requests on the best arm."""
        per_bucket: dict[str, list[SimRecord]] = {}
        for record in self.records:
            per_bucket.setdefault(record.bucket, []).append(record)
        return {bucket: _best_arm_share(records[-k:])[bucket]
                for bucket, records in per_bucket.items()}


def _best_arm_share(records: Sequence[SimRecord]) -> dict[str, float]:
    hits: dict[str, list[int]] = {}
    for record in records:
        counts = hits.setdefault(record.bucket, [0, 0])
        counts[0] += record.arm == record.best_arm
        counts[1] += 1
    return {bucket: on_best / total for bucket, (on_best, total) in hits.items()}


class SimClock:
    """The injected clock: seconds that only move when the simulation says so."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def simulate(truth: Truth, mix: Mapping[str, float], requests: int, seed: int, *,
             changes: Mapping[int, Truth] | None = None, default_arm: str | None = None,
             prior: dict[str, float] | None = None, mode: str = "adaptive",
             half_life_s: float = 3600.0, interval_s: float = 1.0,
             output_tokens: int = 128, exploration: str = "ucb",
             feedback_delay_s: float | None = None) -> SimResult:
    """Route ``requests`` simulated requests and return what happened to each.

    ``truth`` gives every bucket of ``mix`` (bucket -> traffic weight) the true goodput of every
    arm; ``changes`` maps a request index to the truth from that request on (drift). Requests
    arrive every ``interval_s`` seconds of the injected clock; the store decays with
    ``half_life_s``. The arms are those of the first bucket; the default arm is the first arm
    unless given; ``exploration`` is the router's (``ArmRouter``).

    A request's record reaches the store at once (None), as if requests took turns, or
    ``feedback_delay_s`` after the request finished decoding, its ``output_tokens`` at its
    sampled goodput (as a fleet's records reach the ingress: decoding, the replica's flush and
    the ingress's refresh), so requests of a busy bucket are routed before the figures of the
    ones in flight are known.
    """
    arms = list(next(iter(truth.values())))
    clock = SimClock()
    store = InProcessStatsStore(half_life_s=half_life_s, clock=clock)
    default = default_arm or arms[0]
    router = ArmRouter(arms, default, Priors.of(arms, default, prior), mode,
                       rng=random.Random(f"{seed}:router"), exploration=exploration)
    # As an ingress's router with Redis: requests in flight count as pending until their
    # records land (at once, or ``feedback_delay_s`` after decoding).
    router.follow(store, MODEL, count_pending=True)
    rng = random.Random(f"{seed}:traffic")
    buckets, weights = list(mix), list(mix.values())
    records = []
    current = truth
    in_flight: list[tuple[float, int, StatsKey, float]] = []  # (lands at, index, key, time)
    for index in range(requests):
        while in_flight and in_flight[0][0] <= clock.now:
            _, _, key, decode_s = heapq.heappop(in_flight)
            store.record(key, SpecDecodeStats(num_output_tokens=output_tokens), decode_s)
        current = (changes or {}).get(index, current)
        bucket = rng.choices(buckets, weights)[0]
        arm = router.choose(bucket)
        goodput = current[bucket][arm].sample(rng)
        # The first token comes with the prompt; the others take the decode time.
        decode_s = (output_tokens - 1) / goodput
        if feedback_delay_s is None:
            store.record(StatsKey(MODEL, bucket, arm),
                         SpecDecodeStats(num_output_tokens=output_tokens), decode_s)
        else:
            heapq.heappush(in_flight, (clock.now + decode_s + feedback_delay_s, index,
                                       StatsKey(MODEL, bucket, arm), decode_s))
        best = best_arm(current[bucket])
        records.append(SimRecord(index, clock.now, bucket, arm, best, goodput,
                                 current[bucket][arm].throughput, current[bucket][best].throughput))
        clock.now += interval_s
    return SimResult(records)
