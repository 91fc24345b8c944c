"""The pool of earlier outputs: lookups, bounds, files; lossless drafting from it on the bundled
model; the benchmark and the search keep each arm's answers out of the others' pools."""

import pytest

from tests.workers.conftest import Killed, cut_short
from workers.arm import Arm
from workers.pool import BUNDLED_POOL, PoolMismatchError, TokenPool, resolve_pool


def test_longest_ngram_first_then_newest_occurrence_first():
    pool = TokenPool()
    pool.add([1, 2, 3, 4, 5, 6])
    pool.add([9, 2, 3, 7, 8])
    pool.add([0, 9, 2, 3, 10])
    # 3-gram (9, 2, 3) occurs twice: newest first; the 2-gram's other continuation is not taken
    assert pool.continuations([5, 9, 2, 3], depth=3, max_branches=4) == [[10], [7, 8]]
    # only the 2-gram (2, 3) matches: all three continuations, newest first, cut at depth
    assert pool.continuations([7, 2, 3], depth=2, max_branches=4) == [[10], [7, 8], [4, 5]]
    assert pool.continuations([7, 2, 3], depth=2, max_branches=2) == [[10], [7, 8]]
    assert pool.continuations([7, 2, 3], depth=2, max_branches=4,
                              exclude={(10,)}) == [[7, 8], [4, 5]]
    assert pool.continuations([7, 8, 3], depth=3, max_branches=4) == []
    # an arm's own ngram_min above the pool's skips the shorter n-grams
    assert pool.continuations([7, 2, 3], depth=2, max_branches=4, ngram_min=3) == []


def test_continuations_stop_at_the_end_of_their_sequence():
    pool = TokenPool()
    pool.add([1, 2, 3, 4])
    pool.add([5, 6, 7])
    assert pool.continuations([1, 2, 3], depth=8, max_branches=4) == [[4]]
    assert pool.continuations([3, 4], depth=8, max_branches=4) == []  # nothing follows
    assert len(pool) == 7 and pool.sequences == 2


def test_too_short_and_too_long_sequences_are_not_kept():
    pool = TokenPool(capacity=8, ngram_min=2)
    pool.add([1, 2])
    pool.add(list(range(9)))
    assert len(pool) == 0 and pool.continuations([1, 2], 4, 4) == []
    assert len(TokenPool(capacity=0).copy()) == 0


def test_a_full_pool_drops_its_older_half():
    pool = TokenPool(capacity=20)
    for first in range(1, 6):
        pool.add([first, 100, 101, 102, 103])  # 25 tokens offered
    assert len(pool) <= 20
    found = pool.continuations([100, 101], depth=1, max_branches=8)
    assert found == [[102]]  # the continuations agree, one branch
    assert pool.continuations([5, 100], 2, 4) == [[101, 102]]  # the newest stays
    assert pool.continuations([1, 100], 2, 4) == []  # the oldest went


def test_a_full_pool_stays_within_its_capacity_when_its_newer_half_is_the_longer():
    pool = TokenPool(capacity=100)
    pool.add(list(range(1, 11)))
    pool.add(list(range(200, 290)))  # 100 tokens: full
    pool.add(list(range(400, 450)))  # dropping the first (10) would leave 140
    assert len(pool) <= 100
    assert pool.continuations([400, 401], 1, 4) == [[402]]


def test_the_length_never_reads_a_pool_half_changed():
    """A replica's gauge reads ``len(pool)`` on another thread while the decoding thread adds
    and drops sequences: at every change of an attribute it is a length the pool had once an
    addition or a drop was complete (it read negative while a drop cleared the pool)."""
    seen: list[int] = []
    lengths = {0}

    class Watched(TokenPool):
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            try:
                seen.append(len(self))
            except AttributeError:  # not yet built
                pass

        def _drop_older_half(self):
            super()._drop_older_half()
            lengths.add(len(self))

    pool = Watched(capacity=20)
    for first in range(1, 12):
        pool.add([first, 100, 101, 102, 103, 104][:2 + first % 5])
        lengths.add(len(pool))
    assert len(lengths) > 5 and max(lengths) <= 20
    assert set(seen) <= lengths, sorted(set(seen) - lengths)


def test_a_save_cut_short_keeps_the_pool_file(tmp_path, monkeypatch):
    import workers.pool as pool_module

    pool = TokenPool()
    pool.add([1, 2, 3, 4, 5])
    path = tmp_path / "pool.safetensors"
    pool.save(path, {"fingerprint": "abc"})
    pool.add([6, 2, 3, 8])

    cut_short(monkeypatch, pool_module, "save_file")
    with pytest.raises(Killed):
        pool.save(path, {"fingerprint": "abc"})
    assert len(TokenPool.load(path, "abc")) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.json", "pool.safetensors"]


