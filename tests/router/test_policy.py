"""The router's policy: context buckets, Bayes-UCB and Thompson scoring, ``ArmRouter`` and simulated
traffic."""

from __future__ import annotations

import math
import random
from collections import Counter
from functools import cache

import pytest

from router import policy
from router.policy import (
    DEFAULT_REL_NOISE,
    ArmEstimate,
    ArmRouter,
    Priors,
    Route,
    bayes_ucb_choice,
    best_depth,
    calibrated_prior,
    choose_depth,
    classify_prompt,
    context_bucket,
    expected_tokens,
    length_bucket,
    observed_noise,
    paired_prior_weights,
    posteriors,
    store_estimates,
    temperature_bucket,
    thompson_choice,
    ucb_quantile,
)
from router.simulate import ArmTruth, SimClock, SimResult, simulate
from router.store import ArmStats, InProcessStatsStore, StatsKey
from workers.arm import Arm
from workers.stats import SpecDecodeStats

ARMS = ["none", "skip_chain", "skip_tree", "ngram_tree"]
# Best arms: A ngram_tree (+20% over the runner-up), B none (+14%), C skip_tree (+17%).
TRUTH = {
    "A": {"none": ArmTruth(60), "skip_chain": ArmTruth(70), "skip_tree": ArmTruth(75),
          "ngram_tree": ArmTruth(90)},
    "B": {"none": ArmTruth(80), "skip_chain": ArmTruth(70), "skip_tree": ArmTruth(65),
          "ngram_tree": ArmTruth(60)},
    "C": {"none": ArmTruth(50), "skip_chain": ArmTruth(60), "skip_tree": ArmTruth(70),
          "ngram_tree": ArmTruth(55)},
}
MIX = {"A": 0.4, "B": 0.35, "C": 0.25}
SEEDS = (0, 1, 2)
REQUESTS = 2400
# Drift in one bucket at request DRIFT_AT, with a half-life of HALF_LIFE requests.
DRIFT_BEFORE = {"A": TRUTH["A"]}
DRIFT_DEGRADE = {"A": {**TRUTH["A"], "ngram_tree": ArmTruth(50)}}  # the best arm gets worse
DRIFT_IMPROVE = {"A": {**TRUTH["A"], "none": ArmTruth(110)}}  # a neglected arm gets better
DRIFT_AT = 600
HALF_LIFE = 100.0


def picks(choose, n: int = 2000) -> dict[str, float]:
    counts: dict[str, int] = {}
    for _ in range(n):
        arm = choose()
        counts[arm] = counts.get(arm, 0) + 1
    return {arm: count / n for arm, count in counts.items()}


# --- context buckets -----------------------------------------------------------------------------

PYTHON = """import math

def area(r):
    return math.pi * r ** 2

class Circle:
    def __init__(self, r):
        self.r = r
"""
C_LIKE = "int main() {\n  int x = 0;\n  if (x == 0) {\n    return 1;\n  }\n}\n"
PROSE = ("The committee met on Tuesday to discuss the budget.\n"
         "Several members raised concerns about the timeline.\n"
         "A decision is expected next week.\n")


@pytest.mark.parametrize(("text", "is_chat", "expected"), [
    (PYTHON, False, "code"),
    (C_LIKE, False, "code"),
    (PYTHON, True, "code"),
    (PROSE, False, "prose"),
    (PROSE, True, "chat"),
    (PROSE * 10, True, "doc"),  # a chat request that carries a document
    (PROSE * 10, False, "prose"),
    (PYTHON * 10, True, "code"),  # code to work on is code, however long
    ("", False, "prose"),
    ("", True, "chat"),
    ("   \n\n  ", True, "chat"),
])
def test_classify_prompt(text: str, is_chat: bool, expected: str) -> None:
    assert classify_prompt(text, is_chat) == expected


# Prose about code that a looser classifier would call code: colons at line ends, sentences that
# begin with a keyword, calls named in passing, indented prose.
PROSE_ABOUT_CODE = """Summarize the following text in two or three sentences:
Module doctest -- a framework for running examples in docstrings.
Run it with the -v switch instead:
with assorted summaries at the end, and the heappop() method.
Function ndiff(a, b):
    Return a delta: the difference between a and b (lists of strings).
    For two lists of strings, return a delta in unified diff format.
"""
SOURCE_WITHOUT_DEFS = """            try:
                if follow_symlinks:
                    dirpath = path.join(toppath, name)
                    yield from walk(dirfd, dirpath)
            except OSError as err:
                onerror(err)
                continue
            finally:
                close(dirfd)
gauss = _inst.gauss
## ----------------- test program -----------------------
"""


def test_classify_prompt_tells_prose_about_code_from_source() -> None:
    assert classify_prompt(PROSE_ABOUT_CODE, False) == "prose"
    assert classify_prompt(PROSE_ABOUT_CODE, True) == "chat"
    assert classify_prompt(SOURCE_WITHOUT_DEFS, False) == "code"


def test_classify_prompt_calls_a_chat_a_document_from_its_length() -> None:
    assert classify_prompt("x" * (policy.DOCUMENT_CHARS - 1), True) == "chat"
    assert classify_prompt("x" * policy.DOCUMENT_CHARS, True) == "doc"
    assert classify_prompt(" " * 2 * policy.DOCUMENT_CHARS, True) == "chat"


def test_a_long_system_prompt_does_not_make_a_chat_a_document() -> None:
    system = {"role": "system", "content": PROSE * 10}
    question = {"role": "user", "content": "What is a heap?"}
    text = policy.conversation_text([system, question])
    assert text == "What is a heap?" and classify_prompt(text, True) == "chat"
    document = {"role": "user", "content": "Summarize:\n" + PROSE * 10}
    assert classify_prompt(policy.conversation_text([system, question, document]), True) == "doc"
    assert policy.conversation_text([system]) == system["content"]  # all there is


def test_classify_prompt_needs_a_share_of_code_lines() -> None:
    one_code_line = PROSE + "x == y\n"  # 1 in 4 lines: below the 30% threshold
    assert classify_prompt(one_code_line, False) == "prose"
    assert classify_prompt(one_code_line + "return x\n", False) == "code"  # 2 in 5


def test_classify_prompt_stops_counting_only_once_the_share_is_settled() -> None:
    # The count stops early; every mix of code and prose lines must still land where counting
    # all of the last 40 lines does.
    rng = random.Random(0)
    for _ in range(2000):
        lines = [rng.choice(["return x", "x = y + 1", "The heap keeps its order.", "", "  ",
                             "# a comment, or a heading"])
                 for _ in range(rng.randint(0, 50))]
        kept = [line for line in lines if line.strip()][-40:]
        source = sum(line in ("return x", "x = y + 1") for line in kept)
        hashes = sum(line.startswith("#") for line in kept)
        share = (source + (hashes if source else 0)) / max(len(kept), 1)
        expected = "code" if kept and share >= policy.CODE_SHARE else "prose"
        assert classify_prompt("\n".join(lines), False) == expected, lines


def test_markdown_and_sentences_about_operators_are_not_code() -> None:
    report = ("# Quarterly report\n## Summary\nRevenue grew 4% this quarter.\n## Risks\n"
              "Supply costs rose.\nPlease summarise.")
    for text in (report, "What does a == b return in JavaScript?", "#1 tip for new managers?",
                 "parse -> plan -> execute: what is this pipeline?"):
        assert classify_prompt(text, True) == "chat", text
    # Comments still count beside source, as in a commented script.
    assert classify_prompt("# setup\n# the inputs\n# and the outputs\nx = 1\n", False) == "code"
    assert classify_prompt("if a == b and c -> d\n", False) == "code"


def test_classify_prompt_looks_at_the_last_forty_lines() -> None:
    assert classify_prompt(PYTHON * 10 + PROSE * 20, False) == "prose"
    assert classify_prompt(PROSE * 20 + PYTHON * 10, False) == "code"


