"""`s3d bench`: decoding methods side by side, in one process and one run, on one prompt suite.

Writes ``bench.json`` (one entry a method, ratios to ``hf_vanilla`` of the same run, and each
prompt's own figures and arm under ``runs``), ``bench.md``
(a table) and ``bench.png`` (tokens/s per method and category) into the output folder.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from router.policy import ArmRouter, Route, context_bucket, conversation_text
from workers.arm import NONE_ARM, Arm
from workers.engine import Engine, Generation
from workers.model import context_length, dtype_name
from workers.prompts import BenchPrompt
from workers.sampling import MIN_TEMPERATURE, SamplingParams
from workers.stats import SpecDecodeStats, nearest_rank

HF_METHODS = ("hf_vanilla", "hf_prompt_lookup", "hf_early_exit")
# Own methods run the profile's arm of the same name, but ``vanilla`` (the ``none`` arm), ``s3d``
# (the profile's fastest arm in the bench's dtype that drafts with S3D masks on every step,
# ``Arm.drafts_s3d``: ``s3d_fused``, ``s3d_skip`` or a merging hybrid) and the routers (an arm per
# request, exploring as the server does by default, or by Thompson sampling).
ROUTER_METHODS = {"router": "ucb", "router_thompson": "thompson"}
OWN_METHODS = ("vanilla", "skip_chain", "skip_tree", "ngram_tree", "hybrid", "s3d", "s3d_fused",
               "s3d_skip", *ROUTER_METHODS)
ALL_METHODS = HF_METHODS + OWN_METHODS


def missing_arm(method: str, arms: Sequence[Arm]) -> str | None:
    """Why ``method`` cannot run on a profile of ``arms``, or None when it can (HF's methods and
    the routers need no arm of their own; an unknown name is no concern of this)."""
    if method in HF_METHODS or method in ROUTER_METHODS:
        return None
    if method == "s3d":
        return None if any(a.drafts_s3d for a in arms) else (
            "method 's3d' needs an arm that drafts with S3D masks on every step (drafter s3d or "
            "s3d_skip, or hybrid without mask_fallback) in the profile")
    arm = NONE_ARM.name if method == "vanilla" else method
    if arm in {a.name for a in arms}:
        return None
    return f"method {method!r} needs an arm named {arm!r} in the profile"


def missing_arms(methods: Sequence[str], arms: Sequence[Arm]) -> str | None:
    """What each of ``methods`` whose arm ``arms`` (a profile's) lack needs, or None."""
    missing = [why for m in methods if (why := missing_arm(m, arms))]
    if not missing:
        return None
    return f"{'; '.join(missing)}; the profile's arms: {', '.join(a.name for a in arms)}"


def available_methods(arms: Sequence[Arm]) -> list[str]:
    """The methods a profile of ``arms`` has the arms for: what runs without ``--methods`` (the
    generic profile of a model without one of its own has only ``none`` and ``ngram_tree``)."""
    return [m for m in ALL_METHODS if missing_arm(m, arms) is None]


@dataclass
class PromptRun:
    prompt_id: str
    category: str
    tokens: list[int]
    seconds: float
    stats: SpecDecodeStats | None = None
    arm: str | None = None  # the arm that decoded it (own methods)

    def figures(self, rounded: bool = True) -> dict:
        """This prompt's line of ``bench.json`` (unrounded for figures taken from it: a ceiling
        from seconds rounded to 0.1 ms can fall below the rate it bounds on fast prompts)."""
        seconds, rate = self.seconds, len(self.tokens) / self.seconds if self.seconds else 0.0
        if rounded:
            seconds, rate = round(seconds, 4), round(rate, 3)
        return {"id": self.prompt_id, "category": self.category, "tokens": len(self.tokens),
                "seconds": seconds, "tokens_per_s": rate,
                "mean_accepted_length": (round(self.stats.mean_acceptance_length, 4)
                                         if self.stats is not None else None),
                "arm": self.arm}


@dataclass
class MethodRun:
    method: str
    detail: dict = field(default_factory=dict)
    runs: list[PromptRun] = field(default_factory=list)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far in MB, None where the platform keeps none.
    One figure for a run, never one a method: the methods share the process (the model, their
    pools) and take turns on every prompt, and the allocator keeps what one of them frees, so
    each method's high-water mark would be the process's."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # In bytes on macOS, in KiB on Linux and the BSDs.
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 2**10, 1)