def test_copies_are_independent_and_frozen_pools_record_nothing(bundled):
    pool = TokenPool()
    pool.add([1, 2, 3, 4])
    frozen, live = pool.copy(live=False), pool.copy()
    live.add([7, 2, 3, 9])
    assert pool.continuations([2, 3], 2, 4) == [[4]]
    assert live.continuations([2, 3], 2, 4) == [[9], [4]]
    assert not frozen.live and live.live
    # a generation adds its output to a live pool when it finishes, never to a frozen one
    gen = bundled.generate(bundled.prompts[0], 6, pool=live)
    assert live.sequences == 3 and list(live.tokens[-len(gen.output) - 1:-1]) == gen.output
    bundled.generate(bundled.prompts[0], 6, pool=frozen)
    assert frozen.sequences == 1


def test_save_load_round_trip_and_refusal(tmp_path):
    pool = TokenPool()
    pool.add([1, 2, 3, 4, 5])
    pool.add([6, 2, 3, 8])
    path = tmp_path / "pool.safetensors"
    pool.save(path, {"fingerprint": "abc", "kinds": {}})
    loaded = TokenPool.load(path, "abc")
    assert list(loaded.tokens) == list(pool.tokens)
    assert loaded.continuations([0, 2, 3], 3, 4) == [[8], [4, 5]]
    assert TokenPool.read_metadata(path)["fingerprint"] == "abc"
    with pytest.raises(PoolMismatchError, match="made for model 'abc'"):
        TokenPool.load(path, "other")
    assert len(resolve_pool("none", "abc")) == 0
    assert len(resolve_pool(str(path), "abc", record=False)) == 9
    assert len(resolve_pool(None, "no such model")) == 0  # the bundled pool is another model's
    # a profile without pool arms: a file given is still loaded (and checked), no answers
    # recorded; without one nothing is loaded
    unused = resolve_pool(str(path), "abc", used=False)
    assert len(unused) == 9 and not unused.live
    assert len(resolve_pool(None, "abc", used=False)) == 0


def test_the_bundled_pool_is_the_bundled_models(bundled):
    meta = TokenPool.read_metadata(BUNDLED_POOL)
    assert meta["fingerprint"] == bundled.loaded.fingerprint
    assert set(meta["kinds"]) == {"chat", "summary", "code"}
    pool = resolve_pool(None, bundled.loaded.fingerprint)
    assert len(pool) == meta["tokens"] > 50_000 and pool.live


def test_pool_arms_are_lossless_and_draft_from_the_pool(bundled):
    """Greedy float32 output equals plain decoding with drafts from a pool that holds each
    prompt's own answer (drafts accepted) and from one of other requests' text (drafts mostly
    wrong)."""
    arm = Arm(name="ngp", drafter="ngram_tree", depth=6, top_k=4, total_tokens=16, ngram_min=2,
              pool=True)
    plain = Arm(name="ng", drafter="ngram_tree", depth=6, top_k=4, total_tokens=16, ngram_min=2)
    answers = TokenPool(live=False)
    for index in range(4):
        answers.add(bundled.vanilla(index, 32))
    with_pool = bundled.accepted_if_identical(arm, 4, 32, pool=answers)
    without = bundled.accepted_if_identical(plain, 4, 32, pool=answers)
    assert with_pool > without + 40  # the pool's drafts were used and accepted
    unrelated = TokenPool(live=False)
    for index in range(8, 20):
        unrelated.add(bundled.prompts[index])
    bundled.accepted_if_identical(arm, 4, 32, pool=unrelated)


def test_hybrid_pool_arm_is_lossless(bundled):
    from tests.workers.test_s3d import random_adapter

    arm = Arm(name="hyb", drafter="hybrid", depth=5, top_k=2, total_tokens=10, gamma=2,
              ngram_min=2, mask_fallback=True, pool=True)
    answers = TokenPool(live=False)
    for index in (0, 2):  # the pool drafts on two prompts, the masks on the others
        answers.add(bundled.vanilla(index, 32))
    assert bundled.accepted_if_identical(arm, 4, 32, random_adapter(bundled.runner),
                                         pool=answers) > 0


def test_pool_is_an_ngram_setting():
    with pytest.raises(ValueError, match="n-gram drafting setting"):
        Arm(name="x", drafter="skip_chain", skip_layers=(3,), pool=True)