def test_classify_prompt_reads_a_bounded_tail_in_time_linear_in_it() -> None:
    """The class is read from the prompt's last ``CLASSIFY_CHARS`` characters; an operator on a
    long line that ends a sentence once cost time quadratic in the line (1.5 s at 100,000
    characters, on the ingress's event loop)."""
    import signal

    from router.policy import CLASSIFY_CHARS

    def too_slow(*_):
        raise TimeoutError("classify_prompt took over 20 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)  # the old pattern took minutes on these
    try:
        assert classify_prompt("=" * 1_000_000 + ".", False) == "prose"
        assert classify_prompt("a == b " * 200_000 + "?", True) == "doc"
        # Only the tail counts, cut at a line's start: source after a long document is code.
        assert classify_prompt("x" * 5 * CLASSIFY_CHARS + "\n" + PYTHON * 10, False) == "code"
        assert classify_prompt(PYTHON * 10 + PROSE * (CLASSIFY_CHARS // len(PROSE) + 1),
                               False) == "prose"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("temperature", "expected"), [
    (-1.0, "t0"), (0.0, "t0"), (0.01, "tlo"), (0.7, "tlo"), (0.71, "thi"), (2.0, "thi"),
])
def test_temperature_bucket(temperature: float, expected: str) -> None:
    assert temperature_bucket(temperature) == expected


@pytest.mark.parametrize(("tokens", "expected"), [
    (0, "ps"), (255, "ps"), (256, "pm"), (1023, "pm"), (1024, "pl"), (100_000, "pl"),
])
def test_length_bucket(tokens: int, expected: str) -> None:
    assert length_bucket(tokens) == expected


def test_context_bucket_joins_the_three_features() -> None:
    assert context_bucket(PYTHON, False, 0.0, 300) == "code.t0.pm"
    assert context_bucket(PROSE, True, 0.9, 10) == "chat.thi.ps"
    assert context_bucket(PROSE, False, 0.5, 5000) == "prose.tlo.pl"


# --- Thompson scoring ----------------------------------------------------------------------------

def test_thompson_concentrates_on_the_better_arm_with_many_requests() -> None:
    rng = random.Random(1)
    prior = {"a": 95.0, "b": 95.0}
    many = {"a": ArmEstimate(100.0, 200), "b": ArmEstimate(90.0, 200)}
    few = {"a": ArmEstimate(100.0, 1), "b": ArmEstimate(90.0, 1)}
    assert picks(lambda: thompson_choice(many, prior, rng=rng)).get("a", 0) >= 0.99
    # With one request each, the worse arm is still explored.
    assert 0.1 <= picks(lambda: thompson_choice(few, prior, rng=rng)).get("b", 0) <= 0.5


def test_thompson_follows_the_prior_without_observations() -> None:
    rng = random.Random(2)
    assert picks(lambda: thompson_choice({}, {"a": 100.0, "b": 50.0}, rng=rng))["a"] >= 0.95
    even = picks(lambda: thompson_choice({}, {"a": 100.0, "b": 100.0}, rng=rng))
    assert 0.4 <= even["a"] <= 0.6


def test_thompson_only_considers_arms_of_the_prior() -> None:
    estimates = {"gone": ArmEstimate(1000.0, 100)}
    assert thompson_choice(estimates, {"a": 1.0}, rng=random.Random(0)) == "a"


@pytest.mark.parametrize(("other_prior", "expected"), [(79.0, "a"), (81.0, "b")])
def test_thompson_prior_weighs_as_many_requests_as_prior_weight(other_prior: float,
                                                                expected: str) -> None:
    # Without noise the choice is the best posterior mean: a's is (100 * 2 + 60 * 2) / 4 = 80.
    estimates = {"a": ArmEstimate(60.0, 2)}
    prior = {"a": 100.0, "b": other_prior}
    assert thompson_choice(estimates, prior, prior_weight=2.0, rel_noise=1e-9,
                           rng=random.Random(0)) == expected


def test_thompson_prior_weight_trades_the_prior_against_observations() -> None:
    estimates = {"a": ArmEstimate(50.0, 10)}
    prior = {"a": 100.0, "b": 80.0}

    def choose(weight: float) -> str:
        return thompson_choice(estimates, prior, prior_weight=weight, rel_noise=1e-9,
                               rng=random.Random(0))

    assert choose(2.0) == "b"  # a: (200 + 500) / 12 = 58
    assert choose(100.0) == "a"  # a: (10000 + 500) / 110 = 95


def test_observation_noise_settles_observed_arms_but_not_the_prior() -> None:
    # Equal priors, three requests each, a 10% better: how often is b still tried?
    prior = {"a": 100.0, "b": 100.0}
    three = {"a": ArmEstimate(110.0, 3), "b": ArmEstimate(100.0, 3)}
    rng = random.Random(3)
    noisy = picks(lambda: thompson_choice(three, prior, rng=rng))
    steady = picks(lambda: thompson_choice(three, prior, rng=rng, obs_noise=0.05))
    assert steady.get("b", 0) < 0.1 < noisy.get("b", 0)
    # An arm nobody has tried keeps the prior's spread whatever the observations' noise.
    unseen = {"a": ArmEstimate(100.0, 3)}

    def share_of_unseen(noise: float) -> float:
        rng = random.Random(4)
        return picks(lambda: thompson_choice(unseen, {"a": 100.0, "b": 90.0}, prior_weight=5.0,
                                             rng=rng, obs_noise=noise)).get("b", 0)

    assert share_of_unseen(0.05) > 0.05 and share_of_unseen(0.3) > 0.05


# --- Bayes-UCB scoring ---------------------------------------------------------------------------

def test_ucb_quantile_starts_at_the_median_and_rises_with_traffic() -> None:
    assert ucb_quantile(0) == 0.5 and ucb_quantile(-1.0) == 0.5
    assert ucb_quantile(1) == pytest.approx(2 / 3) and ucb_quantile(98) == pytest.approx(0.99)
    assert all(ucb_quantile(n) < ucb_quantile(n + 0.5) for n in range(50))


def test_bayes_ucb_first_follows_the_posterior_mean_then_optimism() -> None:
    # No requests yet: the median, i.e. the higher mean, however unsure the other arm is.
    prior = {"a": 100.0, "b": 99.0}
    assert bayes_ucb_choice({}, prior, prior_weight={"a": 50.0, "b": 0.5}) == "a"
    assert bayes_ucb_choice({}, {"a": 99.0, "b": 100.0}) == "b"
    assert bayes_ucb_choice({}, {"a": 100.0, "b": 100.0}) == "a"  # a tie: the earlier arm
    # After 20 requests on `a` at its prior's figure, `b`'s wider posterior leads its quantile.
    seen = {"a": ArmEstimate(100.0, 20)}
    assert bayes_ucb_choice(seen, prior, prior_weight=2.0) == "b"
    # An arm 20% behind by the prior waits longer: 80 + 1.69 * 0.3 * 80 / sqrt(2) = 108.7
    # against a's 110.8 after 20 requests; after 60, 80 + 2.14 * 17.0 = 116.3 against 108.2.
    behind = {"a": 100.0, "b": 80.0}
    assert bayes_ucb_choice(seen, behind) == "a"
    assert bayes_ucb_choice({"a": ArmEstimate(100.0, 60)}, behind) == "b"
    # Deterministic, and only arms of the prior count (their requests too).
    assert {bayes_ucb_choice(seen, prior) for _ in range(50)} == {"b"}
    assert bayes_ucb_choice({"gone": ArmEstimate(1000.0, 1e6)}, prior) == "a"


def test_bayes_ucb_loses_less_than_thompson_over_a_buckets_first_requests() -> None:
    """Arms within 12% of each other, 30% spread per request, a prior naming bucket A's best
    arm (and wrong about B's): over the first 20 requests Thompson sampling spreads requests
    over the arms the prior cannot tell apart, Bayes-UCB starts on the likeliest best one."""
    truth = {"A": {"a": ArmTruth(100, 0.3), "b": ArmTruth(94, 0.3), "c": ArmTruth(91, 0.3),
                   "d": ArmTruth(88, 0.3)},
             "B": {"a": ArmTruth(80, 0.3), "b": ArmTruth(85, 0.3), "c": ArmTruth(78, 0.3),
                   "d": ArmTruth(70, 0.3)}}
    prior = {"a": 100.0, "b": 95.0, "c": 92.0, "d": 88.0}

    def regret(exploration: str) -> float:
        return sum(simulate(truth, {"A": 0.5, "B": 0.5}, 20, seed, prior=prior,
                            exploration=exploration).cumulative_regret for seed in range(30))

    assert regret("ucb") < 0.8 * regret("thompson")


def test_router_refuses_an_unknown_exploration() -> None:
    with pytest.raises(ValueError, match="exploration"):
        ArmRouter(ARMS, "none", exploration="epsilon")


def stats_with_spread(requests: float, rel_variance: float, mean: float = 20.0) -> ArmStats:
    """A record whose per-request goodput has the given sample relative variance."""
    variance = rel_variance * mean * mean
    sq_sum = (variance * (requests - 1) / requests + mean * mean) * requests
    return ArmStats(requests=requests, goodput_sum=mean * requests, goodput_sq_sum=sq_sum)


def test_observed_noise_pools_the_arms_spread_towards_the_default() -> None:
    assert observed_noise({}) == pytest.approx(DEFAULT_REL_NOISE)
    assert observed_noise({"a": ArmEstimate(10.0, 5)}) == pytest.approx(DEFAULT_REL_NOISE)
    one = {"a": ArmEstimate(20.0, 5, stats_with_spread(5, 0.01))}
    # (4 * 0.09 + 4 * 0.01) / (4 + 4)
    assert observed_noise(one) == pytest.approx(math.sqrt(0.05))
    many = {arm: ArmEstimate(20.0, 400, stats_with_spread(400, 0.01)) for arm in "ab"}
    assert observed_noise(many) == pytest.approx(0.1, rel=0.02)


def test_calibrated_prior_takes_the_scale_of_the_observations() -> None:
    prior = {"a": 1.0, "b": 0.9, "c": 0.5}
    assert calibrated_prior({}, prior) == prior
    assert calibrated_prior({"a": ArmEstimate(200.0, 4)}, prior) == pytest.approx(
        {"a": 200.0, "b": 180.0, "c": 100.0})
    # Request-weighted: (3 * 30 + 1 * 90) / (3 * 1.0 + 1 * 0.9) = 180 / 3.9.
    mixed = calibrated_prior({"a": ArmEstimate(30.0, 3), "b": ArmEstimate(90.0, 1),
                              "other": ArmEstimate(1e6, 1e6)}, prior)
    assert mixed == pytest.approx({arm: value * 180 / 3.9 for arm, value in prior.items()})
    assert calibrated_prior({"a": ArmEstimate(0.0, 5)}, prior) == prior


# --- ArmRouter -----------------------------------------------------------------------------------

def test_router_rejects_a_default_arm_it_does_not_have() -> None:
    with pytest.raises(ValueError, match="default arm"):
        ArmRouter(ARMS, "eagle")


def test_router_rejects_priors_over_other_arms() -> None:
    # Priors without an arm would leave it out of every draw; priors of an arm the router does
    # not run would let it pick one no replica has.
    with pytest.raises(ValueError, match="priors for"):
        ArmRouter(ARMS, "none", Priors.of(ARMS[:2], "none"))
    with pytest.raises(ValueError, match="priors for"):
        ArmRouter(ARMS, "none", sampled={"thi": Priors.of([*ARMS, "eagle"], "none")})


def test_router_honours_a_pinned_arm() -> None:
    best = {"none": ArmEstimate(1000.0, 500)}
    for mode in ("adaptive", "fixed"):
        router = ArmRouter(ARMS, "none", mode=mode, estimates=lambda bucket: best,
                           rng=random.Random(0))
        assert all(router.choose("A", pinned="skip_tree") == "skip_tree" for _ in range(50))
        with pytest.raises(KeyError):
            router.choose("A", pinned="eagle")


def test_fixed_router_always_returns_the_default_arm() -> None:
    better = {"ngram_tree": ArmEstimate(1000.0, 500), "none": ArmEstimate(10.0, 500)}
    router = ArmRouter(ARMS, "none", mode="fixed", estimates=lambda bucket: better,
                       rng=random.Random(0))
    assert {router.choose("A") for _ in range(200)} == {"none"}


def test_adaptive_router_prefers_the_measured_best_arm() -> None:
    estimates = {"none": ArmEstimate(60.0, 300), "skip_chain": ArmEstimate(70.0, 300),
                 "skip_tree": ArmEstimate(75.0, 300), "ngram_tree": ArmEstimate(90.0, 300)}
    router = ArmRouter(ARMS, "none", estimates=lambda bucket: estimates, rng=random.Random(0))
    assert picks(lambda: router.choose("A"))["ngram_tree"] >= 0.99


def test_an_arm_the_measurement_left_out_starts_beside_the_measured_ones() -> None:
    """Not at a bare 0.9 among tokens per second (a prior it could never climb out of)."""
    priors = Priors.of(["none", "a", "b"], "a", {"none": 40.0, "a": 50.0})
    assert priors.overall == {"none": 40.0, "a": 50.0, "b": 45.0}
    # the default unmeasured as well: the measured arms' median
    assert Priors.of(["a", "b", "c"], "c", {"a": 30.0, "b": 50.0}).overall["c"] == 40.0
    assert Priors.of(["x", "y"], "x").overall == {"x": 1.0, "y": 0.9}  # nothing measured


def test_class_priors_steer_each_prompt_class_to_its_own_best_arm() -> None:
    arms = ["none", "ngram"]
    priors = Priors.of(arms, "ngram", {"none": 20.0, "ngram": 21.0},
                       {"code": {"ngram": 30.0}, "chat": {"none": 20.0, "ngram": 16.0}})
    router = ArmRouter(arms, "ngram", priors, rng=random.Random(0), exploration="thompson")
    code = [router.choose("code.t0.ps") for _ in range(200)]
    chat = [router.choose("chat.t0.ps") for _ in range(200)]
    prose = [router.choose("prose.t0.ps") for _ in range(200)]
    assert code.count("ngram") > 160  # 30 vs the overall 20 for `none`
    assert chat.count("none") > 130
    assert 60 < prose.count("ngram") < 160  # no class prior: the overall one (21 vs 20)
    # Bayes-UCB: a bucket's first request takes its class's best arm by the prior, every time.
    ucb = ArmRouter(arms, "ngram", priors)
    assert [ucb.choose(f"{c}.t0.ps") for c in ("code", "chat", "prose")] == [
        "ngram", "none", "ngram"]


def test_profile_measured_goodput_splits_overall_and_by_class() -> None:
    from workers.arm import NONE_ARM, Arm, Profile

    profile = Profile(model_fingerprint="f", default_arm="none", arms=[
        NONE_ARM, Arm(name="ngram_tree", drafter="ngram_tree")], notes={"measured": {
            "none": {"tokens_per_s": 20.0, "by_class": {"code": 19.0, "chat": 21.0}},
            "ngram_tree": {"tokens_per_s": 24.0, "mean_accepted_length": 1.5}}})
    overall, by_class = profile.measured_goodput()
    assert overall == {"none": 20.0, "ngram_tree": 24.0}
    assert by_class == {"code": {"none": 19.0}, "chat": {"none": 21.0}}


def test_profile_fastest_takes_the_measured_best_of_the_kinds_in_the_dtype() -> None:
    from workers.arm import NONE_ARM, Arm, Profile

    arms = [NONE_ARM, Arm(name="s3d_fused", drafter="s3d"),
            Arm(name="s3d_skip", drafter="s3d_skip"), Arm(name="ngram_tree", drafter="ngram_tree")]
    measured = {"none": {"tokens_per_s": 20.0}, "s3d_fused": {"tokens_per_s": 26.0},
                "s3d_skip": {"tokens_per_s": 25.0}, "ngram_tree": {"tokens_per_s": 30.0}}
    bf16 = {**measured, "s3d_skip": {"tokens_per_s": 27.0}}
    profile = Profile(model_fingerprint="f", default_arm="none", arms=arms, notes={
        "dtype": "float32", "measured": measured,
        "by_dtype": {"bfloat16": {"dtype": "bfloat16", "measured": bf16}}})
    s3d = ("s3d", "s3d_skip")
    assert profile.fastest(s3d, "float32") == "s3d_fused"  # ngram_tree is not one of the kinds
    assert profile.fastest(s3d, "bfloat16") == "s3d_skip"
    assert profile.fastest(("ngram_tree",)) == "ngram_tree"
    unmeasured = profile.model_copy(update={"notes": {}})
    assert unmeasured.fastest(s3d) == "s3d_fused"  # the first such arm
    assert profile.fastest(("skip_tree",)) is None
    assert profile.fastest(lambda arm: arm.drafts_s3d, "bfloat16") == "s3d_skip"
    assert profile.fastest(lambda arm: arm.top_k > 1) is None


def test_router_for_profile_takes_its_priors_and_prior_weight() -> None:
    from workers.arm import NONE_ARM, Arm, Profile

    profile = Profile(model_fingerprint="f", default_arm="none", arms=[
        NONE_ARM, Arm(name="ngram_tree", drafter="ngram_tree")], notes={"prior_weight": 7,
        "calibration_classes": ["code", "chat", "code"],
        "measured": {"none": {"tokens_per_s": 20.0, "by_class": {"code": 19.0},
                              "per_prompt": [18.0, 21.0, 20.0]},
                     "ngram_tree": {"tokens_per_s": 24.0, "by_class": {"code": 30.0},
                                    "per_prompt": [27.0, 22.0, 30.0]}}})
    router = ArmRouter.for_profile(profile, rng=random.Random(0))
    assert router.arms == ["none", "ngram_tree"] and router.default_arm == "none"
    assert router.greedy.overall == {"none": 20.0, "ngram_tree": 24.0}
    assert router.greedy.weight == 7.0 and router.sampled == {}
    assert router.greedy.by_class == {"code": {"none": 19.0, "ngram_tree": 30.0}}
    assert profile.measured_per_prompt() == {"code": {"none": [18.0, 20.0],
                                                      "ngram_tree": [27.0, 30.0]},
                                             "chat": {"none": [21.0], "ngram_tree": [22.0]}}
    # Code's two prompts compare the arms alike (1.5x both): weighed more than 7 requests;
    # chat has one prompt, no spread to judge by: the profile's prior_weight.
    assert router.greedy.class_weights["code"]["ngram_tree"] > 7.0
    assert "chat" not in router.greedy.class_weights
    assert ArmRouter.for_profile(profile, "ngram_tree", mode="fixed").choose("x") == "ngram_tree"


def test_router_takes_the_figures_measured_in_its_serving_dtype() -> None:
    """A profile searched in one dtype and re-measured in another keeps both sets of figures; a
    router serving a dtype takes its own, or the search's for a dtype never measured."""
    from workers.arm import NONE_ARM, Arm, Profile

    own = {"none": {"tokens_per_s": 20.0, "by_class": {"chat": 20.0}},
           "ngram_tree": {"tokens_per_s": 30.0, "by_class": {"chat": 25.0}}}
    bf16 = {"none": {"tokens_per_s": 40.0, "by_class": {"chat": 45.0}},
            "ngram_tree": {"tokens_per_s": 35.0, "by_class": {"chat": 30.0}}}
    profile = Profile(model_fingerprint="f", default_arm="ngram_tree", arms=[
        NONE_ARM, Arm(name="ngram_tree", drafter="ngram_tree")], notes={
            "dtype": "float32", "prior_weight": 3, "measured": own,
            "by_dtype": {"bfloat16": {"dtype": "bfloat16", "prior_weight": 5, "measured": bf16}}})
    for dtype, prior, chat, weight in (
            (None, {"none": 20.0, "ngram_tree": 30.0}, 25.0, 3.0),
            ("float32", {"none": 20.0, "ngram_tree": 30.0}, 25.0, 3.0),
            ("float16", {"none": 20.0, "ngram_tree": 30.0}, 25.0, 3.0),
            ("bfloat16", {"none": 40.0, "ngram_tree": 35.0}, 30.0, 5.0)):
        router = ArmRouter.for_profile(profile, rng=random.Random(0), dtype=dtype)
        assert router.greedy.overall == prior and router.greedy.weight == weight, dtype
        assert router.greedy.by_class["chat"]["ngram_tree"] == chat


def test_router_takes_sampled_figures_for_the_temperature_bucket_measured_sampled() -> None:
    """Greedy, `hybrid` leads; sampled at T=1 (bucket `thi`), `ngram_tree` does, by 10% on
    every calibration prompt. A `thi` request follows the sampled figures, with the paired
    weight of their own comparison; `t0` the greedy ones; `tlo`, never measured sampled, the
    greedy figures, weighed only `prior_weight` requests."""
    from workers.arm import NONE_ARM, Arm, Profile

    classes = ["chat", "chat", "chat", "chat"]
    greedy = {"none": {"tokens_per_s": 25.0, "by_class": {"chat": 25.0},
                       "per_prompt": [25.0, 20.0, 30.0, 25.0]},
              "ngram_tree": {"tokens_per_s": 40.0, "by_class": {"chat": 40.0},
                             "per_prompt": [40.0, 30.0, 50.0, 40.0]},
              "hybrid": {"tokens_per_s": 48.0, "by_class": {"chat": 48.0},
                         "per_prompt": [48.0, 36.0, 60.0, 48.0]}}
    sampled = {"none": {"tokens_per_s": 24.0, "by_class": {"chat": 24.0},
                        "per_prompt": [24.0, 19.0, 29.0, 24.0]},
               "ngram_tree": {"tokens_per_s": 33.0, "by_class": {"chat": 33.0},
                              "per_prompt": [33.0, 22.0, 44.0, 33.0]},
               "hybrid": {"tokens_per_s": 30.0, "by_class": {"chat": 30.0},
                          "per_prompt": [30.0, 20.0, 40.0, 30.0]}}
    profile = Profile(model_fingerprint="f", default_arm="hybrid", arms=[
        NONE_ARM, Arm(name="ngram_tree", drafter="ngram_tree"),
        Arm(name="hybrid", drafter="hybrid")], notes={
            "dtype": "bfloat16", "prior_weight": 2, "calibration_classes": classes,
            "measured": greedy, "by_temperature": {"bfloat16": {"thi": {
                "dtype": "bfloat16", "temperature": 1.0, "prior_weight": 2,
                "calibration_classes": classes, "measured": sampled}}}})
    assert set(profile.sampled_measurements()) == {"thi"}
    assert profile.sampled_measurements("float32") == {}
    assert profile.measured_goodput("bfloat16", "thi")[0]["ngram_tree"] == 33.0
    assert profile.measured_goodput("bfloat16", "tlo")[0]["ngram_tree"] == 40.0
    router = ArmRouter.for_profile(profile, rng=random.Random(0), dtype="bfloat16",
                                   exploration="thompson")
    assert set(router.sampled) == {"thi"}
    assert router.sampled["thi"].by_class["chat"]["ngram_tree"] == 33.0
    assert router.sampled["thi"].class_weights["chat"]["hybrid"] > 2.0
    hot = picks(lambda: router.choose("chat.thi.ps"), n=2000)
    cold = picks(lambda: router.choose("chat.t0.ps"), n=2000)
    warm = picks(lambda: router.choose("chat.tlo.ps"), n=2000)
    assert hot["ngram_tree"] > 0.9 and cold["hybrid"] > 0.9
    assert 0.5 < warm["hybrid"] < 0.9  # the greedy lead, held less surely
    ucb = ArmRouter.for_profile(profile, dtype="bfloat16")
    assert [ucb.choose(f"chat.{t}.ps") for t in ("thi", "t0", "tlo")] == [
        "ngram_tree", "hybrid", "hybrid"]
    # A router serving a dtype the profile never measured sampled has greedy figures only.
    assert ArmRouter.for_profile(profile, dtype="float32").sampled == {}


def test_paired_prior_weights_count_how_consistently_arms_compare_prompt_by_prompt() -> None:
    # Prompts differ twofold in goodput, but `a` is 20% ahead of `b` on every one of them:
    # the comparison is as sure as the shift for unlike traffic allows, (0.3 / 0.05)**2.
    per_prompt = {"a": [20.0, 40.0, 30.0, 25.0], "b": [16.0, 32.0, 24.0, 20.0],
                  "c": [10.0, 45.0, 15.0, 30.0]}  # `c` is ahead on some prompts, behind on most
    weights = paired_prior_weights(per_prompt)
    assert weights["a"] == pytest.approx(36.0) and weights["b"] == pytest.approx(36.0)
    diffs = [math.log(c / a) for c, a in zip(per_prompt["c"], per_prompt["a"])]
    mean = sum(diffs) / 4
    spread2 = sum((d - mean) ** 2 for d in diffs) / 3 / 4 + 0.05 ** 2
    assert weights["c"] == pytest.approx(0.09 / spread2) and weights["c"] < 3
    assert paired_prior_weights(per_prompt, floor=5.0)["c"] == 5.0
    assert paired_prior_weights({"a": [20.0], "b": [16.0]}) == {}  # one prompt: no spread
    assert paired_prior_weights({"a": [20.0, 30.0]}) == {}  # nothing to compare with


def test_paired_prior_weights_cut_exploration_of_greedy_buckets_only() -> None:
    # `b` measured 15% behind `a` on every calibration prompt: with the paired weight a greedy
    # bucket rarely tries it; a sampled bucket, unlike the search's greedy decoding, still does.
    priors = Priors.of(["a", "b"], "a", {"a": 100.0, "b": 85.0}, weight=2.0,
                       class_weights={"code": {"a": 36.0, "b": 36.0}})
    router = ArmRouter(["a", "b"], "a", priors, rng=random.Random(0), exploration="thompson")
    greedy = picks(lambda: router.choose("code.t0.ps"), n=2000)
    sampled = picks(lambda: router.choose("code.thi.ps"), n=2000)
    other_class = picks(lambda: router.choose("chat.t0.ps"), n=2000)
    # Prompts longer than any calibration prompt: the paired comparison does not speak of them.
    longer = picks(lambda: router.choose("code.t0.pl"), n=2000)
    assert greedy.get("b", 0) < 0.02 and picks(lambda: router.choose("code.t0.pm"),
                                               n=2000).get("b", 0) < 0.02
    assert sampled["b"] > 0.15 and other_class["b"] > 0.15 and longer["b"] > 0.15
    # Bayes-UCB: after 20 requests on `a` as fast as measured, a bucket held only by the
    # profile's prior_weight has room for `b` to lead (85 + 1.69 * 0.3 * 85 / sqrt(2) against
    # a's 100 + 1.69 * 0.3 * 100 / sqrt(22)); the paired weight of 36 requests leaves none.
    seen = {"a": ArmEstimate(100.0, 20)}
    ucb = ArmRouter(["a", "b"], "a", priors, estimates=lambda bucket: seen)
    assert ucb.choose("code.t0.ps") == "a"
    assert ucb.choose("code.thi.ps") == "b" and ucb.choose("chat.t0.ps") == "b"


def test_bayes_ucb_optimism_follows_the_bucket_s_whole_traffic() -> None:
    # `a` well observed, `b` untried and put 20% behind by a prior of 2 requests. With the
    # decayed counts of a quiet bucket (9 requests) the quantile stays low and `b` is never
    # tried; the same figures after 2000 requests in the bucket's lifetime try it.
    prior = {"a": 40.0, "b": 32.0}
    quiet = {"a": ArmEstimate(40.0, 9.0)}
    assert bayes_ucb_choice(quiet, prior, 2.0) == "a"
    lived = {"a": ArmEstimate(40.0, 9.0, lifetime_requests=2000.0)}
    assert bayes_ucb_choice(lived, prior, 2.0) == "b"
    assert ArmEstimate(40.0, 9.0).traffic == 9.0


def test_bayes_ucb_tries_an_arm_the_prior_underrates_in_a_quiet_bucket() -> None:
    # One request every 10 minutes, an hour's half-life: the decayed counts level off at 8.7
    # requests. `b` is really 25% ahead of the default `a`, the prior puts it 20% behind.
    # (Regression: with the quantile on the decayed count Bayes-UCB never tried `b`.)
    truth = {"A": {"a": ArmTruth(40.0), "b": ArmTruth(50.0), "c": ArmTruth(30.0)}}
    prior = {"a": 40.0, "b": 32.0, "c": 30.0}
    for seed in SEEDS:
        result = simulate(truth, {"A": 1.0}, 600, seed, prior=prior, half_life_s=3600.0,
                          interval_s=600.0)
        first = next(r.index for r in result.records if r.arm == "b")
        assert first < 100
        assert result.summary(400).best_arm_share["A"] > 0.5
        assert result.summary(400).goodput_ratio > 0.88


def test_adaptive_router_without_a_prior_starts_near_the_default_arm() -> None:
    router = ArmRouter(ARMS, "skip_tree", rng=random.Random(0), exploration="thompson")
    shares = picks(lambda: router.choose("A"))
    assert max(shares, key=shares.get) == "skip_tree"
    assert set(shares) == set(ARMS)
    assert ArmRouter(ARMS, "skip_tree").choose("A") == "skip_tree"  # Bayes-UCB: the default


def test_adaptive_router_explores_arms_it_has_not_seen() -> None:
    # Regression: the unit-less default prior (1.0 / 0.9) once dragged unseen arms to ~1 token/s
    # next to an observed arm's 60, so the first arm tried in a bucket was kept forever.
    seen = {"none": ArmEstimate(60.0, 5)}
    router = ArmRouter(ARMS, "none", estimates=lambda bucket: seen, rng=random.Random(0),
                       exploration="thompson")
    shares = picks(lambda: router.choose("A"))
    assert all(shares.get(arm, 0) >= 0.05 for arm in ARMS if arm != "none")
    # Bayes-UCB keeps a bucket's first requests on the arm its figures favour, then tries the
    # others as traffic grows (against 60 tokens/s, a prior of 0.9 would never be tried).
    ucb = ArmRouter(ARMS, "none", estimates=lambda bucket: seen)
    assert ucb.choose("A") == "none"
    seen["none"] = ArmEstimate(60.0, 20)
    assert ucb.choose("A") != "none"


# --- simulated traffic ---------------------------------------------------------------------------

EXPLORATIONS = ("ucb", "thompson")


@cache
def steady_run(seed: int, exploration: str = "ucb") -> SimResult:
    return simulate(TRUTH, MIX, REQUESTS, seed, half_life_s=1800.0, exploration=exploration)


def test_simulation_is_deterministic_per_seed() -> None:
    again = simulate(TRUTH, MIX, 300, 0, half_life_s=1800.0)
    assert again.records == steady_run(0).records[:300]
    assert simulate(TRUTH, MIX, 300, 1, half_life_s=1800.0).records != again.records


def test_simulation_measures_regret_against_the_per_bucket_best_arm() -> None:
    result = simulate(TRUTH, MIX, 600, 0, mode="fixed", default_arm="none")
    assert {r.arm for r in result.records} == {"none"}
    expected = sum(max(a.throughput for a in TRUTH[r.bucket].values())
                   - TRUTH[r.bucket]["none"].throughput for r in result.records)
    assert result.cumulative_regret == pytest.approx(expected)
    summary = result.summary()
    assert summary.best_arm_share == {"A": 0.0, "B": 1.0, "C": 0.0}
    assert summary.goodput_ratio < 0.85
    # The tokens over time at the sampled goodputs are centred on the chosen arm's throughput.
    assert summary.achieved_goodput == pytest.approx(summary.expected_goodput, rel=0.02)


def test_simulation_ranks_arms_by_the_tokens_over_time_the_router_estimates() -> None:
    """The store estimates an arm's goodput as its tokens over its decoding time: at lognormal
    per-request goodputs, ``mean / (1 + rel_noise^2)``. A noisy arm with the higher mean is then
    the slower one; the simulation's best arm, regret and ratios are the router's, which ends on
    the steady arm."""
    noisy, steady = ArmTruth(100, 0.8), ArmTruth(80, 0.05)
    assert (noisy.throughput, steady.throughput) == pytest.approx((100 / 1.64, 80 / 1.0025))
    clock = SimClock()
    store = InProcessStatsStore(clock=clock)
    rng = random.Random(0)
    for arm, truth in (("a", noisy), ("b", steady)):
        for _ in range(20_000):
            store.record(StatsKey("m", "A", arm), SpecDecodeStats(num_output_tokens=128),
                         127 / truth.sample(rng))
    estimates = store_estimates(store, "m")("A")
    assert estimates["a"].goodput == pytest.approx(noisy.throughput, rel=0.03)
    assert estimates["b"].goodput == pytest.approx(steady.throughput, rel=0.01)
    result = simulate({"A": {"a": noisy, "b": steady}}, {"A": 1.0}, 600, 0)
    assert {r.best_arm for r in result.records} == {"b"}
    last = result.summary(300)
    assert last.best_arm_share["A"] > 0.95 and last.goodput_ratio > 0.99
    assert last.achieved_goodput == pytest.approx(last.expected_goodput, rel=0.05)


@pytest.mark.parametrize("exploration", EXPLORATIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_router_regret_shrinks(seed: int, exploration: str) -> None:
    result = steady_run(seed, exploration)
    half = REQUESTS // 2
    first, second = result.summary(0, half), result.summary(half)
    assert second.regret_per_request < 0.7 * first.regret_per_request
    assert result.summary(0, 200).regret_per_request > second.regret_per_request


@pytest.mark.parametrize("exploration", EXPLORATIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_router_ends_near_the_per_bucket_best_arm(seed: int, exploration: str) -> None:
    result = steady_run(seed, exploration)
    last = result.summary(2 * REQUESTS // 3)
    assert last.goodput_ratio >= 0.95
    assert last.achieved_goodput >= 0.95 * last.best_goodput
    assert min(result.best_arm_share_last(200).values()) >= 0.85


@pytest.mark.parametrize("exploration", EXPLORATIONS)
def test_router_ends_near_the_per_bucket_best_arm_with_requests_in_flight(
        exploration: str) -> None:
    """A busy fleet: ten requests a second, each's record reaching the router 2.5 s after it
    decoded (the replica's flush, the ingress's refresh), so about 40 requests are routed
    before the figures of those in flight are known. The router counts them as pending
    observations: Bayes-UCB spread a bucket's requests over the arms instead of sending every
    request of a refresh interval to one (its regret was 4.2x the regret with instant
    figures on this seed, 1.14 against 0.27 tokens/s per request; now 1.7x)."""
    instant = simulate(TRUTH, MIX, REQUESTS, 0, half_life_s=1800.0, interval_s=0.1,
                       exploration=exploration)
    busy = simulate(TRUTH, MIX, REQUESTS, 0, half_life_s=1800.0, interval_s=0.1,
                    exploration=exploration, feedback_delay_s=2.5)
    assert busy.records != instant.records
    # The first 40 requests go out before any figure is back (the first lands after about
    # 4.5 s): every bucket's are not all sent to one arm.
    first = {}
    for record in busy.records[:40]:
        first.setdefault(record.bucket, set()).add(record.arm)
    assert all(len(arms) > 1 for arms in first.values()), first
    last = busy.summary(2 * REQUESTS // 3)
    assert last.goodput_ratio >= 0.95
    assert min(busy.best_arm_share_last(200).values()) >= 0.85
    regret, instant_regret = busy.summary().regret_per_request, instant.summary().regret_per_request
    assert instant_regret < regret < 2.5 * instant_regret


@pytest.mark.parametrize("exploration", EXPLORATIONS)
@pytest.mark.parametrize("after", [DRIFT_DEGRADE, DRIFT_IMPROVE], ids=["degrade", "improve"])
@pytest.mark.parametrize("seed", SEEDS)
def test_router_follows_a_change_of_best_arm(seed: int, after: dict, exploration: str) -> None:
    result = simulate(DRIFT_BEFORE, {"A": 1.0}, 2 * DRIFT_AT, seed, changes={DRIFT_AT: after},
                      half_life_s=HALF_LIFE, exploration=exploration)
    assert result.summary(DRIFT_AT - 200, DRIFT_AT).goodput_ratio >= 0.95
    assert result.records[DRIFT_AT].best_arm != result.records[DRIFT_AT - 1].best_arm
    # Within three half-lives of the change, a window of 100 requests is back near the best.
    bound = int(3 * HALF_LIFE)
    recovered = [start for start in range(DRIFT_AT, DRIFT_AT + bound)
                 if result.summary(start, start + 100).goodput_ratio >= 0.95]
    assert recovered, "the router did not follow the new best arm"
    assert result.summary(DRIFT_AT + bound).goodput_ratio >= 0.95


@pytest.mark.parametrize("exploration", EXPLORATIONS)
def test_learning_the_spread_cuts_regret_when_goodput_is_steady(monkeypatch,
                                                                exploration: str) -> None:
    # The simulated goodput spreads by 10% per request; assuming 30% explores three times longer.
    learned = [simulate(TRUTH, MIX, 600, seed, half_life_s=1800.0, exploration=exploration)
               for seed in SEEDS]
    monkeypatch.setattr(policy, "observed_noise", lambda estimates: DEFAULT_REL_NOISE)
    assumed = [simulate(TRUTH, MIX, 600, seed, half_life_s=1800.0, exploration=exploration)
               for seed in SEEDS]
    assert (sum(r.cumulative_regret for r in learned)
            < 0.6 * sum(r.cumulative_regret for r in assumed))


# --- draft depth from the acceptance curve -------------------------------------------------

CHAIN = Arm(name="skip_chain", drafter="skip_chain", skip_layers=(10, 11, 12), depth=6)


def test_expected_tokens_is_the_bonus_plus_the_chance_of_each_prefix() -> None:
    assert expected_tokens([0.5, 0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([1.0, 0.0, 1.0], 3) == pytest.approx(2.0)
    assert expected_tokens([0.9], 4) == pytest.approx(1.9)  # no figures past the curve


def test_best_depth_trades_draft_levels_against_acceptance() -> None:
    likely, unlikely = [0.9] * 6, [0.3] * 6
    assert best_depth(likely, verify_s=1.0, level_s=0.01, max_depth=6) == 6
    assert best_depth(unlikely, verify_s=1.0, level_s=0.5, max_depth=6) == 1
    # tokens per second by depth: 1.9/1.2, 2.62/1.4 (best), 2.764/1.6, 2.894/1.8
    assert best_depth([0.9, 0.8, 0.2, 0.9], verify_s=1.0, level_s=0.2, max_depth=4) == 2


def chain_stats(acceptance: list[float], depth: int, steps: int, rng: random.Random,
                verify_s: float = 0.04, level_s: float = 0.02) -> SpecDecodeStats:
    """Steps of a chain ``depth`` deep whose position j is accepted with ``acceptance[j]``."""
    stats = SpecDecodeStats()
    for _ in range(steps):
        accepted = 0
        while accepted < depth and rng.random() < acceptance[accepted]:
            accepted += 1
        stats.observe_step(depth, accepted, level_s * depth, verify_s, depth)
    stats.num_output_tokens = stats.num_spec_steps + stats.num_accepted_tokens
    return stats


def test_step_statistics_count_where_drafts_were_tried() -> None:
    stats = SpecDecodeStats()
    stats.observe_step(4, 2, 0.1, 0.2, 4)  # positions 0, 1 accepted, 2 rejected, 3 unreached
    stats.observe_step(4, 4, 0.1, 0.2, 4)
    stats.observe_step(0, 0, 0.0, 0.2, 0)  # nothing drafted
    assert stats.accepted_per_pos == [2, 2, 1, 1]
    assert stats.tried_per_pos == [2, 2, 2, 1]
    assert stats.num_draft_levels == 8


def test_choose_depth_only_for_drafters_paying_per_level() -> None:
    rng = random.Random(0)
    record = ArmStats.from_spec_decode(chain_stats([0.2] * 6, 6, 200, rng), 1.0, 0.0)
    ngram = Arm(name="ngram_tree", drafter="ngram_tree", depth=6)
    assert choose_depth(ngram, record, rng) is None
    assert choose_depth(CHAIN, None, rng) is None
    few = ArmStats.from_spec_decode(chain_stats([0.2] * 6, 6, 5, rng), 1.0, 0.0)
    assert choose_depth(CHAIN, few, rng) is None
    assert Counter(choose_depth(CHAIN, record, rng) for _ in range(200)).most_common(1)[0][0] == 1


@pytest.mark.parametrize(("truth", "level_s", "expected"), [
    ([0.95, 0.9, 0.9, 0.85, 0.8, 0.8], 0.004, 6), ([0.95, 0.9, 0.9, 0.85, 0.8, 0.8], 0.02, 3),
    ([0.9, 0.85, 0.3, 0.2, 0.1, 0.1], 0.02, 2), ([0.3] * 6, 0.02, 1)])
@pytest.mark.parametrize("follows", [False, True])
def test_router_depth_converges_to_the_best_depth(truth: list[float], level_s: float,
                                                  expected: int, follows: bool) -> None:
    """Simulated layer-skip chain traffic with a known acceptance curve: the depths the router
    picks end at the depth that maximises tokens per second, whether it reads the store on each
    request or follows it (the depth drawn from the record its prepared route keeps)."""
    rng = random.Random(7)
    store = InProcessStatsStore(half_life_s=1e9)
    key = StatsKey("m", "A", CHAIN.name)
    router = ArmRouter([CHAIN.name], CHAIN.name, estimates=store_estimates(store, "m"),
                       rng=rng, specs={CHAIN.name: CHAIN})
    if follows:
        router.follow(store, "m")
    depths = []
    for _ in range(300):
        route = router.route("A")
        depth = route.depth or CHAIN.depth
        depths.append(depth)
        store.record(key, chain_stats(truth, depth, 20, rng, level_s=level_s), 1.0)
    assert best_depth(truth, 0.04, level_s, CHAIN.depth) == expected
    late = Counter(depths[-100:])
    assert late.most_common(1)[0][0] == expected, late
    assert late[expected] >= 80
    pinned = router.route("A", pinned=CHAIN.name)
    assert pinned == Route(CHAIN.name, None)


# --- routes prepared ahead of requests -----------------------------------------------------

def test_every_context_bucket_is_one_of_all_buckets() -> None:
    texts = [("def f(x):\n    return x + 1\n", False), ("Tell me a joke.", True),
             ("Summarise this. " + "The report says a lot. " * 40, True),
             ("Once upon a time there was a fox.", False)]
    seen = {context_bucket(text, is_chat, temperature, tokens)
            for text, is_chat in texts for temperature in (0.0, 0.5, 1.0)
            for tokens in (10, 300, 2000)}
    assert len(seen) == 36
    assert seen == set(policy.all_buckets())


def following_pair(exploration: str = "ucb", half_life_s: float = 3600.0):
    """A router following an in-process store (counting requests in flight, as over Redis), and
    one reading the same store per request."""
    clock = SimClock()
    store = InProcessStatsStore(half_life_s=half_life_s, clock=clock)
    priors = Priors.of(ARMS, "none", {"none": 60.0, "skip_chain": 66.0, "skip_tree": 63.0,
                                      "ngram_tree": 64.0})
    follower = ArmRouter(ARMS, "none", priors, rng=random.Random(0), exploration=exploration)
    follower.follow(store, "m", count_pending=True)  # as an ingress with Redis
    reader = ArmRouter(ARMS, "none", priors, estimates=store_estimates(store, "m"),
                       rng=random.Random(0), exploration=exploration)
    return store, clock, follower, reader


def look(router: ArmRouter, bucket: str) -> str:
    """The arm ``router`` would send a request of ``bucket`` to now; no request is sent."""
    return router.route(bucket, sent=0).arm


def record_goodput(store: InProcessStatsStore, bucket: str, arm: str, goodput: float) -> None:
    store.record(StatsKey("m", bucket, arm), SpecDecodeStats(num_output_tokens=100),
                 100 / goodput)


def test_prepared_routes_are_the_routes_chosen_per_request() -> None:
    """A following router's routes are looked up, not chosen on the request, and are the arms
    a router reading the store on each request picks on the same figures (decayed to the time
    the route was prepared: a request a few seconds later may see another arm of a near-tie)."""
    store, clock, follower, reader = following_pair()
    buckets = ["code.t0.ps", "chat.tlo.ps", "prose.thi.pm"]
    truth = {"code.t0.ps": {"none": 60, "skip_chain": 55, "skip_tree": 62, "ngram_tree": 90},
             "chat.tlo.ps": {"none": 70, "skip_chain": 75, "skip_tree": 60, "ngram_tree": 65},
             "prose.thi.pm": {"none": 50, "skip_chain": 50, "skip_tree": 58, "ngram_tree": 40}}
    rng = random.Random(3)
    estimates = follower.estimates
    calls = []
    follower.estimates = lambda bucket: calls.append(bucket) or estimates(bucket)
    arms_seen = set()
    prepared = {bucket: reader.choose(bucket) for bucket in buckets}  # by follow()
    for _ in range(150):
        bucket = rng.choice(buckets)
        arm = follower.choose(bucket)
        arms_seen.add(arm)
        calls.clear()
        record_goodput(store, bucket, arm, truth[bucket][arm] * rng.uniform(0.8, 1.2))
        # The record prepared its bucket's route (and, every half maximum age, the older ones).
        assert calls[0] == bucket
        swept = list(calls)
        prepared.update({other: reader.choose(other) for other in buckets if other in swept})
        assert {other: look(follower, other) for other in buckets} == prepared
        assert calls == swept  # ...and the requests only looked routes up
        clock.now += 1.0
    assert follower.chosen_on_request == 0
    assert follower.prepared_s > 0
    assert arms_seen >= {"ngram_tree", "skip_chain", "skip_tree"}  # each bucket's best found


def test_an_old_prepared_route_is_chosen_again() -> None:
    """A route older than its maximum age is chosen again on the request (the bucket's
    figures have decayed since); a store's notification first prepares again the routes past
    half that age."""
    store, clock, follower, reader = following_pair(half_life_s=1000.0)
    assert follower.route_max_age_s == pytest.approx(50.0)
    for _ in range(3):
        record_goodput(store, "code.t0.ps", "ngram_tree", 64.0)
    # Few requests after a long pause: the evidence has decayed, the prior counts again.
    clock.now += 2000.0
    before = follower.chosen_on_request
    assert look(follower, "code.t0.ps") == reader.choose("code.t0.ps")
    assert follower.chosen_on_request == before + 1
    clock.now += 26.0  # past half the maximum age: another bucket's record refreshes it too
    record_goodput(store, "chat.t0.ps", "none", 60.0)
    clock.now += 26.0  # 52 s after the request's choice, 26 s after the refresh
    assert look(follower, "code.t0.ps") == reader.choose("code.t0.ps")
    assert follower.chosen_on_request == before + 1


def test_a_route_prepared_on_old_figures_turns_when_they_decay() -> None:
    """What a prepared route's maximum age is for: the arm observed best holds while the
    figures are fresh; once they have faded the prior's favourite comes back, on the request
    after the maximum age."""
    store, clock, follower, reader = following_pair(half_life_s=100.0)
    for _ in range(5):
        for arm in ARMS:
            record_goodput(store, "chat.t0.ps", arm, 70.0 if arm == "none" else 50.0)
    assert follower.choose("chat.t0.ps") == "none"
    clock.now += 1000.0  # ten half-lives: the 12 requests weigh 0.01
    assert reader.choose("chat.t0.ps") == "skip_chain"  # the prior's favourite
    assert follower.choose("chat.t0.ps") == "skip_chain"


@pytest.mark.parametrize("mode", ["fixed", "thompson"])
def test_only_bayes_ucb_routes_are_prepared(mode: str) -> None:
    """Thompson sampling draws for each request, a fixed router has nothing to choose: following
    a store prepares nothing for either."""
    store = InProcessStatsStore(clock=SimClock())
    follower = ArmRouter(ARMS, "none", mode="fixed" if mode == "fixed" else "adaptive",
                         rng=random.Random(0), exploration="thompson" if mode == "thompson"
                         else "ucb")
    follower.follow(store, "m")
    follower.prepare()
    record_goodput(store, "code.t0.ps", "none", 60.0)
    if mode == "fixed":
        assert {follower.choose("code.t0.ps") for _ in range(20)} == {"none"}
    else:
        assert len({follower.choose("code.t0.ps") for _ in range(200)}) > 1
    assert follower.prepared_s == 0 and follower.chosen_on_request == 0


def test_a_following_router_survives_a_failing_listener(caplog) -> None:
    """A listener that raises is logged; the store keeps the record and tells the others."""
    store, clock, follower, reader = following_pair()

    def broken(buckets: list[str]) -> None:
        raise RuntimeError("listener bug")

    heard = []
    store.subscribe("m", broken)
    store.subscribe("m", heard.append)
    store.subscribe("other-model", heard.append)
    record_goodput(store, "code.t0.ps", "ngram_tree", 200.0)
    assert "listener bug" in caplog.text
    assert StatsKey("m", "code.t0.ps", "ngram_tree") in store.snapshot("m")
    assert heard == [["code.t0.ps"]]
    assert follower.choose("code.t0.ps") == reader.choose("code.t0.ps")
    assert follower.chosen_on_request == 0


def test_pending_requests_narrow_an_arm_s_spread_not_its_mean() -> None:
    """A pending request counts as an observation at the posterior's mean: the arm's spread
    shrinks as if it had been seen, its mean stays, the other arms are untouched, and the
    bucket's traffic (Bayes-UCB's quantile) counts it."""
    estimates = {"a": ArmEstimate(70.0, 4.0), "b": ArmEstimate(60.0, 2.0)}
    prior = {"a": 60.0, "b": 65.0, "c": 62.0}
    plain = {arm: (mean, spread) for arm, mean, spread in posteriors(estimates, prior)}
    with_pending = {arm: (mean, spread) for arm, mean, spread
                    in posteriors(estimates, prior, pending={"a": 6})}
    assert with_pending["a"][0] == pytest.approx(plain["a"][0])
    # Prior weight 2 and 4 requests seen: the spread's sqrt(2 + 4) becomes sqrt(2 + 4 + 6).
    assert with_pending["a"][1] == pytest.approx(plain["a"][1] * math.sqrt(6 / 12))
    assert {arm: v for arm, v in with_pending.items() if arm != "a"} == {
        arm: v for arm, v in plain.items() if arm != "a"}
    # Six requests in flight on "a" with nothing seen yet: Bayes-UCB's quantile rises with them
    # and "a" is no longer the only candidate it picks from its prior.
    assert bayes_ucb_choice({}, {"a": 66.0, "b": 65.0, "c": 62.0}) == "a"
    assert bayes_ucb_choice({}, {"a": 66.0, "b": 65.0, "c": 62.0}, pending={"a": 6}) == "b"


def test_a_following_router_counts_requests_in_flight_until_their_records_arrive() -> None:
    """Requests routed before their predecessors' figures are back no longer all follow one
    Bayes-UCB choice: each counts as pending on its arm until a record more shows on it."""
    store, clock, follower, reader = following_pair()
    bucket = "code.t0.ps"
    arms = [follower.choose(bucket) for _ in range(12)]
    assert len(set(arms)) > 1, arms  # before: twelve times the prior's favourite
    assert follower.pending(bucket) == Counter(arms)
    # Each request moved the bucket's next choice: only the first found it prepared.
    assert follower.chosen_on_request == 11
    assert reader.choose(bucket) == arms[0]  # a router counting nothing keeps to one arm
    first = arms[0]
    record_goodput(store, bucket, first, 70.0)
    assert follower.pending(bucket) == Counter(arms) - Counter([first])
    # Records of other arms or buckets cross off nothing of this arm.
    record_goodput(store, "chat.t0.ps", first, 70.0)
    assert follower.pending(bucket)[first] == Counter(arms)[first] - 1
    # A decision no request runs, and a router told not to count, leave nothing pending.
    before = follower.pending(bucket)
    assert look(follower, bucket) in ARMS and follower.pending(bucket) == before
    quiet = ArmRouter(ARMS, "none", rng=random.Random(0))
    quiet.follow(store, "m", count_pending=False)
    assert len({quiet.choose("prose.t0.ps") for _ in range(12)}) == 1
    assert quiet.pending("prose.t0.ps") == {}
    # A pinned request counts on its arm.
    follower.route("prose.t0.ps", pinned="skip_tree")
    assert follower.pending("prose.t0.ps") == {"skip_tree": 1}


def test_pending_requests_end_when_they_fail_or_their_records_are_overdue() -> None:
    """A request that ended without its figures (failed, refused, its client gone) stops
    counting at once; one that ended with them recorded counts for the store's feedback lag at
    most; one never heard of again for ``pending_max_s``."""
    store, clock, follower, reader = following_pair()
    bucket = "chat.t0.ps"
    follower.route(bucket, pinned="none", sent=3)  # three choices
    follower.route(bucket, pinned="none")
    assert follower.pending(bucket) == {"none": 4}
    follower.finished(bucket, "none", recorded=1, lost=2)  # the 3-choice request
    assert follower.pending(bucket) == {"none": 2}
    follower.finished(bucket, "none", recorded=1)
    assert follower.landing_s == pytest.approx(1.0)  # in process: records land at once
    clock.now += 0.5
    assert look(follower, bucket) and follower.pending(bucket) == {"none": 2}
    clock.now += 1.0  # both past their landing time with no record: overdue
    assert look(follower, bucket) and follower.pending(bucket) == {}
    follower.route(bucket, pinned="none")
    clock.now += follower.pending_max_s - 1
    assert look(follower, bucket) and follower.pending(bucket) == {"none": 1}
    clock.now += 2
    assert look(follower, bucket) and follower.pending(bucket) == {}
    # Finishing a request the router never counted changes nothing.
    follower.finished("prose.thi.pl", "none", recorded=0, lost=1)
    assert follower.pending("prose.thi.pl") == {}


def test_a_pinned_bucket_s_pending_records_do_not_pile_up() -> None:
    """A bucket whose requests are all pinned is never decided, where pending records were
    dropped when overdue: its list grew by every request (100,000 in half an hour at 50 a
    second, each request's end scanning them all)."""
    store, clock, follower, reader = following_pair()
    bucket = "code.thi.pl"
    for _ in range(2000):
        follower.route(bucket, pinned="none")
        follower.finished(bucket, "none", recorded=1)  # its record skipped: none ever lands
        clock.now += 0.1
    assert len(follower._pending[bucket]["none"]) <= follower.landing_s / 0.1 + 2
    assert follower.pending(bucket)["none"] <= follower.landing_s / 0.1 + 1


def test_pending_records_count_only_while_the_store_is_available() -> None:
    """With the store down no record can come: counted, the pending ones would narrow the
    arms' spreads with no figure ever to correct them, and the router would explore arms for
    nothing for the outage's length. They are kept (the records may land after it) and count
    again once it is back."""
    class FlakyStore(InProcessStatsStore):
        up = True

        @property
        def available(self) -> bool:
            return self.up

    store = FlakyStore(clock=SimClock())
    follower = ArmRouter(ARMS, "none", rng=random.Random(0))
    follower.follow(store, "m", count_pending=True)
    bucket = "code.t0.ps"
    store.up = False
    arms = [follower.choose(bucket) for _ in range(12)]
    assert set(arms) == {"none"}  # the arm its figures (the prior's) name, every time
    assert follower.pending(bucket) == {"none": 12}  # still kept
    store.up = True
    assert len({follower.choose(bucket) for _ in range(12)}) > 1


def test_only_a_shared_store_s_router_counts_requests_in_flight() -> None:
    """By default a router counts pending requests when it follows a store the decoders write
    to (Redis); not an in-process one, which an ingress without Redis reads alone (its
    pending requests would only ever expire, and explore the arms for nothing)."""
    from router.store import RedisStatsStore

    alone = ArmRouter(ARMS, "none")
    alone.follow(InProcessStatsStore(clock=SimClock()), "m")
    assert len({alone.choose("code.t0.ps") for _ in range(20)}) == 1
    assert alone.pending("code.t0.ps") == {}
    shared = ArmRouter(ARMS, "none")
    shared.follow(RedisStatsStore("redis://127.0.0.1:1/0"), "m")
    assert shared._counts_pending


def test_a_redis_store_s_records_stay_pending_for_its_flush_and_refresh() -> None:
    """The router waits for a record as long as the store takes to bring it: the writer's
    flush and the reader's refresh, twice over, and a second more."""
    from router.store import RedisStatsStore

    store = RedisStatsStore("redis://127.0.0.1:1/0", refresh_interval_s=2.0,
                            flush_interval_s=0.5)
    router = ArmRouter(ARMS, "none")
    router.follow(store, "m")
    assert router.landing_s == pytest.approx(2 * 2.5 + 1)


def test_a_failing_choice_routes_to_the_default_arm(caplog) -> None:
    """Figures no one foresaw (a bug, a record past any bound) must not fail a request that
    the default arm serves: the choice is logged and the bucket goes to the default arm."""
    router = ArmRouter(["none", "ngram"], "ngram", rng=random.Random(0))

    def broken(bucket: str):
        raise ZeroDivisionError("a figure no one foresaw")

    router.estimates = broken
    assert router.route("chat.t0.ps") == Route("ngram")
    assert "choosing an arm for bucket chat.t0.ps failed" in caplog.text


def test_a_choice_of_no_arm_routes_to_the_default_arm(caplog) -> None:
    """Scores that compare with nothing (a NaN goodput) chose no arm, and the request took arm
    None (a 500 when its metric was tagged with it)."""
    router = ArmRouter(["none", "ngram"], "ngram", rng=random.Random(0))
    router.estimates = lambda bucket: {"none": ArmEstimate(math.nan, 50.0),
                                       "ngram": ArmEstimate(math.nan, 50.0)}
    assert router.route("chat.t0.ps") == Route("ngram")
    assert "no arm chosen" in caplog.text


def test_a_long_line_is_read_by_its_end_not_its_statement_shape() -> None:
    """A line past ``STATEMENT_CHARS`` (leading whitespace aside) is not matched against the
    statement patterns (each could scan it whole): it is source by its end or operators only."""
    from router.policy import STATEMENT_CHARS

    long = "value = " + "a" * STATEMENT_CHARS
    assert classify_prompt(long + "\n", False) == "prose"
    assert classify_prompt(long + ";\n", False) == "code"
    assert classify_prompt(" " * 4 * STATEMENT_CHARS + "value = 1\n", False) == "code"


def test_records_with_figures_that_are_not_finite_are_refused() -> None:
    with pytest.raises(ValueError, match="not finite"):
        ArmStats.from_fields({"requests": "inf", "decode_time_s": "1.0"})
    with pytest.raises(ValueError, match="not finite"):
        ArmStats.from_fields({"requests": "2", "acc_pos:0": "nan"})


def test_depth_is_the_arms_own_when_nothing_was_timed() -> None:
    arm = Arm(name="skip_chain", drafter="skip_chain", skip_layers=[3, 4], depth=4)
    untimed = ArmStats(requests=10, num_spec_steps=50, num_drafts=50, num_draft_levels=100,
                       accepted_per_pos=[40, 30], tried_per_pos=[50, 40])
    assert choose_depth(arm, untimed, random.Random(0)) is None