def draws_from_pool(gen: Generation) -> Generation:
    """``gen`` drafting from its pool even when seeded. The bench seeds its sampled prompts so
    a run repeats; they stand for a server's unseeded requests, which draft from the replica's
    pool (a user's seeded request does not: the pool changes with every request, and the seed
    must give the same text). The bench's pools change in an order that repeats, run to run."""
    gen.draft_pool = gen.pool
    return gen


def truncate_at_stop(tokens: list[int], stops: frozenset[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in stops:
            return tokens[: i + 1]
    return tokens


# A router method times each request's decision and this many more on the same figures, each
# chosen on the request.
REPEAT_DECISIONS = 25


@dataclass
class RouterLog:
    """What one router method decided during a run: its arms and its decision times."""

    choices: list[str] = field(default_factory=list)
    decision_s: list[float] = field(default_factory=list)  # the requests' and the repeats'
    request_decision_s: list[float] = field(default_factory=list)  # the requests' own
    # Time the router spent choosing routes ahead of requests after each request's record, and
    # how many of its decisions still chose their arm on the request (no route prepared).
    prepare_s: list[float] = field(default_factory=list)
    chosen_on_request: int = 0

    def detail(self) -> dict:
        out = {"choices": dict(Counter(self.choices)),
               **percentiles_ms("decision", self.decision_s),
               **percentiles_ms("request_decision", self.request_decision_s)}
        if any(self.prepare_s):
            out |= {**percentiles_ms("prepare", self.prepare_s),
                    "chosen_on_request": self.chosen_on_request}
        return out


def percentiles_ms(name: str, seconds: list[float]) -> dict:
    """``{name}s`` (how many) and their p50, p99 and slowest in milliseconds."""
    ordered = sorted(seconds)
    return {f"{name}s": len(ordered),
            **{f"{name}_ms_p{p}": round(1e3 * nearest_rank(ordered, p / 100), 4)
               for p in (50, 99, 100) if ordered}}


class Bench:
    def __init__(self, engine: Engine, prompts: list[BenchPrompt], max_tokens: int,
                 params: SamplingParams, progress: bool = True,
                 temperatures: Sequence[float] | None = None):
        self.engine = engine
        self.prompts = prompts
        self.ids = [p.to_token_ids(engine.tokenizer) for p in prompts]
        self.max_tokens = max_tokens
        # Each prompt's sampling settings (``SamplingParams.for_prompt``), every method alike.
        self.prompt_params = [settings.for_prompt(index) for index, settings
                              in enumerate(mixed_params(prompts, params, temperatures))]
        self.progress = progress
        self.early_exit_layer: int | None = None
        self.router_logs: dict[str, RouterLog] = {}
        self.check_prompts()

    def check_prompts(self) -> None:
        """Refuse a suite that cannot run to its end, before the model decodes anything: the
        warm-up decodes only the first prompt, and a prompt failing mid-run loses the run."""
        if not self.prompts:
            raise ValueError("no prompts to run (the prompt file is empty)")
        context = context_length(self.engine.runner.config)
        too_long = [f"{p.id} ({len(ids)} + {self.max_tokens_for(p)})"
                    for p, ids in zip(self.prompts, self.ids, strict=True)
                    if len(ids) + self.max_tokens_for(p) > context]
        if too_long:
            raise ValueError(f"prompt plus max_tokens exceeds the model's context of {context} "
                             f"tokens for prompts {', '.join(too_long)}")
        empty = [p.id for p, ids in zip(self.prompts, self.ids, strict=True) if not ids]
        if empty:
            raise ValueError(f"prompts {', '.join(empty)} have no tokens")

    def max_tokens_for(self, prompt: BenchPrompt) -> int:
        return prompt.max_tokens or self.max_tokens

    # --- methods -------------------------------------------------------------------------

    def _own(self, arm_name: str | None) -> Callable[[int, int], PromptRun]:
        arm = self.engine.arm(arm_name)
        # Each method's own pool, as a replica serving only it would have: it grows with that
        # method's answers to the prompts before, never with another method's answer to this one.
        pool = self.engine.pool.copy()

        def run(index: int, max_tokens: int) -> PromptRun:
            gen = draws_from_pool(self.engine.generation(self.ids[index], max_tokens, arm,
                                                         self._params(index), pool=pool))
            t0 = time.perf_counter()
            gen.run()
            seconds = time.perf_counter() - t0
            p = self.prompts[index]
            return PromptRun(p.id, p.category, gen.output, seconds, gen.stats, arm.name)

        return run

    def _routed(self, exploration: str, log: RouterLog) -> Callable[[int, int], PromptRun]:
        """The adaptive router over the profile's arms, its statistics (its own) warming as it
        goes; its choices and decision times go to ``log``."""
        from router.store import InProcessStatsStore, StatsKey

        store = InProcessStatsStore()
        pool = self.engine.pool.copy()
        profile = self.engine.profile
        dtype = dtype_name(self.engine.runner.dtype)
        router, shadow = (ArmRouter.for_profile(profile, rng=random.Random(seed), dtype=dtype,
                                                exploration=exploration)
                          for seed in (0, 1))
        # ``shadow`` makes the same decisions again on the same figures, with random draws of
        # its own (the requests' choices stay those of ``router``): enough timings for a p99
        # that is not just the slowest of a few dozen requests. Both follow the store as the
        # ingress's router does with Redis: Bayes-UCB routes are chosen when a record changes
        # their bucket's figures, and a request sent out counts as pending on its arm until its
        # record arrives, so the bucket's next request chooses its arm on the request. Each of
        # the shadow's requests ends unrecorded at once: its decisions are all chosen on the
        # request, as a busy bucket's are (the requests' own, made one at a time, find their
        # routes prepared by the last record, as a quiet bucket's do).
        for policy in (router, shadow):
            policy.follow(store, "bench", count_pending=True)

        def decide(index: int, policy: ArmRouter) -> tuple[str, Route]:
            bucket = self.bucket(index)
            return bucket, policy.route(bucket)

        def run(index: int, max_tokens: int) -> PromptRun:
            p = self.prompts[index]
            decided = time.perf_counter()
            bucket, route = decide(index, router)
            log.decision_s.append(time.perf_counter() - decided)
            log.request_decision_s.append(log.decision_s[-1])
            arm = route.arm
            for _ in range(REPEAT_DECISIONS):
                started = time.perf_counter()
                shadowed = decide(index, shadow)[1]
                log.decision_s.append(time.perf_counter() - started)
                shadow.finished(bucket, shadowed.arm, recorded=0, lost=1)  # none runs
            gen = draws_from_pool(self.engine.generation(
                self.ids[index], max_tokens, arm, self._params(index), route.depth, pool))
            t0 = time.perf_counter()  # from here, as for the static methods
            gen.run()
            seconds = time.perf_counter() - t0
            prepared_s = router.prepared_s
            # Recorded as a replica does: its own steps after the first token.
            store.record(StatsKey("bench", bucket, arm), gen.stats, gen.stats.decode_time_s)
            router.finished(bucket, arm, recorded=1)
            log.prepare_s.append(router.prepared_s - prepared_s)
            log.chosen_on_request = router.chosen_on_request  # the shadow's always are
            log.choices.append(arm)
            return PromptRun(p.id, p.category, gen.output, seconds, gen.stats, arm)

        return run

    def _params(self, index: int) -> SamplingParams:
        return self.prompt_params[index]

    def bucket(self, index: int) -> str:
        """The router's context bucket of prompt ``index`` (class, temperature, length)."""
        p = self.prompts[index]
        text = p.prompt if p.messages is None else conversation_text(p.messages)
        return context_bucket(text, p.is_chat, self.prompt_params[index].temperature,
                              len(self.ids[index]))

    @property
    def buckets(self) -> list[str]:
        """Every prompt's router bucket (``report`` takes the routers' per-bucket ceiling)."""
        return [self.bucket(index) for index in range(len(self.prompts))]

    @property
    def temperatures(self) -> list[float]:
        """Each prompt's temperature (``report`` compares the greedy ones' outputs)."""
        return [params.temperature for params in self.prompt_params]

    def _hf(self, **extra) -> Callable[[int, int], PromptRun]:
        hf = self.engine.loaded.model
        tok = self.engine.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        def run(index: int, max_tokens: int) -> PromptRun:
            ids = torch.tensor([self.ids[index]], device=self.engine.runner.device)
            # Stopped on the tokens our engine stops on (the tokenizer's end token may not be
            # in the model's generation config): tokens past them would be timed, not counted.
            kwargs = dict(max_new_tokens=max_tokens, pad_token_id=pad,
                          eos_token_id=sorted(self.engine.stops), **extra)
            params = self._params(index)
            if params.greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                torch.manual_seed(params.seed)
                kwargs.update(do_sample=True, temperature=params.temperature,
                              top_p=params.top_p, top_k=params.top_k or None)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(ids, **kwargs)
            seconds = time.perf_counter() - t0
            tokens = truncate_at_stop(out[0, ids.shape[1]:].tolist(), self.engine.stops)
            p = self.prompts[index]
            return PromptRun(p.id, p.category, tokens, seconds)

        return run

    def choose_early_exit_layer(self, candidates=(6, 10, 14, 18, 22)) -> int:
        """HF's assistant_early_exit at the exit layer with the most tokens/s on one calibration
        prompt (not the fewest seconds: a sampled prompt ends at another length per layer)."""
        num_layers = self.engine.runner.num_layers
        best, best_rate = None, -1.0
        for layer in [c for c in candidates if c < num_layers]:
            run = self._hf(assistant_early_exit=layer)(0, min(32, self.max_tokens))
            rate = len(run.tokens) / run.seconds if run.seconds else 0.0
            if rate > best_rate:
                best, best_rate = layer, rate
        if best is None:
            raise ValueError(f"method 'hf_early_exit' needs an exit layer among {candidates} "
                             f"below the model's {num_layers} layers")
        self.early_exit_layer = best
        return best

    def method(self, name: str) -> tuple[Callable[[int, int], PromptRun], dict]:
        if name == "hf_vanilla":
            return self._hf(), {}
        if name == "hf_prompt_lookup":
            return self._hf(prompt_lookup_num_tokens=10), {"prompt_lookup_num_tokens": 10}
        if name == "hf_early_exit":
            layer = self.early_exit_layer or self.choose_early_exit_layer()
            return self._hf(assistant_early_exit=layer), {"assistant_early_exit": layer}
        if name == "vanilla":
            return self._own("none"), {"arm": "none"}
        if name in ROUTER_METHODS:
            log = self.router_logs[name] = RouterLog()
            return self._routed(ROUTER_METHODS[name], log), {
                "arms": [a.name for a in self.engine.profile.arms],
                "exploration": ROUTER_METHODS[name]}
        if name == "s3d":
            fastest = self.s3d_arm()
            if fastest is None:
                raise ValueError(f"{missing_arm(name, self.engine.profile.arms)}; it has "
                                 f"{self.profile_arms}")
            return self._own(fastest), {
                "arm": self.engine.arm(fastest).model_dump(),
                "fastest_of": [a.name for a in self.engine.profile.arms if a.drafts_s3d]}
        if name in OWN_METHODS or name in self.profile_arms:
            try:
                arm = self.engine.arm(name)
            except KeyError:
                raise ValueError(f"{missing_arm(name, self.engine.profile.arms)}; it has "
                                 f"{self.profile_arms}") from None
            return self._own(name), {"arm": arm.model_dump()}
        raise ValueError(f"unknown method {name!r}; known: {', '.join(ALL_METHODS)}")

    @property
    def profile_arms(self) -> list[str]:
        return [a.name for a in self.engine.profile.arms]

    @property
    def available_methods(self) -> list[str]:
        """The methods this profile has the arms for (``available_methods``)."""
        return available_methods(self.engine.profile.arms)

    def s3d_arm(self) -> str | None:
        """The arm method ``s3d`` runs (see ``OWN_METHODS``), or None."""
        return self.engine.profile.fastest(lambda arm: arm.drafts_s3d,
                                           dtype_name(self.engine.runner.dtype))

    def arm_of(self, method: str) -> str | None:
        """The profile arm a static method runs; None for HF's methods and the routers."""
        if method in HF_METHODS or method in ROUTER_METHODS:
            return None
        if method == "vanilla":
            return "none"
        return self.s3d_arm() if method == "s3d" else method

    def with_router_arms(self, methods: list[str]) -> list[str]:
        """``methods``, and with a router among them every profile arm they leave out, by the
        arm's name, before the first router: a router is compared with every arm it may
        choose, not only with those listed."""
        routers = [i for i, m in enumerate(methods) if m in ROUTER_METHODS]
        if not routers:
            return methods
        covered = {self.arm_of(m) for m in methods}
        missing = [arm for arm in self.profile_arms if arm not in covered]
        return methods[:routers[0]] + missing + methods[routers[0]:]

    # --- running ---------------------------------------------------------------------------

    def warm_up(self, methods: list[str]) -> None:
        for name in methods:
            run, _ = self.method(name)
            run(0, 4)

    def check_methods(self, methods: list[str]) -> list[str]:
        """The methods ``run`` runs (each once, and a router's arms), or ValueError for a name
        that is no method, or a method whose arm the profile lacks: refused before the run, not
        after the methods before it have warmed up."""
        unknown = [m for m in methods if m not in ALL_METHODS and m not in self.profile_arms]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(ALL_METHODS)} and "
                             f"the profile's arms {self.profile_arms}")
        if why := missing_arms(methods, self.engine.profile.arms):
            raise ValueError(why)
        methods = self.with_router_arms(list(dict.fromkeys(methods)))  # each method once
        if not methods:
            raise ValueError("no methods to run")
        return methods

    def run(self, methods: list[str]) -> list[MethodRun]:
        """Every method on a prompt before the next prompt, the order rotating by one each
        prompt: a shared host's speed drifts by tens of percent within minutes, and methods run
        one after another in blocks would be compared at different speeds."""
        methods = self.check_methods(methods)
        self.warm_up(methods)
        runners = {}
        results = {}
        for name in methods:
            runners[name], detail = self.method(name)
            results[name] = MethodRun(name, detail)
        bar = tqdm(total=len(methods) * len(self.prompts), disable=not self.progress,
                   desc="bench", unit="prompt")
        for index, prompt in enumerate(self.prompts):
            for name in rotated(methods, index):
                bar.set_postfix_str(f"{name} {prompt.id}")
                results[name].runs.append(runners[name](index, self.max_tokens_for(prompt)))
                bar.update()
        bar.close()
        for name in results.keys() & ROUTER_METHODS.keys():
            results[name].detail.update(self.router_logs[name].detail())
        return [results[name] for name in methods]


