"""The router's policy: a context bucket from cheap request features, and an arm per request.

Arms are scored by goodput (output tokens per second of decoding) measured by the whole fleet and
read from the statistics store's in-process snapshot (never awaited per request). Each arm's
goodput gets a normal posterior around its decayed mean (``posteriors``), with the
profile's measured figure (for the bucket's prompt class when the search measured one; sampled
figures for a temperature bucket the profile measured sampled, else the greedy ones) as a prior
worth ``prior_weight`` requests of a default spread (for buckets that decode as the measurement
did, as many as its paired comparison of the arms on the same prompts is worth:
``paired_prior_weights``), while the bucket's own observed spread of per-request goodput
(``observed_noise``) sets how fast observations settle an arm. The router first calibrates the
prior to the bucket (``calibrated_prior``): profile figures, or the unit-less defaults when there
are none, only say how arms compare, while the bucket's observations set the scale. The arm is
the one with the highest upper quantile of its posterior, the quantile rising with the bucket's
traffic (Bayes-UCB, ``bayes_ucb_choice``), or the highest draw from it (Thompson sampling).

Bayes-UCB is deterministic given a bucket's figures, so a router that follows a store
(``ArmRouter.follow``) chooses a bucket's arm when the store's figures for it change, off the
request path, and a request only classifies its prompt and looks its bucket's route up. Such a
router also counts the requests it sent out as pending observations on their arms until their
records reach its figures (``ArmRouter.route``): the next request of a busy bucket is then
chosen again, on the request, with them counted in.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.store import ArmStats, StatsStore
    from workers.arm import Arm, Profile

log = logging.getLogger(__name__)

# Drafters that run one draft forward per level of depth: their depth trades draft time against
# accepted tokens. The others draft every level at once (S3D's masks) or for free (n-gram).
PER_LEVEL_DRAFTERS = ("skip_chain", "skip_tree")
# Relative spread of one request's goodput before a bucket has shown its own, and how many
# requests that assumption weighs against the bucket's observed spread.
DEFAULT_REL_NOISE = 0.3
NOISE_PSEUDO_REQUESTS = 4.0
# How far traffic may sit from the calibration prompts (relative goodput): it bounds how sure a
# paired comparison on those prompts can make the router, at (0.3 / 0.05)**2 = 36 requests.
PRIOR_SHIFT = 0.05
# Verify steps an arm needs in a bucket before the router sets its depth from them.
MIN_DEPTH_STEPS = 32
# How the adaptive router explores: Bayes-UCB (deterministic; a bucket's first requests trust
# the prior, optimism grows with its traffic) or Thompson sampling (random draws from the same
# posteriors; spreads concurrent requests of a bucket over the arms).
EXPLORATIONS = ("ucb", "thompson")
_STANDARD_NORMAL = NormalDist()
# A prepared route (``ArmRouter.follow``) is chosen again, even without new figures, once it is
# this many of the store's half-lives old (3 minutes at an hour): its figures' decay since has
# moved them 3.4%, less than one request moves a bucket with 30 behind it.
ROUTE_MAX_AGE_HALF_LIVES = 0.05
# A request a following router sent out counts as pending (``posteriors``) until its bucket's
# figures show a record more on its arm: while it decodes (at most this long: a request whose
# end the router never hears of)...
PENDING_MAX_S = 600.0
# ...and, once it ended with its figures recorded, for this many times the store's feedback lag
# (the replica's flush and the ingress's refresh) and a second more.
LANDING_LAGS = 2.0

# A chat request whose messages carry at least this many characters has a document to work from
# (a text to summarise, extract from or answer about; a long conversation): answers copy from it.
DOCUMENT_CHARS = 500

# The share of a prompt's last 40 non-empty lines that must look like source for it to be code.
CODE_SHARE = 0.3
# A line that looks like source: a statement (a keyword with the shape Python gives it), an
# assignment, a bare call, a comment, a brace or semicolon at the end, or an operator prose rarely
# has (not in a sentence: "What does a == b return?"). Prose about code (a colon at the end,
# "with", "for", "heappop()", indentation) is not.
# Matched at a line's start (``CODE_START.match``), the brace or semicolon checked at its end
# apart (``CODE_END``): one pattern searched at every position of a line cost four times as much
# on the shipped prompts, most on a document's long lines, and the class is read on the request
# path.
CODE_START = re.compile(
    r"\s*(def|class)\s+\w+\s*[(:]|\s*import\s+[\w.]+|\s*from\s+[\w.]+\s+import\b"
    r"|\s*(return|yield|raise)\b|\s*(if|elif|while|for|with|except)\b.*:\s*$"
    r"|\s*(else|try|finally)\s*:\s*$|\s*(continue|break|pass)\s*$"
    r"|\s*[A-Za-z_][\w.]*(\[[^\]]*\])?\s*[-+*/%|&]?=\s*\S"
    r"|\s*[A-Za-z_][\w.]*\(.*\)\s*(#.*)?$|\s*//")
CODE_END = ("{", "}", ";")
# ...or an operator prose rarely has, on a line that does not end as a sentence does (tested
# apart: a lookahead for the sentence's end after each operator took time quadratic in the
# line's length, 1.5 s for one 100,000-character line).
CODE_OPERATOR = re.compile(r"==|->")
SENTENCE_END = (".", "?", "!")
# What is classified of a prompt: its last this many characters (the last 40 non-empty lines
# of source fit). A request's class then costs the same whatever its length.
CLASSIFY_CHARS = 16_384
# Lines longer than this (leading whitespace aside) are not read for a statement's shape, only
# for their end and operators: each alternative of ``CODE_START`` may scan a line whole, so a
# request of a few long lines of spaces or dots cost the decision over a millisecond, while a line
# of source is rarely a quarter as long (minified code ends with ";" or a brace).
STATEMENT_CHARS = 256
# A line opening with "#": a comment in source, or a markdown heading (or "#1 tip ..."). It counts
# as source only beside other source lines.
HASH_LINE = re.compile(r"^\s*#")


def conversation_text(messages: list[Mapping[str, str]]) -> str:
    """What a chat request's class is read from: its messages' contents, without the system
    prompt (instructions, not a document the answer copies from) unless that is all there is."""
    said = [m["content"] for m in messages if m.get("role") != "system"]
    return "\n".join(said if said else [m["content"] for m in messages])


def classify_prompt(text: str, is_chat: bool) -> str:
    """``code`` when the text looks like source code; for messages (``text``: their contents)
    ``doc`` when they carry a document (``DOCUMENT_CHARS`` or more), else ``chat``; else
    ``prose``. Drafters fare differently by class: answers about a document copy from it (n-gram
    drafts pay), short chat answers do not."""
    tail = text[-CLASSIFY_CHARS:]
    lines = tail.splitlines()
    if len(tail) < len(text) and lines:
        lines = lines[1:]  # cut in the middle
    lines = [line for line in lines if line.strip()][-40:]
    # Code when at least 30% of them look like source, "#" lines among them once another line
    # does; the count stops once that is settled.
    others = [line for line in lines if not HASH_LINE.match(line)]
    hashes = len(lines) - len(others)
    needed = math.ceil(CODE_SHARE * len(lines) - 1e-9) - hashes
    spare = len(others) - max(needed, 1)  # lines that may fail before code is out of reach
    for line in others:
        end, start = line.rstrip(), line.lstrip()
        if ((len(start) <= STATEMENT_CHARS and CODE_START.match(start))
                or end.endswith(CODE_END)
                or (CODE_OPERATOR.search(line) and not end.endswith(SENTENCE_END))):
            needed -= 1
            if needed <= 0:
                return "code"
        else:
            spare -= 1
            if spare < 0:
                break
    if not is_chat:
        return "prose"
    return "doc" if len(text.strip()) >= DOCUMENT_CHARS else "chat"


# Every value of a context bucket's fields: ``classify_prompt``, ``temperature_bucket``,
# ``length_bucket``.
PROMPT_CLASSES = ("code", "doc", "chat", "prose")
TEMPERATURE_BUCKETS = ("t0", "tlo", "thi")
LENGTH_BUCKETS = ("ps", "pm", "pl")


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


def all_buckets() -> list[str]:
    """Every context bucket ``context_bucket`` can return."""
    return [".".join(fields) for fields
            in itertools.product(PROMPT_CLASSES, TEMPERATURE_BUCKETS, LENGTH_BUCKETS)]


@dataclass(frozen=True)
class ArmEstimate:
    """What the router knows of one arm in one bucket."""

    goodput: float  # tokens / s
    requests: float  # decayed count of requests behind the figure
    stats: ArmStats | None = None  # the record behind it (acceptance curve, draft/verify time)
    lifetime_requests: float | None = None  # requests ever on the arm, undecayed (None: requests)

    @property
    def traffic(self) -> float:
        return self.requests if self.lifetime_requests is None else self.lifetime_requests


@dataclass(frozen=True)
class Route:
    """The router's decision for one request: an arm, and the draft depth to run it with
    (None: the arm's own)."""

    arm: str
    depth: int | None = None


@dataclass(eq=False)  # each is its own: ``list.remove`` must find this one, not its equal
class _Sent:
    """One record of a request sent out, pending in the router's figures until ``due``."""

    due: float
    finished: bool = False


@dataclass(frozen=True)
class PreparedRoute:
    """A bucket's arm chosen ahead of its requests (``ArmRouter.prepare``): when, and the
    bucket's record of the arm then (its depth is drawn per request from it)."""

    arm: str
    at: float
    stats: ArmStats | None


def posteriors(estimates: dict[str, ArmEstimate], prior: dict[str, float],
               prior_weight: float | Mapping[str, float] = 2.0,
               rel_noise: float = DEFAULT_REL_NOISE, obs_noise: float | None = None,
               pending: Mapping[str, float] | None = None
               ) -> Iterator[tuple[str, float, float]]:
    """Each arm of ``prior`` with the mean and spread of its goodput's normal posterior.

    A normal model with relative spreads: the prior (profile figure) is as sure as
    ``prior_weight`` requests of spread ``rel_noise``; one request's goodput spreads by
    ``obs_noise`` (default ``rel_noise``) of the mean. So the prior counts as
    ``w = prior_weight * (obs_noise / rel_noise) ** 2`` requests, the posterior mean blends it
    with the observed mean (weight = requests) and its spread is
    ``obs_noise * mean / sqrt(w + requests)``: an arm nobody has tried keeps the prior's spread
    whatever ``obs_noise`` is, while steady observations settle an arm sooner than noisy ones.
    ``prior_weight`` may differ by arm (a mapping; arms not in it weigh 2 requests).

    ``pending``: requests per arm sent out whose figures are not in yet. Each counts as an
    observation at the posterior's mean (its spread shrinks, its mean stays): a batch's
    "hallucinated" observations, so the requests of a busy bucket routed before their
    predecessors' figures arrive do not all follow one optimistic choice.
    """
    noise = rel_noise if obs_noise is None else obs_noise
    pending = pending or {}
    for arm, prior_goodput in prior.items():
        weight = (prior_weight.get(arm, 2.0) if isinstance(prior_weight, Mapping)
                  else prior_weight) * (noise / rel_noise) ** 2
        est = estimates.get(arm)
        n = est.requests if est else 0.0
        mean = (prior_goodput * weight + (est.goodput * n if est else 0.0)) / (weight + n)
        yield arm, mean, noise * max(mean, 1e-6) / math.sqrt(weight + n + pending.get(arm, 0.0))


def thompson_choice(estimates: dict[str, ArmEstimate], prior: dict[str, float],
                    prior_weight: float | Mapping[str, float] = 2.0,
                    rel_noise: float = DEFAULT_REL_NOISE,
                    rng: random.Random | None = None, obs_noise: float | None = None,
                    pending: Mapping[str, float] | None = None) -> str:
    """Sample a goodput for each arm from its posterior (``posteriors``, ``pending`` requests
    counted in); return the arm with the highest sample."""
    rng = rng or random
    best, best_value = None, -math.inf
    for arm, mean, spread in posteriors(estimates, prior, prior_weight, rel_noise, obs_noise,
                                        pending):
        value = rng.gauss(mean, spread)
        if value > best_value:
            best, best_value = arm, value
    return best


def ucb_quantile(requests: float) -> float:
    """Bayes-UCB's quantile after ``requests`` requests in a bucket: ``1 - 1 / (t + 1)`` with
    ``t = requests + 1``, the median (the posterior mean) for a bucket's first request.

    ``requests`` counts the bucket's whole traffic, undecayed: the posteriors forget old
    requests, but the quantile must keep rising with the traffic that rides on the choice. A
    decayed count levels off (at rate x half-life / ln 2: 8.7 requests for one every 10 minutes
    with an hour's half-life), and so would the optimism: an arm the prior puts behind would
    never be tried however far ahead it really is."""
    return 1.0 - 1.0 / (max(requests, 0.0) + 2.0)


def bayes_ucb_choice(estimates: dict[str, ArmEstimate], prior: dict[str, float],
                     prior_weight: float | Mapping[str, float] = 2.0,
                     rel_noise: float = DEFAULT_REL_NOISE, obs_noise: float | None = None,
                     pending: Mapping[str, float] | None = None) -> str:
    """The arm whose posterior (``posteriors``) has the highest ``ucb_quantile`` quantile, for
    the requests the bucket has seen (Bayes-UCB). A bucket's first requests go to the arm
    the prior and the observations make likeliest best; optimism grows with the bucket's
    traffic, so an arm whose posterior still allows it to lead gets tried once enough requests
    ride on the answer. Deterministic given the figures and the ``pending`` requests (counted
    in the traffic and the posteriors); ties go to the earlier arm of ``prior``."""
    pending = pending or {}
    seen = sum(est.traffic for arm, est in estimates.items() if arm in prior)
    seen += sum(count for arm, count in pending.items() if arm in prior)
    z = _STANDARD_NORMAL.inv_cdf(ucb_quantile(seen))
    best, best_value = None, -math.inf
    for arm, mean, spread in posteriors(estimates, prior, prior_weight, rel_noise, obs_noise,
                                        pending):
        value = mean + z * spread
        if value > best_value:
            best, best_value = arm, value
    return best


def observed_noise(estimates: dict[str, ArmEstimate], default: float = DEFAULT_REL_NOISE,
                   pseudo_requests: float = NOISE_PSEUDO_REQUESTS) -> float:
    """How widely one request's goodput spreads in a bucket, relative to its mean.

    The arms' sample variances (from the stored per-request goodput sums) are pooled, as the
    bucket's prompts vary alike under every arm, and shrunk towards ``default`` with the weight
    of ``pseudo_requests`` requests, so a few lucky-alike requests cannot make the router sure.
    """
    total, dof = pseudo_requests * default ** 2, pseudo_requests
    for est in estimates.values():
        spread = est.stats.goodput_relative_variance if est.stats is not None else None
        if spread is not None:
            total += spread[0] * spread[1]
            dof += spread[1]
    return math.sqrt(total / dof)


def paired_prior_weights(per_prompt: Mapping[str, list[float]],
                         rel_noise: float = DEFAULT_REL_NOISE, shift: float = PRIOR_SHIFT,
                         floor: float = 0.0) -> dict[str, float]:
    """How many requests each arm's measured prior is worth, from a paired comparison.

    ``per_prompt``: each arm's goodput on the same calibration prompts, in the same order. What
    makes one request's goodput spread (``rel_noise``) is mostly the prompt, and the prompt cancels
    in the ratio of two arms on it: the standard error of an arm's mean log-ratio to the best arm
    (to the runner-up, for the best arm itself), widened by ``shift`` for traffic unlike the
    calibration prompts, is how far its prior may be off, relative. A prior that sure weighs
    ``(rel_noise / spread) ** 2`` requests, at least ``floor``. Empty with fewer than two arms
    or two prompts.
    """
    logs = {arm: [math.log(max(v, 1e-9)) for v in values] for arm, values in per_prompt.items()}
    sizes = {len(v) for v in logs.values()}
    if len(logs) < 2 or len(sizes) != 1 or sizes.pop() < 2:
        return {}
    ranked = sorted(logs, key=lambda arm: -sum(logs[arm]))
    weights = {}
    for arm, values in logs.items():
        ref = logs[ranked[1] if arm == ranked[0] else ranked[0]]
        diffs = [a - b for a, b in zip(values, ref)]
        mean = sum(diffs) / len(diffs)
        var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
        spread = math.sqrt(var / len(diffs) + shift ** 2)
        weights[arm] = max(floor, (rel_noise / spread) ** 2)
    return weights


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


def expected_tokens(acceptance: list[float], depth: int) -> float:
    """Tokens one verify step commits with drafts ``depth`` deep: the bonus token plus the
    expected accepted drafts, ``1 + sum_{j<depth} prod_{i<=j} acceptance[i]``, where
    ``acceptance[j]`` is the chance that position ``j`` is accepted once the walk reaches it."""
    total, run = 1.0, 1.0
    for a in acceptance[:depth]:
        run *= a
        total += run
    return total


def best_depth(acceptance: list[float], verify_s: float, level_s: float, max_depth: int) -> int:
    """The depth ``d <= max_depth`` with the most tokens per second of a step costing
    ``verify_s + d * level_s`` (DESIGN.md's expected-speedup formula, per depth)."""
    return max(range(1, max_depth + 1),
               key=lambda d: expected_tokens(acceptance, d) / (verify_s + d * level_s))


def choose_depth(arm: Arm, stats: ArmStats | None, rng: random.Random | None = None,
                 min_steps: float = MIN_DEPTH_STEPS) -> int | None:
    """The draft depth for a request on ``arm`` from the bucket's record of it, or None (the
    arm's own depth) for drafters whose depth costs no draft time or without enough steps.

    Thompson sampling again: each position's acceptance is drawn from its Beta posterior
    (accepted vs reached counts, uniform prior), so positions the router stopped drafting keep a
    chance of being tried; the draft time per level and the verify time per step are measured.
    """
    if (arm.drafter not in PER_LEVEL_DRAFTERS or stats is None or arm.depth <= 1
            or stats.num_spec_steps < min_steps or stats.num_draft_levels <= 0
            or stats.verify_time_s + stats.draft_time_s <= 0):
        return None
    rng = rng or random
    accepted, tried = stats.accepted_per_pos, stats.tried_per_pos
    acceptance = []
    for j in range(arm.depth):
        hits = accepted[j] if j < len(accepted) else 0.0
        reached = tried[j] if j < len(tried) else 0.0
        acceptance.append(rng.betavariate(1.0 + hits, 1.0 + max(reached - hits, 0.0)))
    return best_depth(acceptance, stats.verify_time_s / stats.num_spec_steps,
                      stats.draft_time_s / stats.num_draft_levels, arm.depth)


@dataclass(frozen=True)
class Priors:
    """What the router believes of the arms before a bucket's own observations, from one
    measurement (greedy, or sampled in one temperature bucket): goodput overall and per prompt
    class, and how many requests it weighs (per class and arm from the paired comparison
    on the calibration prompts, where there was one; else ``weight``)."""

    overall: dict[str, float]
    by_class: dict[str, dict[str, float]]
    weight: float
    class_weights: dict[str, dict[str, float]]

    @classmethod
    def of(cls, arms: list[str], default_arm: str, overall: dict[str, float] | None = None,
           by_class: dict[str, dict[str, float]] | None = None, weight: float = 2.0,
           class_weights: dict[str, dict[str, float]] | None = None) -> Priors:
        """Every arm given a figure: without measured ones every arm starts equal, the default
        slightly ahead; an arm the measurement left out starts so beside the measured ones (at
        the measured default's figure, or their median, not at a bare 1.0 among tokens per
        second); a class's missing arms take their overall figure (plain decoding's speed hardly
        depends on the class; a drafting arm's would only be guessed). Paired weights are never
        below ``weight``."""
        overall = overall or {}
        known = [overall[a] for a in arms if a in overall]
        scale = overall.get(default_arm, statistics.median(known)) if known else 1.0
        base = {a: overall.get(a, scale * (1.0 if a == default_arm else 0.9)) for a in arms}
        return cls(base,
                   {c: {a: values.get(a, base[a]) for a in arms}
                    for c, values in (by_class or {}).items()},
                   weight,
                   {c: {a: max(weight, w.get(a, 0.0)) for a in arms}
                    for c, w in (class_weights or {}).items() if w})

    @classmethod
    def measured(cls, profile: Profile, arms: list[str], default_arm: str,
                 dtype: str | None = None, temperature: str | None = None) -> Priors:
        """A profile's measurement in ``dtype`` (and ``temperature``, see
        ``Profile.measurement``), weighed as many requests as the search decoded per class, or
        as many as the paired comparison of the arms on those prompts is worth."""
        overall, by_class = profile.measured_goodput(dtype, temperature)
        weight = float(profile.measurement(dtype, temperature).get("prior_weight", 2.0))
        return cls.of(arms, default_arm, overall or None, by_class, weight,
                      {c: paired_prior_weights(v, floor=weight)
                       for c, v in profile.measured_per_prompt(dtype, temperature).items()})

    def lookup(self, prompt_class: str, paired: bool
               ) -> tuple[dict[str, float], float | dict[str, float]]:
        """The prior for a bucket of ``prompt_class`` and its weight: the paired weights only
        when the bucket's requests decode as the measurement did (``paired``)."""
        prior = self.by_class.get(prompt_class, self.overall)
        weight: float | dict[str, float] = self.weight
        if paired:
            weight = self.class_weights.get(prompt_class, weight)
        return prior, weight


class ArmRouter:
    """Picks an arm per request: pinned, fixed (the default arm) or adaptive (Bayes-UCB or
    Thompson sampling over the arms' goodput posteriors)."""

    def __init__(self, arms: list[str], default_arm: str, greedy: Priors | None = None,
                 mode: str = "adaptive",
                 estimates: Callable[[str], dict[str, ArmEstimate]] | None = None,
                 rng: random.Random | None = None, specs: dict[str, Arm] | None = None,
                 sampled: dict[str, Priors] | None = None, exploration: str = "ucb"):
        if default_arm not in arms:
            raise ValueError(f"default arm {default_arm!r} is not one of {arms}")
        if exploration not in EXPLORATIONS:
            raise ValueError(f"exploration {exploration!r} is not one of {EXPLORATIONS}")
        self.exploration = exploration
        self.arms = list(arms)
        self.default_arm = default_arm
        # The search decodes greedily: its figures, per prompt class, with the paired weights
        # for greedy buckets (other buckets weigh them ``prior_weight`` requests; without
        # figures every arm starts equal, the default slightly ahead)...
        self.greedy = greedy or Priors.of(self.arms, default_arm)
        # ...unless the profile measured the bucket's temperature itself (``sampled``).
        self.sampled = dict(sampled or {})
        for priors in (self.greedy, *self.sampled.values()):
            if set(priors.overall) != set(self.arms):
                raise ValueError(f"priors for {sorted(priors.overall)}, not the arms {arms}")
        self.mode = mode
        self.estimates = estimates or (lambda bucket: {})
        self.rng = rng or random.Random()
        # The arms' settings, where known: the router then also sets layer-skip drafts' depth.
        self.specs = dict(specs or {})
        # Routes chosen ahead of requests, by bucket, once the router follows a store.
        self._following = False
        self._routes: dict[str, PreparedRoute] = {}
        self.clock: Callable[[], float] = time.monotonic
        self.route_max_age_s = math.inf
        self.prepared_s = 0.0  # time spent choosing routes ahead of requests, in all
        self.chosen_on_request = 0  # Bayes-UCB arms a following router had not prepared
        # Records of requests sent out that a following router has not seen in its figures
        # yet: by bucket and arm, in the order routed; and each arm's traffic at its last look.
        self._pending: dict[str, dict[str, list[_Sent]]] = {}
        self._traffic_seen: dict[str, dict[str, float]] = {}
        self._next_due: dict[str, float] = {}  # by bucket, when its next pending one is overdue
        self._counts_pending = False
        self._store: StatsStore | None = None  # followed
        self.pending_max_s = PENDING_MAX_S
        self.landing_s = 1.0

    def choose(self, bucket: str, pinned: str | None = None) -> str:
        return self.route(bucket, pinned).arm

    def route(self, bucket: str, pinned: str | None = None, sent: int = 1) -> Route:
        """A pinned arm runs as it is; ``fixed`` mode runs the default arm; else the arm by
        Bayes-UCB or Thompson sampling (``exploration``) over goodput, and its depth from the
        bucket's acceptance curve. A router following a store looks a Bayes-UCB arm up among
        the prepared routes and chooses it here only when the bucket has none younger than
        ``route_max_age_s``.

        An adaptive router following a store counts the ``sent`` records the request will make
        (its choices; 0 for a decision no request runs) as pending on its arm until the
        store's figures show them, and chooses the bucket's next arm with them counted in
        (``posteriors``): requests routed before their predecessors' figures arrive would
        otherwise all follow one choice."""
        route = self._route(bucket, pinned)
        if sent > 0 and self._counts_pending and self.mode == "adaptive":
            now = self.clock()
            self._expire(bucket, now)
            due = now + self.pending_max_s
            self._pending.setdefault(bucket, {}).setdefault(route.arm, []).extend(
                _Sent(due) for _ in range(sent))
            self._next_due[bucket] = min(self._next_due.get(bucket, math.inf), due)
            self._routes.pop(bucket, None)
        return route

    def finished(self, bucket: str, arm: str, recorded: int, lost: int = 0) -> None:
        """A request ``route`` sent to ``arm`` ended: ``recorded`` of its records are on their
        way (they stay pending for the store's feedback lag, ``landing_s``, at most) and
        ``lost`` never will be (it failed, was refused or its client left first): those stop
        counting now."""
        now = self.clock()
        self._expire(bucket, now)
        sent = self._pending.get(bucket, {}).get(arm)
        if not sent:
            return
        running = [entry for entry in sent if not entry.finished]
        lost = min(max(lost, 0), len(running))
        for entry in running[len(running) - lost:]:
            sent.remove(entry)
        due = now + self.landing_s
        for entry in running[:max(min(recorded, len(running) - lost), 0)]:
            entry.finished, entry.due = True, due
            self._next_due[bucket] = min(self._next_due.get(bucket, math.inf), due)
        if lost:  # the bucket's next arm is chosen with fewer pending
            self._routes.pop(bucket, None)

    def pending(self, bucket: str) -> dict[str, int]:
        """The bucket's records sent out, not yet in its figures and not overdue, by arm."""
        self._expire(bucket, self.clock())
        return {arm: len(sent) for arm, sent in self._pending.get(bucket, {}).items() if sent}

    def _route(self, bucket: str, pinned: str | None) -> Route:
        if pinned is not None:
            if pinned not in self.arms:
                raise KeyError(pinned)
            return Route(pinned)
        if self.mode == "fixed":
            return Route(self.default_arm)
        if self._prepares:
            prepared, now = self._routes.get(bucket), self.clock()
            if (prepared is None or now - prepared.at > self.route_max_age_s
                    or self._next_due.get(bucket, math.inf) < now):  # pending ones overdue
                prepared = self._prepare(bucket)
                self.chosen_on_request += 1
            arm, stats = prepared.arm, prepared.stats
        else:
            arm, stats = self._decide(bucket)
        depth = None
        if arm in self.specs:
            depth = choose_depth(self.specs[arm], stats, self.rng)
        return Route(arm, depth)

    def _decide(self, bucket: str) -> tuple[str, ArmStats | None]:
        """The bucket's arm from its estimates now, and the bucket's record of that arm; the
        default arm, logged, if choosing fails (figures no one foresaw must not fail requests
        that the default arm serves)."""
        try:
            estimates = self.estimates(bucket)
            arm = self._choose(bucket, estimates, self._settle(bucket, estimates))
            if arm not in self.arms:  # e.g. no score comparable (NaN figures)
                raise ValueError(f"no arm chosen: {arm!r}")
            return arm, estimates[arm].stats if arm in estimates else None
        except Exception:
            log.exception("choosing an arm for bucket %s failed; routing it to %s", bucket,
                          self.default_arm)
            return self.default_arm, None

    def _expire(self, bucket: str, now: float) -> None:
        """Drop the bucket's pending records past their time, once one is: a bucket whose
        requests are all pinned is never decided, and its list grew by every request."""
        if self._next_due.get(bucket, math.inf) >= now:
            return
        pending = self._pending.get(bucket, {})
        for arm, sent in list(pending.items()):
            sent[:] = [entry for entry in sent if entry.due >= now]
            if not sent:
                del pending[arm]
        self._next_due[bucket] = min((entry.due for sent in pending.values() for entry in sent),
                                     default=math.inf)

    def _settle(self, bucket: str, estimates: dict[str, ArmEstimate]) -> dict[str, int]:
        """The bucket's pending records (``route``), by arm, after crossing off, oldest first,
        as many as each arm's traffic rose since the last look (other ingresses' requests rise
        it too: the count then ends early, never late) and those past their time; none while
        the store is unavailable (no record can arrive: counted, they would explore the arms
        for nothing)."""
        seen = self._traffic_seen.setdefault(bucket, {})
        pending = self._pending.get(bucket, {})
        for arm in list(seen):
            if arm not in estimates:  # expired from the store: its traffic starts again
                del seen[arm]
        for arm, est in estimates.items():
            rise, seen[arm] = est.traffic - seen.get(arm, 0.0), est.traffic
            if arm in pending and rise >= 0.5:
                del pending[arm][:round(rise)]
                if not pending[arm]:
                    del pending[arm]
        self._expire(bucket, self.clock())
        if self._store is None or not self._store.available:
            return {}
        return {arm: len(sent) for arm, sent in pending.items()}

    def _choose(self, bucket: str, estimates: dict[str, ArmEstimate],
                pending: dict[str, int] | None = None) -> str:
        fields = bucket.split(".")
        temperature = fields[1] if len(fields) > 1 else None
        # The paired comparisons were measured on calibration prompts (up to a few hundred
        # tokens): prompts past any of them weigh the prior as the profile's prior_weight.
        calibrated = len(fields) < 3 or fields[2] != LENGTH_BUCKETS[-1]
        if temperature in self.sampled:
            prior, weight = self.sampled[temperature].lookup(fields[0], paired=calibrated)
        else:
            prior, weight = self.greedy.lookup(
                fields[0], paired=calibrated and temperature == temperature_bucket(0.0))
        prior, noise = calibrated_prior(estimates, prior), observed_noise(estimates)
        if self.exploration == "ucb":
            return bayes_ucb_choice(estimates, prior, weight, obs_noise=noise, pending=pending)
        return thompson_choice(estimates, prior, weight, rng=self.rng, obs_noise=noise,
                               pending=pending)

    @property
    def _prepares(self) -> bool:
        """Whether arms are chosen ahead of requests: Bayes-UCB's are, once the router follows a
        store (Thompson sampling draws for each request)."""
        return self._following and self.mode == "adaptive" and self.exploration == "ucb"

    def _prepare(self, bucket: str) -> PreparedRoute:
        arm, stats = self._decide(bucket)
        prepared = PreparedRoute(arm, self.clock(), stats)
        self._routes[bucket] = prepared
        return prepared

    def prepare(self, buckets: Iterable[str] | None = None) -> None:
        """Choose the arms of ``buckets`` (None: every bucket) now, ahead of their requests,
        and again those of the prepared routes past half their maximum age. A router following
        a store is called with the buckets whose figures changed; other routers choose per
        request and prepare nothing."""
        if not self._prepares:
            return
        started, now = time.perf_counter(), self.clock()
        due = dict.fromkeys(all_buckets() if buckets is None else buckets)
        due.update(dict.fromkeys(b for b, prepared in self._routes.items()
                                 if now - prepared.at > self.route_max_age_s / 2))
        for bucket in due:
            self._prepare(bucket)
        self.prepared_s += time.perf_counter() - started

    def follow(self, store: StatsStore, model: str, count_pending: bool | None = None) -> None:
        """Route by ``model``'s figures in ``store``, choosing each bucket's Bayes-UCB arm when
        they change (the store calls ``prepare``: on a record for the in-process store, on a
        refresh for Redis) rather than on each request. A prepared route is chosen again after
        ``ROUTE_MAX_AGE_HALF_LIVES`` of the store's half-life, when the decay has moved its
        figures, on the store's clock. With ``count_pending`` (default: when the store is
        shared, as Redis is, with the decoders that write the records), requests sent out count
        as pending until their records reach the store's figures (``route``); not where no
        decoder writes to ``store``, where they never would."""
        self.estimates = store_estimates(store, model)
        self.clock = store.clock
        self.route_max_age_s = ROUTE_MAX_AGE_HALF_LIVES * store.half_life_s
        self._following = True
        self._routes.clear()
        self._pending.clear()
        self._traffic_seen.clear()
        self._next_due.clear()
        self._counts_pending = store.shared if count_pending is None else count_pending
        self._store = store
        self.landing_s = LANDING_LAGS * store.feedback_lag_s + 1.0
        store.subscribe(model, self.prepare)
        self.prepare()

    @classmethod
    def for_profile(cls, profile: Profile, default_arm: str | None = None,
                    mode: str = "adaptive",
                    estimates: Callable[[str], dict[str, ArmEstimate]] | None = None,
                    rng: random.Random | None = None, dtype: str | None = None,
                    exploration: str = "ucb") -> ArmRouter:
        """A router over a profile's arms, its measured goodput (overall and per prompt class,
        in the serving ``dtype`` where the profile has figures for it) as the prior
        (``Priors.measured``): greedy, and sampled for the temperature buckets the profile
        measured sampled."""
        arms = [a.name for a in profile.arms]
        default = default_arm or profile.default_arm
        return cls(arms, default, Priors.measured(profile, arms, default, dtype), mode,
                   estimates, rng, {a.name: a for a in profile.arms},
                   {t: Priors.measured(profile, arms, default, dtype, t)
                    for t in profile.sampled_measurements(dtype)}, exploration)


def store_estimates(store: StatsStore, model: str) -> Callable[[str], dict[str, ArmEstimate]]:
    """The router's view of a store: per-arm estimates of one bucket from ``snapshot()``."""

    def estimates(bucket: str) -> dict[str, ArmEstimate]:
        return {key.arm: ArmEstimate(stats.goodput_tokens_per_s, stats.requests, stats,
                                     stats.lifetime_requests)
                for key, stats in store.snapshot(model, bucket).items() if stats.requests > 0}

    return estimates