def test_each_bench_method_drafts_from_a_pool_of_its_own(bundled, monkeypatch):
    """A method's pool grows with its own answers to the prompts before, never with another
    method's answer to the same prompt, and the engine's pool stays as it was."""
    from workers.bench import Bench
    from workers.engine import Engine, resolve_profile
    from workers.prompts import load_prompts
    from workers.sampling import SamplingParams

    engine = Engine(bundled.loaded, bundled.runner, bundled.stops,
                    resolve_profile(None, bundled.loaded.fingerprint, bundled.runner.num_layers))
    engine.pool.add([1, 2, 3, 4])
    used: dict[str, list] = {}  # the pools themselves: kept alive, their ids stay unique
    generation = Engine.generation

    def recording(self, prompt, max_tokens, arm=None, params=None, depth=None, pool=None):
        gen = generation(self, prompt, max_tokens, arm, params, depth, pool)
        used.setdefault(gen.arm.name, []).append(gen.pool)
        return gen

    monkeypatch.setattr(Engine, "generation", recording)
    suite = load_prompts(limit=3)
    results = Bench(engine, suite, 6, SamplingParams()).run(["vanilla", "ngram_tree"])
    assert engine.pool.sequences == 1
    ids = {name: {id(pool) for pool in pools} for name, pools in used.items()}
    # warm-up and the timed runs: two pools per method, each the method's alone
    assert all(len(i) == 2 for i in ids.values()) and not set.intersection(*ids.values())
    assert id(engine.pool) not in set.union(*ids.values())
    # a method's timed pool: the engine's one sequence, then that method's three answers
    assert all(pools[-1].sequences == 4 for pools in used.values())
    assert all(len(r.runs) == 3 for r in results)


def test_search_candidates_draw_on_the_pool_only_when_there_is_one():
    from workers.search import arm_candidates

    with_pool = arm_candidates([(3, 4)], None, pool=True)
    ngram = with_pool["ngram_tree"]
    assert {a.pool for a in ngram} == {False, True}
    assert len([a for a in ngram if a.pool]) == len(ngram) // 2
    assert all(a.pool for a in with_pool["hybrid"])
    assert any(a.pool_min > 2 for a in with_pool["hybrid"])
    assert not any(a.pool for kind in ("s3d", "s3d_skip", "skip_chain", "skip_tree")
                   for a in with_pool[kind])
    without = arm_candidates([(3, 4)], None)
    assert not any(a.pool for arms in without.values() for a in arms)


def test_a_seeded_sampled_request_gives_the_same_text_whatever_the_pool_holds(bundled):
    """Which drafts are verified decides how a seed's random numbers are used; a seeded sampled
    request therefore drafts without a replica's live pool, which changes with every request (an
    unseeded one, and greedy ones, with it). A frozen pool (the search's) never changes: a seeded
    request drafts from it, and its seed still gives one text."""
    from workers.sampling import SamplingParams

    arm = Arm(name="ngp", drafter="ngram_tree", depth=6, top_k=4, total_tokens=16, ngram_min=2,
              pool=True)
    prompt = bundled.prompts[1]
    seeded = SamplingParams(temperature=1.0, seed=7)
    first = bundled.generate(prompt, 16, arm, seeded, pool=TokenPool()).output

    def full(live: bool) -> TokenPool:
        pool = TokenPool(live=live)
        pool.add(first)  # drafts that would be accepted, and would change the draws
        return pool

    live_runs = [bundled.generate(prompt, 16, arm, seeded, pool=pool)
                 for pool in (full(True), TokenPool())]
    assert [run.output for run in live_runs] == [first, first]
    assert live_runs[0].stats.num_accepted_tokens == live_runs[1].stats.num_accepted_tokens
    assert live_runs[0].draft_pool is None
    frozen = full(False)
    frozen_runs = [bundled.generate(prompt, 16, arm, seeded, pool=frozen) for _ in range(2)]
    assert frozen_runs[0].draft_pool is frozen
    assert frozen_runs[0].output == frozen_runs[1].output
    assert frozen_runs[0].stats.num_accepted_tokens > live_runs[1].stats.num_accepted_tokens
    unseeded = bundled.generate(prompt, 16, arm, SamplingParams(temperature=1e-3),
                                pool=full(True))
    assert unseeded.stats.num_accepted_tokens > 0


def test_a_pool_file_given_is_loaded_whatever_the_profile(bundled, tmp_path):
    """The search starts from a profile without pool arms (another model's generic one) and
    tries pool arms with the file given: it was silently left empty, unopened."""
    from workers.pool import resolve_pool

    pool = TokenPool(live=False)
    pool.add([5, 6, 7, 8, 9])
    path = tmp_path / "pool.safetensors"
    pool.save(path, {"fingerprint": bundled.loaded.fingerprint})
    loaded = resolve_pool(str(path), bundled.loaded.fingerprint, used=False)
    assert len(loaded) == 5 and not loaded.live  # loaded, but no profile arm records into it
    assert resolve_pool(str(path), bundled.loaded.fingerprint, used=True).live
    with pytest.raises(OSError):
        resolve_pool(str(tmp_path / "missing.safetensors"), bundled.loaded.fingerprint,
                     used=False)
    assert len(resolve_pool("none", bundled.loaded.fingerprint)) == 0