def mixed_params(prompts: list[BenchPrompt], params: SamplingParams,
                 temperatures: Sequence[float] | None) -> list[SamplingParams]:
    """``params`` for every prompt, or with ``temperatures`` a mixed suite: each category's
    k-th prompt decodes at ``temperatures[k % len(temperatures)]`` (the shipped suite interleaves
    its categories, so counting over the whole suite would give each category one temperature)."""
    if not temperatures:
        return [params] * len(prompts)
    seen: Counter[str] = Counter()
    out = []
    for p in prompts:
        out.append(replace(params, temperature=float(temperatures[seen[p.category]
                                                                   % len(temperatures)])))
        seen[p.category] += 1
    return out


def rotated(items: list[str], shift: int) -> list[str]:
    """``items`` started at ``shift`` (mod its length) and wrapped round."""
    shift %= max(len(items), 1)
    return items[shift:] + items[:shift]


def summarise(runs: list[PromptRun]) -> dict:
    tokens = sum(len(r.tokens) for r in runs)
    seconds = sum(r.seconds for r in runs)
    out = {"prompts": len(runs), "tokens": tokens, "seconds": round(seconds, 3),
           "tokens_per_s": round(tokens / seconds, 3) if seconds else 0.0,
           "mean_accepted_length": None, "acceptance_rate": None, "tokens_per_forward": None}
    stats = [r.stats for r in runs if r.stats is not None]
    if stats:
        total = SpecDecodeStats()
        for s in stats:
            total.merge(s)
        out["mean_accepted_length"] = round(total.mean_acceptance_length, 4)
        out["acceptance_rate"] = round(total.draft_acceptance_rate, 4)
        out["tokens_per_forward"] = round(total.tokens_per_forward, 4)
    return out


