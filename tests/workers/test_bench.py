"""`s3d bench` end to end on a few prompts: methods side by side, identical outputs, reports."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from workers.bench import (
    ALL_METHODS,
    REPEAT_DECISIONS,
    Bench,
    MethodRun,
    PromptRun,
    available_methods,
    best_total_rate,
    hindsight_best,
    machine_meta,
    markdown_table,
    peak_rss_mb,
    report,
    rotated,
    router_summary,
    static_entries,
    versus_static,
    write_outputs,
)
from workers.engine import Engine, generic_profile, resolve_profile
from workers.prompts import load_prompts
from workers.sampling import SamplingParams
from workers.stats import nearest_rank

METHODS = ["hf_vanilla", "vanilla", "ngram_tree", "s3d", "router", "router_thompson"]


def test_bench_runs_methods_side_by_side_and_reports_them(bundled, tmp_path):
    engine = Engine(bundled.loaded, bundled.runner, bundled.stops,
                    resolve_profile(None, bundled.loaded.fingerprint, bundled.runner.num_layers))
    suite = load_prompts(limit=3)
    bench = Bench(engine, suite, 6, SamplingParams())
    results = bench.run(METHODS)
    data = report(results, temperatures=bench.temperatures, buckets=bench.buckets, meta={
        "date": "now", "machine": "test", "device": "cpu", "dtype": "float32", "max_tokens": 6,
        "temperature": 0.0})
    write_outputs(data, tmp_path)

    entries = {e["method"]: e for e in json.loads((tmp_path / "bench.json").read_text())["results"]}
    # With a router, every profile arm the methods leave out runs by its name, before the
    # routers: a router is compared with every arm it may choose.
    s3d_arm = engine.profile.fastest(lambda a: a.drafts_s3d, "float32")
    added = [a.name for a in engine.profile.arms
             if a.name not in {"none", "ngram_tree", s3d_arm}]
    assert "ngram_tree_code" in added
    assert list(entries) == METHODS[:4] + added + METHODS[4:]
    assert {run["arm"] for run in entries["ngram_tree_code"]["runs"]} == {"ngram_tree_code"}
    static_arms = {e["detail"]["arm"] if isinstance(e["detail"]["arm"], str)
                   else e["detail"]["arm"]["name"] for e in static_entries(list(entries.values()))}
    assert static_arms == {a.name for a in engine.profile.arms}
    assert entries["hf_vanilla"]["speedup_vs_hf"] == 1.0
    for name, entry in entries.items():
        assert entry["prompts"] == 3 and entry["tokens_per_s"] > 0
        assert entry["identical_to_vanilla"] == 1.0, name
        assert [run["id"] for run in entry["runs"]] == [p.id for p in suite]
        assert sum(run["tokens"] for run in entry["runs"]) == entry["tokens"]
        assert set(entry["categories"]) == {p.category for p in suite}
    assert {run["arm"] for run in entries["ngram_tree"]["runs"]} == {"ngram_tree"}
    assert {run["arm"] for run in entries["vanilla"]["runs"]} == {"none"}
    # `s3d` runs the profile's fastest arm drafting with S3D masks on every step in this dtype
    # (merging hybrids included, not the one whose masks only fill in), and the table names it.
    s3d_kinds = {a.name for a in engine.profile.arms if a.drafts_s3d}
    assert s3d_arm in s3d_kinds and {"s3d_fused", "s3d_skip", "hybrid_merged"} <= s3d_kinds
    assert "hybrid" not in s3d_kinds
    assert {run["arm"] for run in entries["s3d"]["runs"]} == {s3d_arm}
    assert sorted(entries["s3d"]["detail"]["fastest_of"]) == sorted(s3d_kinds)
    table = (tmp_path / "bench.md").read_text()
    for router, exploration in (("router", "ucb"), ("router_thompson", "thompson")):
        # Each router's per-prompt arms are the profile's, and its counts add up to them.
        arms = [run["arm"] for run in entries[router]["runs"]]
        assert set(arms) <= {a.name for a in engine.profile.arms}
        detail = entries[router]["detail"]
        assert sum(detail["choices"].values()) == 3 and detail["exploration"] == exploration
        # Against the static methods (hf_vanilla is the reference and the other router no arm),
        # overall and per category; its decision time is measured per request.
        vs = entries[router]["versus_static"]
        assert vs["best"] not in ("hf_vanilla", "router", "router_thompson") and set(
            vs["categories"]) == {p.category for p in suite}
        best_tps = entries[vs["best"]]["tokens_per_s"]
        assert vs["ratio"] == round(entries[router]["tokens_per_s"] / best_tps, 3)
        assert 0 < detail["decision_ms_p50"] <= detail["decision_ms_p99"] <= detail[
            "decision_ms_p100"]
        assert detail["decisions"] == 3 * (1 + REPEAT_DECISIONS)  # each request's, and repeats
        assert detail["request_decisions"] == 3  # the requests' own, also apart
        assert 0 < detail["request_decision_ms_p50"] <= detail["request_decision_ms_p100"]
        summary = router_summary(entries[router])
        assert f"over {detail['decisions']} decisions (3 requests'" in summary
        assert "the requests' own 3: p50" in summary
        if exploration == "ucb":
            # Bayes-UCB's routes are prepared after each record: every decision looked one up.
            assert detail["prepares"] == 3 and detail["prepare_ms_p99"] > 0
            assert detail["chosen_on_request"] == 0
            assert "0 of the requests' decisions chose their arm on the request" in summary
        else:
            assert "prepares" not in detail and "ahead of requests" not in summary
        assert summary.startswith(f"{router}: {vs['ratio']:.2f}x the best static method "
                                  f"({vs['best']})") and summary in table
        assert vs["hindsight"]["ratio_to_best"] >= 1.0 and "picked in hindsight" in summary
        # The per-bucket ceiling: the static methods' best per bucket of these prompts.
        per_bucket = vs["hindsight_per_bucket"]
        assert per_bucket["buckets"] == len(set(bench.buckets))
        assert 1.0 <= per_bucket["ratio_to_best"] <= vs["hindsight"]["ratio_to_best"]
    assert entries["ngram_tree"]["mean_accepted_length"] >= 1.0
    # Tokens per model pass: the MAL where the drafter has no pass of its own.
    assert entries["vanilla"]["tokens_per_forward"] == 1.0
    assert entries["ngram_tree"]["tokens_per_forward"] == entries["ngram_tree"][
        "mean_accepted_length"]
    assert entries["hf_vanilla"]["tokens_per_forward"] is None
    assert table == markdown_table(data) and all(
        f"| {m} |" in table for m in METHODS + added if m != "s3d")
    assert f"| s3d ({s3d_arm}) |" in table
    assert (tmp_path / "bench.png").stat().st_size > 0
    meta = machine_meta(engine, {"max_tokens": 6})
    assert (meta["quantization"], meta["pool_tokens"]) == ("none", len(engine.pool))
    assert meta["peak_rss_mb"] > 100  # the process's, the model's weights included
    quantized = {**data, "meta": {**data["meta"], "quantization": "8bit"}}
    assert "cpu, float32 (8bit weights), max_tokens 6" in markdown_table(quantized)
    assert "temperatures" not in entries["router"] and "temperatures" not in vs


def test_mixed_suite_gives_each_category_every_temperature(bundled, tmp_path, monkeypatch):
    """``temperatures``: each category's k-th prompt decodes at the (k mod n)-th, for every
    method alike (the router's buckets included); only the greedy prompts must match plain
    decoding, and a sampled one's output is the seed's for every method."""
    from workers import bench as bench_module

    engine = Engine(bundled.loaded, bundled.runner, bundled.stops,
                    resolve_profile(None, bundled.loaded.fingerprint, bundled.runner.num_layers))
    suite = load_prompts(limit=6)  # code, chat, summaries, twice
    bench = Bench(engine, suite, 5, SamplingParams(top_p=0.9, seed=7), temperatures=[0.0, 1.0])
    assert bench.temperatures == [0.0] * 3 + [1.0] * 3
    assert [p.seed for p in bench.prompt_params[3:]] == [10, 11, 12]
    assert {p.top_p for p in bench.prompt_params} == {0.9}
    temperatures = []

    def bucket(text, is_chat, temperature, prompt_tokens):
        temperatures.append(temperature)
        return real_bucket(text, is_chat, temperature, prompt_tokens)

    real_bucket = bench_module.context_bucket
    monkeypatch.setattr(bench_module, "context_bucket", bucket)
    methods = ["hf_vanilla", "vanilla", "ngram_tree", "router"]
    results = bench.run(methods)
    assert temperatures[::1 + REPEAT_DECISIONS][-6:] == [0.0] * 3 + [1.0] * 3
    assert [b.split(".")[1] for b in bench.buckets] == ["t0"] * 3 + ["thi"] * 3
    data = report(results, temperatures=bench.temperatures, meta={
        "date": "now", "machine": "test", "device": "cpu", "dtype": "float32", "max_tokens": 5,
        "temperature": 0.0, "temperatures": [0.0, 1.0]})
    entries = {e["method"]: e for e in data["results"]}
    for name in methods:
        assert entries[name]["identical_to_vanilla"] == 1.0, name  # over the greedy three
        # Per temperature as per category, each over its own prompts.
        by_t = entries[name]["temperatures"]
        assert set(by_t) == {"T=0", "T=1"} and {f["prompts"] for f in by_t.values()} == {3}
        assert sum(f["tokens"] for f in by_t.values()) == entries[name]["tokens"]
    assert entries["hf_vanilla"]["temperatures"]["T=1"]["speedup_vs_hf"] == 1.0
    vs = entries["router"]["versus_static"]
    assert set(vs["temperatures"]) == {"T=0", "T=1"}
    assert vs["temperatures"]["T=1"]["best"] in {e["method"] for e in static_entries(
        data["results"])}
    # A sampled prompt decodes from its own seed: run again, plain decoding gives it again.
    again = Bench(engine, suite, 5, SamplingParams(top_p=0.9, seed=7), temperatures=[0.0, 1.0])
    rerun = again.run(["vanilla"])[0].runs
    assert [r.tokens for r in rerun] == [r.tokens for r in results[1].runs]
    table = markdown_table(data)
    assert "temperatures 0/1 by category" in table
    assert "by temperature (tokens/s in brackets)" in table and "| T=0 | T=1 |" in table
    assert "By temperature, against each one's best: T=0 " in table
    assert "hindsight_per_bucket" not in vs  # without the prompts' buckets
    # Without temperatures every prompt takes the one setting, and there is no such table.
    assert Bench(engine, suite, 5, SamplingParams(temperature=0.7)).temperatures == [0.7] * 6


def test_versus_static_takes_each_categorys_own_best_and_skips_the_reference():
    def entry(method, tps, chat, code):
        return {"method": method, "tokens_per_s": tps, "categories": {
            "chat": {"tokens_per_s": chat}, "code": {"tokens_per_s": code}}}

    entries = [entry("hf_vanilla", 90.0, 90.0, 90.0), entry("vanilla", 20.0, 30.0, 10.0),
               entry("ngram_tree", 30.0, 20.0, 40.0), entry("router_thompson", 50.0, 50.0, 50.0),
               entry("router", 33.0, 27.0, 40.0)]
    vs = versus_static(entries[-1], entries)  # the other router is no static arm either
    assert vs == {"best": "ngram_tree", "ratio": 1.1, "categories": {
        "chat": {"best": "vanilla", "ratio": 0.9}, "code": {"best": "ngram_tree", "ratio": 1.0}}}
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert nearest_rank([1.0, 2.0], 0.99) == 2.0 and nearest_rank([1.0, 2.0], 0.0) == 1.0
    assert nearest_rank([], 0.99) is None


def test_hindsight_takes_each_prompts_fastest_static_method():
    """The per-prompt best in hindsight: vanilla wins the first prompt, ngram_tree the second."""
    def entry(method, runs):
        tokens = sum(t for t, _ in runs)
        seconds = sum(s for _, s in runs)
        return {"method": method, "tokens_per_s": tokens / seconds, "categories": {},
                "runs": [{"tokens": t, "seconds": s} for t, s in runs]}

    entries = [entry("hf_vanilla", [(10, 0.1), (10, 0.1)]),  # fastest, but the reference
               entry("vanilla", [(10, 1.0), (10, 4.0)]),
               entry("ngram_tree", [(10, 2.0), (10, 1.0)]),
               entry("router", [(10, 1.0), (10, 2.0)])]
    assert hindsight_best(entries[1:3]) == 20 / 2.0
    vs = versus_static(entries[-1], entries)
    assert vs["best"] == "ngram_tree"  # 20 tokens in 3 s
    assert vs["hindsight"] == {"tokens_per_s": 10.0, "ratio_to_best": 1.5,
                               "router_ratio": round((20 / 3.0) / 10.0, 3)}
    assert "1.500x the best static method; the router reached 0.67x of it" in router_summary(
        {"method": "router", "versus_static": vs, "detail": {}})
    # Methods without per-prompt runs (or with different prompt counts) give no hindsight.
    assert hindsight_best([entries[1], {**entries[2], "runs": entries[2]["runs"][:1]}]) is None
    # Per group (a router bucket): one method for both prompts, ngram_tree's 20 tokens in 3 s;
    # a group per prompt is the per-prompt ceiling again.
    assert hindsight_best(entries[1:3], ["b", "b"]) == 20 / 3.0
    assert hindsight_best(entries[1:3], ["b", "c"]) == 20 / 2.0
    assert hindsight_best(entries[1:3], ["b"]) is None  # not one group per prompt
    vs = versus_static(entries[-1], entries, ["b", "b"])
    assert vs["hindsight_per_bucket"] == {"tokens_per_s": round(20 / 3.0, 3), "buckets": 1,
                                          "ratio_to_best": 1.0, "router_ratio": 1.0}
    assert ("fastest in each of the router's 1 buckets, picked in hindsight (the ceiling of any "
            "choice per bucket): 1.000x") in router_summary(
        {"method": "router", "versus_static": vs, "detail": {}})


def test_hindsight_maximises_the_total_rate_when_token_counts_differ():
    # Sampled prompts end at different lengths per method. Method b is a little faster on the
    # first prompt but emits few tokens there: taking each prompt's fastest (b, then either)
    # gives 148 tokens in 5.6 s = 26.4 tokens/s, below a's 256 in 9.0 s = 28.4, which is then
    # the ceiling (and per prompt is never below per bucket).
    def entry(method, runs):
        return {"method": method, "tokens_per_s": sum(t for t, _ in runs) / sum(
            s for _, s in runs), "categories": {},
            "runs": [{"tokens": t, "seconds": s} for t, s in runs]}

    a = entry("vanilla", [(128, 4.0), (128, 5.0)])
    b = entry("ngram_tree", [(20, 0.6), (128, 5.0)])
    assert hindsight_best([a, b]) == pytest.approx(256 / 9.0)
    assert hindsight_best([a, b], ["x", "x"]) == pytest.approx(256 / 9.0)
    assert hindsight_best([a, b]) >= max(a["tokens_per_s"], b["tokens_per_s"])
    # The exact optimum over every pick, against brute force on a few random groups.
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(50):
        groups = [[(rng.randint(1, 100), rng.uniform(0.1, 5.0)) for _ in range(3)]
                  for _ in range(4)]
        brute = max(sum(t for t, _ in picks) / sum(s for _, s in picks)
                    for picks in itertools.product(*groups))
        assert best_total_rate(groups) == pytest.approx(brute)
    assert best_total_rate([[(0, 0.0)]]) is None


def test_static_arms_are_the_profile_arms_each_once():
    entries = [{"method": "hf_prompt_lookup", "tokens_per_s": 99.0, "detail": {}},
               {"method": "hf_early_exit", "tokens_per_s": 98.0, "detail": {}},
               {"method": "vanilla", "tokens_per_s": 10.0, "detail": {"arm": "none"}},
               {"method": "s3d", "tokens_per_s": 30.0,
                "detail": {"arm": {"name": "hybrid_merged"}, "fastest_of": []}},
               {"method": "hybrid_merged", "tokens_per_s": 31.0,
                "detail": {"arm": {"name": "hybrid_merged"}}},
               {"method": "router", "tokens_per_s": 20.0, "detail": {"arms": []}}]
    assert [e["method"] for e in static_entries(entries)] == ["vanilla", "s3d"]
    # HF's methods are no arm a router may choose: never "the best static method".
    assert versus_static(entries[-1], entries)["best"] == "s3d"


def test_bench_refuses_unknown_methods(bundled):
    engine = Engine(bundled.loaded, bundled.runner, bundled.stops,
                    resolve_profile(None, bundled.loaded.fingerprint, bundled.runner.num_layers))
    bench = Bench(engine, load_prompts(limit=1), 4, SamplingParams())
    with pytest.raises(ValueError, match="unknown methods"):
        bench.run(["vanilla", "warp_drive"])
    with pytest.raises(ValueError, match="no methods"):
        bench.run([])
    # A method listed twice runs once (it once ran twice per prompt, and the report failed
    # after the whole run); a profile arm runs by its name.
    runs = bench.run(["vanilla", "ngram_tree_code", "vanilla"])
    assert [r.method for r in runs] == ["vanilla", "ngram_tree_code"]
    assert [len(r.runs) for r in runs] == [1, 1]
    # HF's early exit needs a layer to exit at; a model too shallow for every candidate is
    # refused, not run as plain generate under the early-exit name.
    with pytest.raises(ValueError, match="exit layer"):
        bench.choose_early_exit_layer(candidates=(99,))


def test_hf_baseline_stops_on_the_engine_s_stop_tokens(bundled, monkeypatch):
    engine = Engine(bundled.loaded, bundled.runner, bundled.stops,
                    resolve_profile(None, bundled.loaded.fingerprint, bundled.runner.num_layers))
    bench = Bench(engine, load_prompts(limit=1), 4, SamplingParams())
    seen = {}

    def generate(ids, **kwargs):
        seen.update(kwargs)
        return ids

    monkeypatch.setattr(bundled.loaded.model, "generate", generate)
    run, _ = bench.method("hf_vanilla")
    run(0, 4)
    assert seen["eos_token_id"] == sorted(bundled.stops)


def test_rotated_starts_at_the_shift_and_wraps():
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert rotated([], 3) == []


def test_bench_interleaves_methods_prompt_by_prompt(bundled, monkeypatch):
    """Every method decodes a prompt before the next prompt starts, in an order rotating by one
    each prompt, so a host's drifting speed reaches every method alike."""
    engine = Engine(bundled.loaded, bundled.runner, bundled.stops,
                    resolve_profile(None, bundled.loaded.fingerprint, bundled.runner.num_layers))
    suite = load_prompts(limit=3)
    bench = Bench(engine, suite, 4, SamplingParams())
    calls = []

    def method(name):
        def run(index, max_tokens):
            calls.append((index, name))
            return PromptRun(suite[index].id, suite[index].category, [1], 0.01)
        return run, {}

    monkeypatch.setattr(bench, "method", method)
    results = bench.run(["vanilla", "ngram_tree", "hybrid"])
    timed = calls[3:]  # after one warm-up call each
    assert timed == [(0, "vanilla"), (0, "ngram_tree"), (0, "hybrid"),
                     (1, "ngram_tree"), (1, "hybrid"), (1, "vanilla"),
                     (2, "hybrid"), (2, "vanilla"), (2, "ngram_tree")]
    assert [r.method for r in results] == ["vanilla", "ngram_tree", "hybrid"]
    assert all([run.prompt_id for run in r.runs] == [p.id for p in suite] for r in results)


META = {"date": "now", "machine": "test", "device": "cpu", "dtype": "float32", "max_tokens": 4,
        "temperature": 0.0}


def runs(outputs: list[list[int]], seconds: float = 0.1) -> list[PromptRun]:
    return [PromptRun(f"p{i}", "chat", tokens, seconds) for i, tokens in enumerate(outputs)]


def test_peak_rss_is_the_process_s_once_not_a_column_per_method(monkeypatch):
    """The methods share the process and take turns on every prompt: each one's high-water mark
    was the process's, the same figure in every row. It is given once, in the header."""
    data = report([MethodRun("vanilla", {"arm": "none"}, runs([[1, 2]])),
                   MethodRun("ngram_tree", {"arm": "ngram_tree"}, runs([[1, 2]]))],
                  temperatures=[0.0], meta={**META, "peak_rss_mb": 2091.4})
    assert all("peak_rss_mb" not in e for e in data["results"])
    table = markdown_table(data)
    assert table.splitlines()[0].endswith("1 prompts, process peak RSS 2091 MB")
    assert "peak RSS MB |" not in table
    assert "| ngram_tree | 20.00 | - | - | - | - | 1.00 |" in table


def test_peak_rss_reads_ru_maxrss_in_the_platform_s_unit(monkeypatch):
    """Bytes on macOS, KiB on Linux (it was taken for KiB everywhere)."""
    import resource

    for platform, unit in (("darwin", 1), ("linux", 2**10)):
        monkeypatch.setattr(sys, "platform", platform)
        monkeypatch.setattr(resource, "getrusage",
                            lambda who, unit=unit: SimpleNamespace(ru_maxrss=3 * 2**30 // unit))
        assert peak_rss_mb() == 3072.0


def test_identical_to_vanilla_compares_with_the_none_arm_run_by_its_name():
    """With a router and no ``vanilla``, plain decoding runs as the profile arm ``none``: the
    outputs are compared with that run's."""
    none = {"arm": {"name": "none", "drafter": "none"}}
    results = [MethodRun("none", none, runs([[1, 2], [3, 4]])),
               MethodRun("ngram_tree", {"arm": {"name": "ngram_tree"}}, runs([[1, 2], [3, 5]])),
               MethodRun("router", {"arms": ["none", "ngram_tree"]}, runs([[1, 2], [3, 4]]))]
    data = report(results, temperatures=[0.0, 0.0], meta=META)
    assert [e["identical_to_vanilla"] for e in data["results"]] == [1.0, 0.5, 1.0]


def test_hindsight_ceiling_uses_unrounded_seconds_on_fast_prompts():
    """Per-prompt seconds rounded to 0.1 ms (as ``bench.json`` shows them) put the ceiling of a
    single static method 0.4% below that method's own tokens/s; unrounded it is the same."""
    results = [MethodRun("vanilla", {"arm": "none"}, runs([[1, 2, 3]] * 2, 0.01235001)),
               MethodRun("router", {"arms": ["none"]}, runs([[1, 2, 3]] * 2, 0.0125))]
    data = report(results, temperatures=[0.0, 0.0], meta=META, buckets=["b", "b"])
    vs = data["results"][1]["versus_static"]
    assert vs["hindsight"]["ratio_to_best"] == vs["hindsight_per_bucket"]["ratio_to_best"] == 1.0
    assert data["results"][0]["runs"][0]["seconds"] == 0.0124  # rounded in the JSON


@pytest.fixture
def engine(bundled) -> Engine:
    return Engine(bundled.loaded, bundled.runner, bundled.stops,
                  resolve_profile(None, bundled.loaded.fingerprint, bundled.runner.num_layers))


def test_bench_refuses_prompts_that_cannot_run_before_any_method_runs(engine):
    """A prompt whose length plus max_tokens exceeds the context failed mid-run (the warm-up
    decodes only the first prompt), losing the run; no prompts at all failed in the warm-up."""
    suite = load_prompts(limit=2)
    context = engine.runner.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"context of {context} tokens for prompts "
                                         f"{suite[0].id} .*, {suite[1].id} "):
        Bench(engine, suite, context, SamplingParams())
    long_one = [suite[0], suite[1].model_copy(update={"max_tokens": context})]
    with pytest.raises(ValueError, match=f"prompts {suite[1].id} \\("):
        Bench(engine, long_one, 4, SamplingParams())
    with pytest.raises(ValueError, match="no prompts"):
        Bench(engine, [], 4, SamplingParams())


def test_methods_are_those_the_profile_has_arms_for(bundled, monkeypatch):
    """A profile without the layer-skip or S3D arms (the generic one of a model without its own):
    by default only the methods it has the arms for run, and one named without its arm is
    refused before the warm-up, not after the methods before it have loaded and warmed up."""
    generic = generic_profile(bundled.loaded.fingerprint)
    assert available_methods(generic.arms) == ["hf_vanilla", "hf_prompt_lookup", "hf_early_exit",
                                               "vanilla", "ngram_tree", "router",
                                               "router_thompson"]
    engine = Engine(bundled.loaded, bundled.runner, bundled.stops, generic)
    bench = Bench(engine, load_prompts(limit=1), 4, SamplingParams())
    assert bench.available_methods == available_methods(generic.arms)
    monkeypatch.setattr(bench, "warm_up", lambda methods: pytest.fail("warmed up"))
    with pytest.raises(ValueError, match="'skip_chain' needs an arm named 'skip_chain'.*'s3d' "
                                         "needs an arm that drafts.*arms: none, ngram_tree"):
        bench.run(["vanilla", "skip_chain", "s3d"])
    full = resolve_profile(None, bundled.loaded.fingerprint, bundled.runner.num_layers)
    assert available_methods(full.arms) == list(ALL_METHODS)


def test_early_exit_layer_is_chosen_by_tokens_per_second(engine, monkeypatch):
    """A sampled calibration prompt ends at another length per exit layer: the fewest seconds
    may be the fewest tokens."""
    bench = Bench(engine, load_prompts(limit=1), 32, SamplingParams())
    timings = {6: (4, 0.1), 10: (32, 0.2), 14: (30, 0.3)}

    def hf(assistant_early_exit):
        tokens, seconds = timings.get(assistant_early_exit, (1, 1.0))
        return lambda index, max_tokens: PromptRun("p", "chat", [1] * tokens, seconds)

    monkeypatch.setattr(bench, "_hf", hf)
    assert bench.choose_early_exit_layer() == 10