def report(results: list[MethodRun], *, temperatures: Sequence[float], meta: dict,
           buckets: Sequence[str] | None = None) -> dict:
    """Each method's figures, overall and per category, and per temperature for a mixed suite
    (``temperatures[i]``: prompt i's). ``identical_to_vanilla`` is the share of the greedy
    prompts on which a method's output equals plain decoding's (the method ``vanilla``, or the
    ``none`` arm run by its name), None without greedy prompts or such a run. A router method is
    compared with the static ones (``versus_static``; with ``buckets``, the prompts' router
    buckets, also with their best per bucket)."""
    greedy = [t < MIN_TEMPERATURE for t in temperatures]
    mixed = len(set(temperatures)) > 1
    by_name = {r.method: r for r in results}
    vanilla = next((r for r in results if r.method == "vanilla" or static_arm(
        {"method": r.method, "detail": r.detail}) == NONE_ARM.name), None)
    hf = by_name.get("hf_vanilla")
    hf_runs = hf.runs if hf else None
    hf_tps = summarise(hf_runs)["tokens_per_s"] if hf_runs else None
    entries = []
    for r in results:
        entry = {"method": r.method, **summarise(r.runs), "detail": r.detail}
        entry["speedup_vs_hf"] = (round(entry["tokens_per_s"] / hf_tps, 3) if hf_tps else None)
        if vanilla is not None and any(greedy):
            same = [a.tokens == b.tokens
                    for a, b, g in zip(r.runs, vanilla.runs, greedy, strict=True) if g]
            entry["identical_to_vanilla"] = round(sum(same) / len(same), 4)
        else:
            entry["identical_to_vanilla"] = None
        entry["categories"] = grouped(r.runs, hf_runs, [p.category for p in r.runs])
        if mixed:
            entry["temperatures"] = grouped(r.runs, hf_runs, [f"T={t:g}" for t in temperatures])
        entry["runs"] = [p.figures(rounded=False) for p in r.runs]  # for the ceilings
        entries.append(entry)
    for entry in entries:
        if entry["method"] in ROUTER_METHODS:
            entry["versus_static"] = versus_static(entry, entries, buckets)
    for entry, r in zip(entries, results, strict=True):
        entry["runs"] = [p.figures() for p in r.runs]
    return {"meta": meta, "results": entries}


def grouped(runs: list[PromptRun], hf_runs: list[PromptRun] | None,
            labels: list[str]) -> dict[str, dict]:
    """A method's figures per group of prompts (``labels[i]``: prompt i's group), each with its
    speedup over ``hf_vanilla`` on the same prompts."""
    out = {}
    for label in sorted(set(labels)):
        figures = summarise([r for r, g in zip(runs, labels, strict=True) if g == label])
        hf = (summarise([r for r, g in zip(hf_runs, labels, strict=True) if g == label])
              if hf_runs else None)
        figures["speedup_vs_hf"] = (round(figures["tokens_per_s"] / hf["tokens_per_s"], 3)
                                    if hf and hf["tokens_per_s"] else None)
        out[label] = figures
    return out


def static_arm(entry: dict) -> str | None:
    """The profile arm a report entry ran for every prompt, or None: HF's methods are no arm
    a router may choose, and a router chooses one per request."""
    method = entry["method"]
    if method in HF_METHODS or method in ROUTER_METHODS:
        return None
    arm = entry.get("detail", {}).get("arm", method)
    return arm.get("name") if isinstance(arm, dict) else arm


def static_entries(entries: list[dict]) -> list[dict]:
    """The entries of static arms, each arm once (``s3d`` runs an arm that may also be run
    by its own name: the first one counts)."""
    seen: set[str] = set()
    static = []
    for entry in entries:
        arm = static_arm(entry)
        if arm is not None and arm not in seen:
            seen.add(arm)
            static.append(entry)
    return static


def versus_static(router: dict, entries: list[dict],
                  buckets: Sequence[str] | None = None) -> dict | None:
    """The router's tokens/s as a ratio to the best static method's, overall and per category
    (each category's own best; per temperature too for a mixed suite), with those methods'
    names, and to the hindsight ceilings (``hindsight_best``) on each prompt and, given the
    prompts' router ``buckets``, in each bucket; None with no static method."""
    static = static_entries(entries)
    if not static:
        return None
    best = max(static, key=lambda e: e["tokens_per_s"])
    out = {"best": best["method"], "ratio": round(router["tokens_per_s"] / best["tokens_per_s"], 3)
           if best["tokens_per_s"] else None}
    for groups in ("categories", "temperatures"):
        if groups not in router:
            continue
        out[groups] = {}
        for label, figures in router[groups].items():
            group_best = max((e for e in static if label in e.get(groups, {})),
                             key=lambda e: e[groups][label]["tokens_per_s"])
            top = group_best[groups][label]["tokens_per_s"]
            out[groups][label] = {"best": group_best["method"], "ratio": round(
                figures["tokens_per_s"] / top, 3) if top else None}
    ceilings = {"hindsight": None, **({"hindsight_per_bucket": buckets} if buckets else {})}
    for key, groups in ceilings.items():
        hindsight = hindsight_best(static, groups)
        if hindsight and best["tokens_per_s"]:
            out[key] = {"tokens_per_s": round(hindsight, 3),
                        "ratio_to_best": round(hindsight / best["tokens_per_s"], 3),
                        "router_ratio": round(router["tokens_per_s"] / hindsight, 3)}
            if groups is not None:
                out[key]["buckets"] = len(set(groups))
    return out


def hindsight_best(static: list[dict], groups: Sequence[str] | None = None) -> float | None:
    """Tokens/s of the static methods' fastest on each prompt, taken in hindsight: the ceiling of
    any per-request choice among them on this run (slightly above it, as each prompt's best
    also picks up that method's luck with the host's noise). With ``groups`` (prompt i's group
    ``groups[i]``, a router bucket) the fastest on each group's prompts together: the ceiling of
    a policy that chooses per group. None without per-prompt runs."""
    runs = [e.get("runs") for e in static]
    if not runs or not all(runs) or len({len(r) for r in runs}) != 1:
        return None
    if groups is None:
        groups = [str(i) for i in range(len(runs[0]))]
    if len(groups) != len(runs[0]):
        return None
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    options = [[(sum(r[i]["tokens"] for i in indices), sum(r[i]["seconds"] for i in indices))
                for r in runs] for indices in members.values()]
    return best_total_rate(options)


def best_total_rate(options: list[list[tuple[float, float]]]) -> float | None:
    """The highest ``sum(tokens) / sum(seconds)`` of one ``(tokens, seconds)`` pick per group.

    Each group's fastest pick is not it when methods emit different token counts (sampled
    prompts): the best total trades a group's rate against its weight. Dinkelbach's method:
    with the rate ``r`` reached so far, each group picks the most ``tokens - r * seconds``; the
    total rate of those picks rises until no pick changes (a few rounds)."""
    rate, picks = 0.0, None
    while True:
        chosen = [max(group, key=lambda ts: ts[0] - rate * ts[1]) for group in options]
        tokens, seconds = sum(t for t, _ in chosen), sum(s for _, s in chosen)
        if not seconds:
            return None
        if chosen == picks or tokens / seconds <= rate:
            return max(rate, tokens / seconds)
        rate, picks = tokens / seconds, chosen


def machine_meta(engine: Engine, args: dict) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(engine.runner.device),
        "dtype": dtype_name(engine.runner.dtype),
        "quantization": engine.loaded.quantization,
        "pool_tokens": len(engine.pool),  # the replica's pool the methods start from
        "peak_rss_mb": peak_rss_mb(),  # the process's, model and every method's run included
        "model": engine.loaded.path,
        "torch": torch.__version__,
        **args,
    }


def write_outputs(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "bench.md").write_text(markdown_table(data))
    plot(data, out / "bench.png")


def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(data: dict) -> str:
    meta = data["meta"]
    dtype = meta["dtype"]
    if meta.get("quantization", "none") != "none":
        dtype += f" ({meta['quantization']} weights)"
    rss = (f", process peak RSS {meta['peak_rss_mb']:.0f} MB"
           if meta.get("peak_rss_mb") is not None else "")
    lines = [f"Benchmark: {meta['date']}, {meta['machine']}, {meta['device']}, {dtype}, "
             f"max_tokens {meta['max_tokens']}, {temperature_label(meta)}, "
             f"{data['results'][0]['prompts'] if data['results'] else 0} prompts{rss}", "",
             "| method | tokens/s | speedup vs hf | mean accepted length | tokens per forward | "
             "acceptance rate | identical to vanilla |",
             "|---|---|---|---|---|---|---|"]
    for e in data["results"]:
        lines.append(f"| {method_label(e)} | {_fmt(e['tokens_per_s'])} | "
                     f"{_fmt(e['speedup_vs_hf'])} | {_fmt(e['mean_accepted_length'])} | "
                     f"{_fmt(e.get('tokens_per_forward'))} | "
                     f"{_fmt(e['acceptance_rate'])} | {_fmt(e['identical_to_vanilla'])} |")
    for groups, by in (("categories", "category"), ("temperatures", "temperature")):
        labels = sorted({c for e in data["results"] for c in e.get(groups, {})})
        if not labels:
            continue
        lines += ["", f"Speedup vs hf_vanilla by {by} (tokens/s in brackets):", "",
                  "| method | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(labels)]
        for e in data["results"]:
            figures = e.get(groups, {})
            cells = [f"{_fmt(figures[c]['speedup_vs_hf'])} ({_fmt(figures[c]['tokens_per_s'], 1)})"
                     if c in figures else "-" for c in labels]
            lines.append(f"| {method_label(e)} | " + " | ".join(cells) + " |")
    for entry in data["results"]:
        if entry["method"] in ROUTER_METHODS:
            lines += ["", router_summary(entry)]
    return "\n".join(lines) + "\n"


def temperature_label(meta: dict) -> str:
    """``temperature 0.0``, or for a mixed suite ``temperatures 0/0.7/1 by category``."""
    if meta.get("temperatures"):
        return f"temperatures {'/'.join(f'{t:g}' for t in meta['temperatures'])} by category"
    return f"temperature {meta['temperature']}"


def method_label(entry: dict) -> str:
    """A method's name in the tables; ``s3d`` with the arm it ran (``s3d (s3d_skip)``)."""
    detail = entry.get("detail", {})
    if "fastest_of" in detail:
        return f"{entry['method']} ({detail['arm']['name']})"
    return entry["method"]


# The hindsight ceilings of ``versus_static``, in the order and words of ``router_summary``.
HINDSIGHT_CEILINGS = {
    "hindsight_per_bucket": "in each of the router's {buckets} buckets, picked in hindsight (the "
                            "ceiling of any choice per bucket)",
    "hindsight": "on each prompt, picked in hindsight (the ceiling of any per-request choice "
                 "among them)",
}


def router_summary(router: dict) -> str:
    """One paragraph: a router method against the static methods, its decision time, its
    arms."""
    parts = []
    vs = router.get("versus_static")
    if vs:
        cats = ", ".join(f"{cat} {_fmt(c['ratio'])}x ({c['best']})"
                         for cat, c in vs["categories"].items())
        parts.append(f"{router['method']}: {_fmt(vs['ratio'])}x the best static method "
                     f"({vs['best']}); by category, against each category's best: {cats}.")
        if vs.get("temperatures"):
            temps = ", ".join(f"{t} {_fmt(c['ratio'])}x ({c['best']})"
                              for t, c in vs["temperatures"].items())
            parts.append(f"By temperature, against each one's best: {temps}.")
        for key, where in HINDSIGHT_CEILINGS.items():
            if vs.get(key):
                h = vs[key]
                parts.append(f"The static methods' fastest {where.format(**h)}: "
                             f"{_fmt(h['ratio_to_best'], 3)}x the best static method; the router "
                             f"reached {_fmt(h['router_ratio'])}x of it.")
    detail = router.get("detail", {})
    if "decision_ms_p99" in detail:
        over = (f"{detail['decisions']} decisions ({router['prompts']} requests', and "
                f"{REPEAT_DECISIONS} more per request on the same figures, chosen on the "
                f"request)"
                if "decisions" in detail else f"{router['prompts']} requests")
        slowest = (f", slowest {_fmt(detail['decision_ms_p100'], 3)} ms"
                   if "decision_ms_p100" in detail else "")
        requests = ""
        if "request_decision_ms_p99" in detail:
            requests = (f"; the requests' own {detail['request_decisions']}: p50 "
                        f"{_fmt(detail['request_decision_ms_p50'], 3)} ms, p99 "
                        f"{_fmt(detail['request_decision_ms_p99'], 3)} ms, slowest "
                        f"{_fmt(detail['request_decision_ms_p100'], 3)} ms")
        parts.append(f"Decision time (prompt class, bucket, arm) p50 "
                     f"{_fmt(detail['decision_ms_p50'], 3)} ms, p99 "
                     f"{_fmt(detail['decision_ms_p99'], 3)} ms{slowest} over {over}"
                     f"{requests}.")
    if "prepare_ms_p99" in detail:
        parts.append(f"Routes chosen ahead of requests, after each request's record: p50 "
                     f"{_fmt(detail['prepare_ms_p50'], 3)} ms, p99 "
                     f"{_fmt(detail['prepare_ms_p99'], 3)} ms; "
                     f"{detail['chosen_on_request']} of the requests' decisions chose their arm "
                     f"on the request.")
    if detail.get("choices"):
        parts.append("Arms chosen: " + ", ".join(
            f"{arm} {n}" for arm, n in sorted(detail["choices"].items(), key=lambda kv: -kv[1]))
            + ".")
    return " ".join(parts)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    categories = sorted({c for e in results for c in e["categories"]})
    groups = ["all", *categories]
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.5 * len(groups) * len(results))), 4.5))
    for i, e in enumerate(results):
        values = [e["tokens_per_s"]] + [e["categories"].get(c, {}).get("tokens_per_s", 0)
                                        for c in categories]
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=e["method"])
    ax.set_xticks([g + width * (len(results) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("tokens / s")
    meta = data["meta"]
    ax.set_title(f"s3d bench: {meta['dtype']} on {meta['device']}, {temperature_label(meta)}")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
