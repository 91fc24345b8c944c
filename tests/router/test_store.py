"""The acceptance-statistics store: derived figures, decay, and Redis sharing and outages."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid

import pytest
import redis

from router.store import (
    ArmStats,
    InProcessStatsStore,
    RedisStatsStore,
    StatsKey,
    make_store,
)
from workers.stats import SpecDecodeStats

HALF_LIFE = 100.0
KEY = StatsKey("tiny-llama", "short", "s3d-k4")


def spec_stats(steps: int = 4, accepted: int = 6, output: int = 10) -> SpecDecodeStats:
    return SpecDecodeStats(num_spec_steps=steps, num_drafts=steps, num_draft_tokens=4 * steps,
                           num_accepted_tokens=accepted, accepted_per_pos=[3, 2, 1],
                           tried_per_pos=[4, 3, 2, 1], num_draft_levels=4 * steps,
                           draft_time_s=0.1, verify_time_s=0.3, num_output_tokens=output)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def fast_store(url: str, prefix: str, **kwargs) -> RedisStatsStore:
    options = dict(prefix=prefix, refresh_interval_s=0.05, flush_interval_s=0.05,
                   max_backoff_s=0.2, socket_timeout_s=0.5)
    return RedisStatsStore(url, **(options | kwargs))


def unique_prefix() -> str:
    return f"s3d:test:{uuid.uuid4().hex[:12]}"


async def eventually(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


def test_arm_stats_derived_figures():
    stats = ArmStats(requests=2, num_spec_steps=10, num_drafts=8, num_draft_tokens=40,
                     num_accepted_tokens=20, accepted_per_pos=[8, 6, 4, 2], draft_time_s=0.5,
                     verify_time_s=1.5, num_output_tokens=30, decode_time_s=2.5)
    assert stats.mean_acceptance_length == pytest.approx(3.0)
    assert stats.draft_acceptance_rate == pytest.approx(0.5)
    # Each request's first token came with its prompt: 28 tokens decoded in 2.5 s.
    assert stats.goodput_tokens_per_s == pytest.approx(11.2)
    assert stats.acceptance_rate_per_pos == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_goodput_does_not_depend_on_how_long_requests_are():
    # Decoding at 20 tokens/s after the first token (which came with the prompt): a 2-token
    # request once counted as 40 tokens/s beside a 64-token one's 20.3, so an arm that served
    # short requests looked faster. Both are 20 now, per request and pooled.
    store = InProcessStatsStore(half_life_s=1e9, clock=FakeClock())
    for tokens in (2, 64):
        store.record(KEY, spec_stats(output=tokens), decode_time_s=(tokens - 1) / 20.0)
    stats = store.snapshot()[KEY]
    assert stats.goodput_tokens_per_s == pytest.approx(20.0)
    assert stats.goodput_sum == pytest.approx(40.0)
    assert stats.goodput_relative_variance == pytest.approx((0.0, 1.0))


def test_arm_stats_of_nothing_is_zero():
    empty = ArmStats()
    assert empty.mean_acceptance_length == 0.0
    assert empty.draft_acceptance_rate == 0.0
    assert empty.goodput_tokens_per_s == 0.0
    assert empty.acceptance_rate_per_pos == []


def test_arm_stats_from_one_request_round_trips_through_fields():
    stats = ArmStats.from_spec_decode(spec_stats(), decode_time_s=0.5, now=123.0)
    assert stats.requests == 1.0
    assert stats.accepted_per_pos == [3.0, 2.0, 1.0]
    assert stats.tried_per_pos == [4.0, 3.0, 2.0, 1.0]
    assert stats.mean_acceptance_length == pytest.approx((6 + 4) / 4)
    fields = {name: str(value) for name, value in stats.counter_fields().items()}
    assert ArmStats.from_fields(fields | {"updated_at": "123.0"}) == stats


def test_per_request_goodput_spread_accumulates():
    store = InProcessStatsStore(half_life_s=1e9, clock=FakeClock())
    for goodput in (10.0, 20.0, 30.0):  # 9 tokens after the first in 0.9, 0.45, 0.3 s
        store.record(KEY, spec_stats(output=10), decode_time_s=9.0 / goodput)
    stats = store.snapshot()[KEY]
    assert stats.goodput_sum == pytest.approx(60.0)
    assert stats.goodput_sq_sum == pytest.approx(1400.0)
    # Sample variance 100 around a mean of 20: relative variance 0.25 with 2 degrees of freedom.
    assert stats.goodput_relative_variance == pytest.approx((0.25, 2.0))
    assert ArmStats(requests=1.0, goodput_sum=5.0).goodput_relative_variance is None
    # Records written before these fields existed carry no spread.
    assert ArmStats.from_fields({"requests": "3", "decode_time_s": "1"}).goodput_relative_variance \
        is None


def test_combined_decays_both_sides_to_the_later_timestamp():
    old = ArmStats(requests=4, accepted_per_pos=[4.0], tried_per_pos=[4.0, 2.0], updated_at=0.0)
    new = ArmStats(requests=1, accepted_per_pos=[1.0, 1.0], tried_per_pos=[1.0],
                   updated_at=HALF_LIFE)
    for merged in (old.combined(new, HALF_LIFE), new.combined(old, HALF_LIFE)):
        assert merged.requests == pytest.approx(3.0)
        assert merged.accepted_per_pos == pytest.approx([3.0, 1.0])
        assert merged.tried_per_pos == pytest.approx([3.0, 1.0])
        assert merged.updated_at == HALF_LIFE
        assert merged.lifetime_requests == 0.0  # neither side counted any


def test_lifetime_requests_are_counted_and_never_decayed():
    one = ArmStats.from_spec_decode(spec_stats(), 0.5, now=0.0)
    later = ArmStats.from_spec_decode(spec_stats(), 0.5, now=3 * HALF_LIFE)
    merged = one.combined(later, HALF_LIFE)
    assert merged.requests == pytest.approx(1.125)
    assert merged.lifetime_requests == 2.0
    assert merged.decayed(10 * HALF_LIFE, HALF_LIFE).lifetime_requests == 2.0
    assert ArmStats.from_fields(merged.counter_fields()).lifetime_requests == 2.0
    # A hash written before the field existed counts its decayed requests.
    assert ArmStats.from_fields({"requests": "3.5"}).lifetime_requests == 3.5


def test_in_process_store_records_and_snapshots_by_model():
    async def scenario():
        store = make_store(None, half_life_s=1e9, refresh_interval_s=1.0)
        assert isinstance(store, InProcessStatsStore)
        await store.start()
        other = StatsKey("other-model", "short", "s3d-k4")
        elsewhere = StatsKey(KEY.model, KEY.bucket + "-other", KEY.arm)
        for _ in range(3):
            store.record(KEY, spec_stats(), decode_time_s=0.5)
        store.record(other, spec_stats(), decode_time_s=0.5)
        store.record(elsewhere, spec_stats(), decode_time_s=0.5)
        assert await store.flush()
        assert list(store.snapshot("tiny-llama", KEY.bucket)) == [KEY]
        snapshot = store.snapshot("tiny-llama")
        assert set(snapshot) == {KEY, elsewhere}
        assert snapshot[KEY].requests == pytest.approx(3.0)
        assert snapshot[KEY].accepted_per_pos == pytest.approx([9.0, 6.0, 3.0])
        assert snapshot[KEY].goodput_tokens_per_s == pytest.approx(18.0)  # 9 tokens in 0.5 s
        assert set(store.snapshot()) == {KEY, other, elsewhere}
        assert store.available
        await store.close()

    asyncio.run(scenario())


def test_in_process_store_decays_with_the_half_life():
    clock = FakeClock()
    store = InProcessStatsStore(half_life_s=HALF_LIFE, clock=clock)
    store.record(KEY, spec_stats(), decode_time_s=0.5)
    clock.now += HALF_LIFE
    assert store.snapshot()[KEY].requests == pytest.approx(0.5)
    store.record(KEY, spec_stats(), decode_time_s=0.5)
    clock.now += HALF_LIFE
    decayed = store.snapshot()[KEY]
    assert decayed.requests == pytest.approx(0.75)
    assert decayed.num_spec_steps == pytest.approx(0.75 * 4)
    assert decayed.mean_acceptance_length == pytest.approx((6 + 4) / 4)
    assert decayed.lifetime_requests == 2.0


def test_make_store_chooses_the_backend():
    assert isinstance(make_store("memory://"), InProcessStatsStore)
    assert isinstance(make_store("redis://127.0.0.1:1/0"), RedisStatsStore)
    assert isinstance(make_store("rediss://127.0.0.1:1/0"), RedisStatsStore)
    with pytest.raises(ValueError):
        make_store("http://127.0.0.1:1")


def test_key_components_are_escaped():
    store = RedisStatsStore("redis://127.0.0.1:1/0", prefix="p")
    a, b = StatsKey("org:model", "b", "arm"), StatsKey("org", "model:b", "arm")
    assert store.hash_key(a) != store.hash_key(b)
    for key in (a, b, StatsKey("100%:x", "%3A", ":")):
        assert store.parse_hash_key(store.hash_key(key)) == key


@pytest.mark.redis
def test_two_clients_share_statistics(redis_server):
    async def scenario():
        prefix = unique_prefix()
        writer, reader = fast_store(redis_server.url, prefix), fast_store(redis_server.url, prefix)
        await writer.start()
        await reader.start()
        writer.record(KEY, spec_stats(), decode_time_s=0.5)

        async def reader_sees_it():
            return KEY in reader.snapshot()

        await eventually(reader_sees_it)
        seen = reader.snapshot("tiny-llama")[KEY]
        assert seen.requests == pytest.approx(1.0, rel=1e-3)
        assert seen.mean_acceptance_length == pytest.approx(2.5)
        # 10 tokens, the first with the prompt, 9 in the 0.5 s after it.
        assert seen.goodput_sum == pytest.approx(18.0, rel=1e-3)
        assert seen.goodput_sq_sum == pytest.approx(324.0, rel=1e-3)
        assert writer.available and reader.available
        await writer.close()
        await reader.close()

    asyncio.run(scenario())


@pytest.mark.redis
def test_a_refresh_tells_listeners_which_buckets_changed(redis_server):
    """A reader's refresh calls each listener of a model with the buckets whose figures
    changed, and with none (a tick) when nothing did; a router following the reader prepares
    the changed bucket's route from the new figures."""
    from router.policy import ArmRouter

    async def scenario():
        prefix, clock = unique_prefix(), FakeClock()
        writer = fast_store(redis_server.url, prefix, clock=clock)
        reader = fast_store(redis_server.url, prefix, clock=clock)
        heard, other = [], []
        reader.subscribe("tiny-llama", heard.append)
        reader.subscribe("another-model", other.append)
        router = ArmRouter(["none", "s3d-k4"], "none")
        router.follow(reader, "tiny-llama")
        assert router.choose("code.t0.ps") == "none"  # no figures: the default, slightly ahead
        writer.record(StatsKey("tiny-llama", "code.t0.ps", "s3d-k4"), spec_stats(output=100),
                      decode_time_s=0.5)
        writer.record(StatsKey("tiny-llama", "code.t0.ps", "none"), spec_stats(output=10),
                      decode_time_s=0.5)
        writer.record(StatsKey("tiny-llama", "chat.t0.ps", "none"), spec_stats(), decode_time_s=0.5)
        assert await writer.flush()
        assert await reader.refresh()
        assert sorted(heard.pop()) == ["chat.t0.ps", "code.t0.ps"]
        assert router.chosen_on_request == 0
        assert router.choose("code.t0.ps") == "s3d-k4"  # prepared by the refresh, 200 vs 20 tok/s
        assert await reader.refresh()
        assert heard == [[]] and other == [[], []]  # nothing changed: ticks
        writer.record(StatsKey("tiny-llama", "chat.t0.ps", "none"), spec_stats(), decode_time_s=0.5)
        assert await writer.flush()
        assert await reader.refresh()
        assert heard == [[], ["chat.t0.ps"]]
        assert router.chosen_on_request == 0
        await writer.close()
        await reader.close()

    asyncio.run(scenario())


@pytest.mark.redis
def test_many_records_accumulate_atomically(redis_server):
    async def scenario():
        # Stamped by the server's clock, records flushed milliseconds apart decay a little.
        prefix, clock = unique_prefix(), FakeClock()
        stores = [fast_store(redis_server.url, prefix, clock=clock, flush_interval_s=0.01,
                             half_life_s=1e9)
                  for _ in range(3)]
        for store in stores:
            await store.start()
        for _ in range(100):
            for store in stores:
                store.record(KEY, spec_stats(), decode_time_s=0.5)
            await asyncio.sleep(0)
        for store in stores:
            assert await store.flush()
        assert await stores[0].refresh()
        total = stores[0].snapshot()[KEY]
        assert total.requests == pytest.approx(300.0)
        assert total.num_accepted_tokens == pytest.approx(1800.0)
        assert total.accepted_per_pos == pytest.approx([900.0, 600.0, 300.0])
        assert total.tried_per_pos == pytest.approx([1200.0, 900.0, 600.0, 300.0])
        assert total.num_draft_levels == pytest.approx(4800.0)
        for store in stores:
            await store.close()

    asyncio.run(scenario())


@pytest.mark.redis
def test_stored_hash_is_numeric_prefixed_indexed_and_expiring(redis_server):
    async def scenario():
        prefix = unique_prefix()
        store = fast_store(redis_server.url, prefix, ttl_s=1000)
        await store.start()
        store.record(StatsKey("org:model", "short", "s3d-k4"), spec_stats(), decode_time_s=0.5)
        assert await store.flush()
        await store.close()
        return prefix

    prefix = asyncio.run(scenario())
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    names = raw.zrange(f"{prefix}:index", 0, -1)
    assert names == [f"{prefix}:org%3Amodel:short:s3d-k4"]
    fields = raw.hgetall(names[0])
    assert {"requests", "num_spec_steps", "decode_time_s", "acc_pos:0", "acc_pos:2",
            "updated_at"} <= set(fields)
    assert all(isinstance(float(value), float) for value in fields.values())
    assert 0 < raw.ttl(names[0]) <= 1000
    assert 0 < raw.ttl(f"{prefix}:index") <= 1000
    raw.close()


@pytest.mark.redis
def test_close_writes_what_is_queued(redis_server):
    async def scenario():
        prefix = unique_prefix()
        store = fast_store(redis_server.url, prefix, flush_interval_s=60.0)
        await store.start()
        store.record(KEY, spec_stats(), decode_time_s=0.5)
        await store.close()
        assert store.pending == 0
        return prefix

    prefix = asyncio.run(scenario())
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert float(raw.hget(f"{prefix}:tiny-llama:short:s3d-k4", "requests")) == 1.0
    raw.close()


@pytest.mark.redis
def test_decay_at_half_life_halves_the_values(redis_server):
    """Redis stamps a record with its own clock minus the record's age: one that waited a
    half-life before its flush lands half-decayed."""
    async def scenario():
        prefix, clock = unique_prefix(), FakeClock(time.time() - HALF_LIFE)
        store = fast_store(redis_server.url, prefix, half_life_s=HALF_LIFE, clock=clock)
        await store.start()
        store.record(KEY, spec_stats(), decode_time_s=0.5)
        clock.now = time.time()
        assert await store.flush()
        assert await store.refresh()
        assert store.snapshot()[KEY].requests == pytest.approx(0.5, rel=1e-3)
        assert store.snapshot()[KEY].num_output_tokens == pytest.approx(5.0, rel=1e-3)
        store.record(KEY, spec_stats(), decode_time_s=0.5)
        assert await store.flush()
        assert await store.refresh()
        assert store.snapshot()[KEY].lifetime_requests == 2.0
        await store.close()
        return prefix

    prefix = asyncio.run(scenario())
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    stored = raw.hgetall(f"{prefix}:tiny-llama:short:s3d-k4")
    assert float(stored["requests"]) == pytest.approx(1.5, rel=1e-3)
    assert float(stored["acc_pos:0"]) == pytest.approx(4.5, rel=1e-3)
    assert float(stored["lifetime_requests"]) == 2.0  # counted, not decayed
    raw.close()


@pytest.mark.redis
def test_outage_buffers_boundedly_and_recovers_by_itself(redis_server):
    """During an outage records wait merged per key; past ``max_buffer`` keys the oldest keys'
    are dropped and counted; all that waited lands once Redis is back."""
    flips = []
    arms = [StatsKey(KEY.model, KEY.bucket, f"arm{i}") for i in range(8)]

    async def scenario():
        prefix, clock = unique_prefix(), FakeClock()
        store = fast_store(redis_server.url, prefix, clock=clock, max_buffer=5,
                           on_availability_change=flips.append)
        await store.start()
        store.record(KEY, spec_stats(), decode_time_s=0.5)
        assert await store.flush()
        assert await store.refresh()
        cached = store.snapshot()[KEY]
        redis_server.stop()
        try:
            for key in arms:
                store.record(key, spec_stats(), decode_time_s=0.5)
            for _ in range(3):  # merged into the waiting record of its key: nothing dropped
                store.record(arms[-1], spec_stats(), decode_time_s=0.5)

            async def outage_seen():
                return not store.available and store.write_errors >= 1

            await eventually(outage_seen)
            assert store.pending == 8
            assert store.dropped_writes == 3
            assert store.snapshot()[KEY] == cached
        finally:
            redis_server.start()

        async def buffered_writes_landed():
            return store.pending == 0 and store.available

        await eventually(buffered_writes_landed)
        assert await store.refresh()
        # the test server keeps nothing across restarts: only the buffered records remain,
        # decayed for the milliseconds since they landed (on the server's clock)
        landed = {key.arm: stats.requests for key, stats in store.snapshot().items()}
        assert landed == pytest.approx({"arm3": 1.0, "arm4": 1.0, "arm5": 1.0, "arm6": 1.0,
                                        "arm7": 4.0}, rel=1e-3)
        await store.close()

    asyncio.run(scenario())
    assert flips == [True, False, True]


SPIN_LUA = """
local s = redis.call('TIME')
repeat
  local t = redis.call('TIME')
until (t[1] - s[1]) * 1000000 + (t[2] - s[2]) > tonumber(ARGV[1])
return 1
"""


@pytest.mark.redis
def test_a_batch_with_no_reply_is_dropped_not_applied_twice(redis_server):
    """A server that stalls past the socket timeout (a slow command, a fork) runs the batch
    it read after the store gave up waiting: queued again, it was applied twice (5 requests
    stored as 10). Dropped, it counts once; stalled before anything is sent, it waits."""
    async def scenario():
        store = fast_store(redis_server.url, unique_prefix(), socket_timeout_s=0.3)
        staller = redis.Redis.from_url(redis_server.url)
        for _ in range(3):
            store.record(KEY, spec_stats(), decode_time_s=0.5)
        assert await store.flush()  # the script loaded; from now on a ping opens a batch
        ping = store._redis.ping

        async def ping_then_stall():
            answer = await ping()
            asyncio.get_running_loop().run_in_executor(
                None, lambda: staller.eval(SPIN_LUA, 0, 1_000_000))  # busy for 1 s
            await asyncio.sleep(0.05)
            return answer

        for _ in range(5):
            store.record(KEY, spec_stats(), decode_time_s=0.5)
        store._redis.ping = ping_then_stall
        assert not await store.flush()  # sent; no reply within the timeout
        assert store.pending == 0 and store.dropped_writes == 5
        assert not store.available
        store._redis.ping = ping
        await asyncio.sleep(1.0)  # the stall ends; the server runs the batch it had read
        # Nothing is left to write: the next read (or a write-only store's ping) says the
        # server answers again.
        assert await store.refresh() and store.available
        # Stalled before the batch is sent (the ping times out): it waits and lands once.
        for _ in range(2):
            store.record(KEY, spec_stats(), decode_time_s=0.5)
        staller_task = asyncio.get_running_loop().run_in_executor(
            None, lambda: staller.eval(SPIN_LUA, 0, 600_000))
        await asyncio.sleep(0.05)
        assert not await store.flush() and store.pending == 2
        await staller_task
        assert await store.flush() and await store.refresh()
        assert store.snapshot()[KEY].lifetime_requests == 3 + 5 + 2
        assert store.available
        await store.close()
        staller.close()

    asyncio.run(scenario())


@pytest.mark.redis
def test_a_writer_whose_clock_runs_ahead_does_not_freeze_a_key(redis_server):
    """Records are decayed to the later stamp: one record from a clock a day ahead made 100
    later records from right clocks weigh nothing (the key read 1 request at 10 tokens/s)."""
    async def scenario():
        prefix = unique_prefix()
        ahead = fast_store(redis_server.url, prefix, clock=FakeClock(time.time() + 86400))
        right = fast_store(redis_server.url, prefix)
        ahead.record(KEY, spec_stats(output=11), decode_time_s=1.0)  # 10 tokens/s
        assert await ahead.flush()
        for _ in range(100):
            right.record(KEY, spec_stats(output=101), decode_time_s=1.0)  # 100 tokens/s
        assert await right.flush() and await right.refresh()
        stats = right.snapshot()[KEY]
        assert stats.requests == pytest.approx(101, rel=1e-3)
        assert stats.goodput_tokens_per_s == pytest.approx(99.1, rel=0.01)
        for store in (ahead, right):
            await store.close()

    asyncio.run(scenario())


@pytest.mark.redis
def test_records_merged_while_waiting_equal_records_written_one_by_one(redis_server):
    """A key's waiting records are merged as the script would apply them one after another:
    three records a third of a half-life apart, sent together or each alone with its age."""
    async def scenario():
        clock, now = FakeClock(), time.time()
        one_by_one = fast_store(redis_server.url, unique_prefix(), half_life_s=HALF_LIFE,
                                clock=clock, flush_interval_s=60.0)
        merged = fast_store(redis_server.url, unique_prefix(), half_life_s=HALF_LIFE,
                            clock=clock, flush_interval_s=60.0)
        for store in (one_by_one, merged):
            await store.start()
        for ago, (steps, output, dt) in zip((2, 1, 0), ((4, 10, 0.5), (2, 30, 1.5), (6, 5, 0.2)),
                                            strict=True):
            clock.now = now - ago * HALF_LIFE / 3
            for store in (one_by_one, merged):
                store.record(KEY, spec_stats(steps=steps, output=output), decode_time_s=dt)
            clock.now = now
            assert await one_by_one.flush()
        assert merged.pending == 3
        assert await merged.flush()
        for store in (one_by_one, merged):
            assert await store.refresh()
        a, b = one_by_one.snapshot()[KEY], merged.snapshot()[KEY]
        # Stamped by the server's clock, milliseconds apart.
        assert a.counter_fields() == pytest.approx(b.counter_fields(), rel=1e-3)
        assert a.updated_at == pytest.approx(b.updated_at, abs=1.0)
        for store in (one_by_one, merged):
            await store.close()

    asyncio.run(scenario())


def test_requests_that_decoded_nothing_are_not_recorded():
    """A request that ended with its first token ran no decoding step: its goodput (a token
    over microseconds) would swamp the bucket's spread, so it is counted and skipped."""
    store = InProcessStatsStore(half_life_s=HALF_LIFE, clock=FakeClock())
    store.record(KEY, spec_stats(steps=0, accepted=0, output=1), decode_time_s=1e-6)
    assert store.snapshot() == {} and store.skipped_records == 1
    store.record(KEY, spec_stats(output=2), decode_time_s=0.1)
    assert store.snapshot()[KEY].requests == 1.0


def test_transient_server_replies_count_as_outages():
    from redis.exceptions import (
        BusyLoadingError,
        ClusterDownError,
        MasterDownError,
        NoScriptError,
        ResponseError,
    )

    from router.store import _is_outage

    for reply in ("MISCONF Redis is configured to save RDB snapshots, but it's currently "
                  "unable to persist to disk", "BUSY Redis is busy running a script"):
        assert _is_outage(ResponseError(reply))
    # The replies redis-py knows arrive as its classes, their code stripped from the message.
    assert _is_outage(BusyLoadingError("Redis is loading the dataset in memory"))
    assert _is_outage(MasterDownError("Link with MASTER is down and replica-serve-stale-data "
                                      "is set to 'no'."))
    assert _is_outage(ClusterDownError("The cluster is down"))
    assert _is_outage(NoScriptError("No matching script. Please use EVAL."))
    assert not _is_outage(ResponseError("WRONGTYPE Operation against a key holding the "
                                        "wrong kind of value"))
    assert not _is_outage(ValueError("not a Redis error"))


@pytest.mark.redis
def test_a_key_of_another_type_in_the_index_skips_that_key_only(redis_server, caplog):
    """A key of another type, or a member whose name this store does not write (another
    schema's), skips that key, not the refresh; each is warned about and counted once while it
    stays in the index (until pruned a TTL on), not on every refresh, and a foreign name's key
    is not fetched."""
    async def scenario():
        prefix, clock = unique_prefix(), FakeClock()
        store = fast_store(redis_server.url, prefix, clock=clock)
        await store.start()
        store.record(KEY, spec_stats(), decode_time_s=0.5)
        assert await store.flush()
        raw = redis.Redis.from_url(redis_server.url)
        stray = f"{prefix}:tiny-llama:short:stray"
        foreign = f"{prefix}:tiny-llama:short:arm:v2-field"
        raw.set(stray, "not a hash")
        raw.hset(foreign, "requests", "1")
        raw.zadd(f"{prefix}:index", {stray: clock.now, foreign: clock.now})
        raw.close()
        fetched = fetched_hashes(store)
        with caplog.at_level("WARNING", logger="router.store"):
            for _ in range(3):
                assert await store.refresh()
                assert list(store.snapshot()) == [KEY] and store.read_errors == 2
        warned = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
        assert len(warned) == 2, warned
        assert foreign not in fetched and stray in fetched
        await store.close()

    asyncio.run(scenario())


@pytest.mark.redis
def test_a_background_loop_survives_an_unexpected_error(redis_server, caplog):
    """An error no Redis outage explains (a bug, a reply that cannot be parsed) is logged and
    the loop goes on: it must not stop the replica's writing or reading for good."""
    async def scenario():
        prefix = unique_prefix()
        store = fast_store(redis_server.url, prefix)
        real_read, failures = store._read, []

        async def read_once_broken():
            if not failures:
                failures.append(1)
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
            return await real_read()

        store._read = read_once_broken
        await store.start()  # the first refresh fails: start() still starts the loops
        writer = fast_store(redis_server.url, prefix)
        await writer.start()
        writer.record(KEY, spec_stats(), decode_time_s=0.5)
        assert await writer.flush()

        async def read_again():
            return KEY in store.snapshot()

        await eventually(read_again)
        for s in (store, writer):
            await s.close()

    asyncio.run(scenario())
    assert "statistics store refresh failed" in caplog.text


@pytest.mark.redis
def test_a_write_only_store_pings_and_reads_nothing(redis_server):
    flips = []

    async def scenario():
        prefix = unique_prefix()
        reader = fast_store(redis_server.url, prefix)
        await reader.start()
        reader.record(KEY, spec_stats(), decode_time_s=0.5)
        assert await reader.flush()
        writer = fast_store(redis_server.url, prefix, reads=False,
                            on_availability_change=flips.append)
        await writer.start()
        assert await writer.refresh() and writer.available
        assert writer.snapshot() == {}  # it writes; the ingress reads
        writer.record(KEY, spec_stats(), decode_time_s=0.5)
        assert await writer.flush()
        assert await reader.refresh()
        assert reader.snapshot()[KEY].requests == pytest.approx(2.0, rel=1e-3)
        for store in (reader, writer):
            await store.close()

    asyncio.run(scenario())
    assert flips == [True]


def another_server(redis_server, **options):
    """A second ``redis-server`` beside the shared one, for one module's tests."""
    server = type(redis_server)(**options)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def read_only_replica(redis_server):
    """A replica of the shared server: it serves reads and refuses writes (READONLY), as the
    old primary does after a failover."""
    yield from another_server(redis_server,
                              extra_args=("--replicaof", "127.0.0.1", str(redis_server.port)))


@pytest.mark.redis
def test_writes_refused_while_reads_succeed_keep_the_store_unavailable(read_only_replica):
    """Reads and writes are judged apart: a server that reads but refuses writes leaves the
    store unavailable, without flapping back on every successful read."""
    flips = []

    async def scenario():
        store = fast_store(read_only_replica.url, unique_prefix(),
                           on_availability_change=flips.append)
        await store.start()
        store.record(KEY, spec_stats(), decode_time_s=0.5)
        assert not await store.flush()
        for _ in range(3):
            assert await store.refresh()
            assert not store.available
        assert store.pending == 1  # kept for when a primary takes it
        await asyncio.wait_for(store.close(), timeout=5)

    asyncio.run(scenario())
    assert flips == [True, False]


@pytest.mark.redis
def test_unreachable_redis_does_not_break_start_record_or_close(redis_server):
    never_started = type(redis_server)()

    async def scenario():
        store = fast_store(never_started.url, unique_prefix())
        await store.start()
        store.record(KEY, spec_stats(), decode_time_s=0.5)
        assert not await store.flush()
        assert not store.available
        assert store.read_errors >= 1 and store.write_errors >= 1
        assert store.snapshot() == {}
        await asyncio.wait_for(store.close(), timeout=5)

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def password_server(redis_server):
    yield from another_server(redis_server, password="s3cret")


@pytest.mark.redis
def test_password_protected_server(password_server):
    async def scenario():
        prefix = unique_prefix()
        plain_url = f"redis://127.0.0.1:{password_server.port}/0"
        writer = fast_store(password_server.url, prefix)
        reader = fast_store(plain_url, prefix, password="s3cret")
        intruder = fast_store(plain_url, prefix)
        for store in (writer, reader, intruder):
            await store.start()
        writer.record(KEY, spec_stats(), decode_time_s=0.5)
        assert await writer.flush()
        assert await reader.refresh()
        assert reader.snapshot()[KEY].requests == pytest.approx(1.0, rel=1e-3)
        assert not await intruder.refresh()
        assert not intruder.available
        for store in (writer, reader, intruder):
            await store.close()

    asyncio.run(scenario())


def test_records_with_figures_that_are_not_finite_are_refused(caplog):
    """A NaN or an infinity merged into a key spoiled it for good: refused and counted in
    ``dropped_writes``, logged once however many come."""
    store = InProcessStatsStore(half_life_s=HALF_LIFE, clock=FakeClock())
    store.record(KEY, spec_stats(), decode_time_s=0.5)
    nan_draft, negative_verify = spec_stats(), spec_stats()
    nan_draft.draft_time_s = float("nan")
    negative_verify.verify_time_s = -0.1
    with caplog.at_level("WARNING", logger="router.store"):
        store.record(KEY, spec_stats(), decode_time_s=float("inf"))
        store.record(KEY, nan_draft, decode_time_s=0.5)
        store.record(KEY, negative_verify, decode_time_s=0.5)
        store.record(KEY, spec_stats(), decode_time_s=-1.0)
    assert store.dropped_writes == 4 and store.skipped_records == 0
    assert len([r for r in caplog.records if "refusing" in r.message]) == 1
    stats = store.snapshot()[KEY]
    assert stats.lifetime_requests == 1.0 and stats.invalid_fields() == {}
    assert stats.goodput_tokens_per_s == pytest.approx(18.0)
    # The Redis store refuses them alike, before they wait to be written.
    redis_store = RedisStatsStore("redis://127.0.0.1:1/0")
    redis_store.record(KEY, spec_stats(), decode_time_s=float("inf"))
    assert redis_store.pending == 0 and redis_store.dropped_writes == 1


@pytest.mark.redis
def test_the_script_refuses_figures_that_are_not_finite(redis_server):
    """Defence in depth: a record that got past ``record()`` with a NaN is refused by the
    script and changes nothing of its key; the batch's other records land."""
    async def scenario():
        store = fast_store(redis_server.url, unique_prefix())
        other = StatsKey(KEY.model, KEY.bucket, "other-arm")
        store.record(KEY, spec_stats(), decode_time_s=0.5)
        assert await store.flush()
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        before = raw.hgetall(store.hash_key(KEY))
        poisoned = ArmStats.from_spec_decode(spec_stats(), 0.5, store.clock())
        poisoned.verify_time_s = float("nan")
        store._record(KEY, poisoned)
        store.record(other, spec_stats(), decode_time_s=0.5)
        assert await store.flush()  # a refused record is no outage
        assert store.dropped_writes == 1 and store.pending == 0 and store.available
        assert raw.hgetall(store.hash_key(KEY)) == before
        assert float(raw.hget(store.hash_key(other), "requests")) == 1.0
        # Any number argument: the age, the half-life, the TTL, a field's value.
        args = [0, HALF_LIFE, 1000, "requests", 1]
        for position in (0, 1, 2, 4):
            for bad in ("inf", "nan", "-1", "x"):
                with pytest.raises(redis.ResponseError, match="refused"):
                    raw.evalsha(store._script_sha, 2, store.hash_key(KEY), store.index_key,
                                *args[:position], bad, *args[position + 1:])
        assert raw.hgetall(store.hash_key(KEY)) == before
        raw.close()
        await store.close()

    asyncio.run(scenario())


def poison(raw: redis.Redis, store: RedisStatsStore, key: StatsKey) -> str:
    """A hash as a writer from before the checks left it: a NaN that every write kept."""
    name = store.hash_key(key)
    raw.hset(name, mapping={"requests": "3", "lifetime_requests": "3", "decode_time_s": "nan",
                            "updated_at": repr(time.time())})
    raw.zadd(store.index_key, {name: time.time()})
    return name


@pytest.mark.redis
def test_a_hash_that_cannot_be_parsed_is_deleted_once(redis_server, caplog):
    """Skipped, a NaN hash stayed for good (each write kept the NaN and refreshed its TTL):
    the router saw its arm as never tried, with a warning every refresh. The refresh deletes
    it, warned about once, and the arm's next records start it afresh."""
    async def scenario():
        store = fast_store(redis_server.url, unique_prefix())
        bad = StatsKey(KEY.model, KEY.bucket, "poisoned")
        store.record(KEY, spec_stats(), decode_time_s=0.5)
        assert await store.flush()
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        name = poison(raw, store, bad)
        with caplog.at_level("WARNING", logger="router.store"):
            for _ in range(3):
                assert await store.refresh() and store.available
                assert list(store.snapshot()) == [KEY]
        warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].endswith("deleted")
        assert store.read_errors == 1
        assert not raw.exists(name) and raw.zscore(store.index_key, name) is None
        store.record(bad, spec_stats(), decode_time_s=0.5)
        assert await store.flush() and await store.refresh()
        assert store.snapshot()[bad].lifetime_requests == 1.0
        raw.close()
        await store.close()

    asyncio.run(scenario())


@pytest.mark.redis
def test_a_hash_the_server_will_not_delete_is_warned_about_once(redis_server,
                                                                 read_only_replica, caplog):
    """A reader of a server that refuses writes (a demoted primary) cannot delete a malformed
    hash: it goes on reading, available, and warns once."""
    async def scenario():
        prefix = unique_prefix()
        primary = redis.Redis.from_url(redis_server.url, decode_responses=True)
        store = fast_store(read_only_replica.url, prefix)
        name = poison(primary, store, KEY)
        replica = redis.Redis.from_url(read_only_replica.url, decode_responses=True)

        async def replicated():
            return replica.zscore(store.index_key, name) is not None

        await eventually(replicated)
        with caplog.at_level("WARNING", logger="router.store"):
            for _ in range(3):
                assert await store.refresh() and store.available
        warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
        assert len(warnings) == 1 and "not deleted yet" in warnings[0]
        assert replica.exists(name) and store.snapshot() == {}
        primary.delete(name)
        for client in (primary, replica):
            client.close()
        await store.close()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def stale_replica(redis_server):
    """A replica whose primary is gone, set not to serve stale data: it answers MASTERDOWN
    (PING included) until a primary is back."""
    gone = type(redis_server)()
    shutil.rmtree(gone.dir, ignore_errors=True)
    yield from another_server(redis_server, extra_args=(
        "--replicaof", "127.0.0.1", str(gone.port), "--replica-serve-stale-data", "no"))


@pytest.mark.redis
def test_a_replica_cut_from_its_primary_is_an_outage(stale_replica):
    """redis-py raises MasterDownError for MASTERDOWN, its code stripped: taken for a refused
    record, every record was dropped and the store looked available."""
    flips = []

    async def scenario():
        store = fast_store(stale_replica.url, unique_prefix(),
                           on_availability_change=flips.append)
        await store.start()
        assert not store.available
        store.record(KEY, spec_stats(), decode_time_s=0.5)
        for _ in range(2):  # the script loads (SCRIPT LOAD is served), then PING is refused
            assert not await store.flush()
            assert store.pending == 1 and store.dropped_writes == 0
        assert not await store.refresh()
        assert not store.available
        await asyncio.wait_for(store.close(), timeout=5)

    asyncio.run(scenario())
    assert flips == [False]


@pytest.mark.redis
def test_a_read_that_fails_leaves_the_store_unavailable_until_one_succeeds(redis_server):
    """A read refused for another reason than an outage (here the index is not a sorted set)
    left the cache stale and the store available."""
    flips = []

    async def scenario():
        prefix = unique_prefix()
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        raw.set(f"{prefix}:index", "not a sorted set")
        store = fast_store(redis_server.url, prefix, on_availability_change=flips.append)
        await store.start()
        assert not store.available and store.read_errors == 1
        assert not await store.refresh()
        raw.delete(f"{prefix}:index")
        assert await store.refresh() and store.available
        raw.close()
        await store.close()

    asyncio.run(scenario())
    assert flips == [False, True]


@pytest.mark.redis
def test_writers_clocks_do_not_stamp_records(redis_server):
    """Each record is sent with its age and stamped by the server's clock: a writer 6 h behind
    had its records decayed to nothing (still counted in lifetime_requests), and one 6 h ahead
    was clamped. Both land stamped at the server's now; a record that waited 30 s in a
    writer's buffer lands 30 s old."""
    async def scenario():
        prefix, hours = unique_prefix(), 6 * 3600
        writers = {"behind": fast_store(redis_server.url, prefix,
                                        clock=FakeClock(time.time() - hours)),
                   "ahead": fast_store(redis_server.url, prefix,
                                       clock=FakeClock(time.time() + hours))}
        reader = fast_store(redis_server.url, prefix)
        for arm, writer in writers.items():
            writer.record(KEY, spec_stats(), decode_time_s=0.5)
            writer.record(StatsKey(KEY.model, KEY.bucket, arm), spec_stats(), decode_time_s=0.5)
            assert await writer.flush()
        waited = StatsKey(KEY.model, KEY.bucket, "waited")
        writers["behind"].record(waited, spec_stats(), decode_time_s=0.5)
        writers["behind"].clock.now += 30
        assert await writers["behind"].flush()
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        seconds, micros = raw.time()
        server_now = seconds + micros / 1e6

        def stamp(arm: str) -> float:
            return float(raw.hget(reader.hash_key(StatsKey(KEY.model, KEY.bucket, arm)),
                                  "updated_at"))

        assert stamp("behind") == pytest.approx(server_now, abs=2.0)
        assert stamp("ahead") == pytest.approx(server_now, abs=2.0)
        assert stamp(KEY.arm) == pytest.approx(server_now, abs=2.0)
        assert stamp("waited") == pytest.approx(server_now - 30, abs=2.0)
        assert await reader.refresh()
        stats = reader.snapshot()[KEY]
        assert stats.requests == pytest.approx(2.0, rel=1e-3)
        assert stats.lifetime_requests == 2.0
        raw.close()
        for store in (*writers.values(), reader):
            await store.close()

    asyncio.run(scenario())


class ShiftedClock:
    """This machine's clock (the test server's too) set ``offset_s`` off."""

    def __init__(self, offset_s: float = 0.0):
        self.offset_s = offset_s

    def __call__(self) -> float:
        return time.time() + self.offset_s


@pytest.mark.redis
def test_readers_clocks_do_not_decay_the_figures(redis_server):
    """The figures are decayed to the server's clock, which stamped them, as the reader's last
    refresh read it: a reader 6 h ahead of the server read them decayed by 216 half-lives here
    (with the default hour's half-life, to 1/64: the router fell back to its priors), and one
    6 h behind read a record a half-life old as new. Between refreshes they decay on with the
    reader's clock, which stays its own (the router times its intervals on it)."""
    async def scenario():
        prefix, hours = unique_prefix(), 6 * 3600
        clock = FakeClock(time.time() - HALF_LIFE)
        writer = fast_store(redis_server.url, prefix, half_life_s=HALF_LIFE, clock=clock)
        writer.record(KEY, spec_stats(), decode_time_s=0.5)
        clock.now = time.time()
        assert await writer.flush()  # stamped a half-life old
        readers = {name: fast_store(redis_server.url, prefix, half_life_s=HALF_LIFE,
                                    clock=ShiftedClock(shift))
                   for name, shift in (("right", 0.0), ("ahead", hours), ("behind", -hours))}
        for reader in readers.values():
            assert await reader.refresh()
        seen = {name: reader.snapshot()[KEY] for name, reader in readers.items()}
        for stats in seen.values():
            assert stats.requests == pytest.approx(0.5, rel=1e-3)
            assert stats.goodput_sum == pytest.approx(9.0, rel=1e-3)  # 18 tokens/s, halved
            assert stats.goodput_tokens_per_s == pytest.approx(18.0)
            assert stats.counter_fields() == pytest.approx(seen["right"].counter_fields(),
                                                           rel=1e-3)
            assert stats.lifetime_requests == 1.0
        for reader in readers.values():
            reader.clock.offset_s += HALF_LIFE  # a half-life later, no refresh since
        for reader in readers.values():
            assert reader.snapshot()[KEY].requests == pytest.approx(0.25, rel=1e-3)
        assert readers["ahead"].clock() == pytest.approx(time.time() + hours + HALF_LIFE,
                                                         abs=1.0)
        for store in (writer, *readers.values()):
            await store.close()

    asyncio.run(scenario())


@pytest.mark.redis
def test_a_reader_refused_the_servers_clock_keeps_the_last_offset(redis_server, caplog):
    """A server that refuses ``TIME`` to the reader (an ACL) fails no refresh: the figures are
    decayed with the offset last measured, warned about once while it lasts."""
    user = f"reader-{uuid.uuid4().hex[:12]}"
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    raw.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"])

    async def scenario():
        prefix = unique_prefix()
        writer = fast_store(redis_server.url, prefix, half_life_s=HALF_LIFE)
        writer.record(KEY, spec_stats(), decode_time_s=0.5)
        assert await writer.flush()
        reader = fast_store(f"redis://{user}:pw@127.0.0.1:{redis_server.port}/0", prefix,
                            half_life_s=HALF_LIFE, clock=ShiftedClock(6 * 3600))
        assert await reader.refresh()
        assert reader.snapshot()[KEY].requests == pytest.approx(1.0, rel=1e-3)
        raw.acl_setuser(user, enabled=True, commands=["-time"])
        writer.record(KEY, spec_stats(), decode_time_s=0.5)
        assert await writer.flush()
        with caplog.at_level("WARNING", logger="router.store"):
            for _ in range(3):
                assert await reader.refresh() and reader.available
                assert reader.snapshot()[KEY].requests == pytest.approx(2.0, rel=1e-3)
        warnings = [r.getMessage() for r in caplog.records if "clock of" in r.getMessage()]
        assert len(warnings) == 1 and "last offset measured" in warnings[0]
        assert reader.read_errors == 0
        for store in (writer, reader):
            await store.close()

    try:
        asyncio.run(scenario())
    finally:
        raw.acl_deluser(user)
        raw.close()


def fetched_hashes(store: RedisStatsStore) -> list[str]:
    """The names of the hashes ``store`` fetches from now on."""
    fetched, pipeline = [], store._redis.pipeline

    def recording_pipeline(*args, **kwargs):
        pipe = pipeline(*args, **kwargs)
        hgetall = pipe.hgetall

        def recorded_hgetall(name):
            fetched.append(name)
            return hgetall(name)

        pipe.hgetall = recorded_hgetall
        return pipe

    store._redis.pipeline = recording_pipeline
    return fetched


@pytest.mark.redis
def test_a_refresh_fetches_only_the_subscribed_models_records(redis_server):
    """A fleet's Redis holds every model's records and a router follows one: the refresh
    fetched and parsed them all, every 2 s on the event loop. A store nothing subscribed to
    (read through ``snapshot()`` alone) still reads every model's."""
    async def scenario():
        prefix = unique_prefix()
        writer = fast_store(redis_server.url, prefix)
        # Escaped names: the model "org" must not take "org:model"'s records, nor the reverse.
        ours = [KEY, StatsKey("org:model", "b", "arm")]
        theirs = [StatsKey("another-model", KEY.bucket, KEY.arm), StatsKey("org", "model:b", "arm"),
                  StatsKey(KEY.model + "-2", KEY.bucket, KEY.arm)]
        for key in ours + theirs:
            writer.record(key, spec_stats(), decode_time_s=0.5)
        assert await writer.flush()
        reader, everything = fast_store(redis_server.url, prefix), fast_store(redis_server.url,
                                                                             prefix)
        for model in {key.model for key in ours}:
            reader.subscribe(model, lambda buckets: None)
        fetched = fetched_hashes(reader)
        assert await reader.refresh()
        assert sorted(fetched) == sorted(reader.hash_key(key) for key in ours)
        assert set(reader.snapshot()) == set(ours)
        assert await everything.refresh()
        assert set(everything.snapshot()) == set(ours + theirs)
        for store in (writer, reader, everything):
            await store.close()

    asyncio.run(scenario())


def flushing_scripts_before(store: RedisStatsStore, position: int, sends: int) -> None:
    """The server forgets its scripts (SCRIPT FLUSH, as a restart does) before the record at
    ``position`` of each of ``store``'s next ``sends`` pipelines; the flush's own reply is left
    out of the pipeline's."""
    pipeline, done = store._redis.pipeline, []

    def flushing_pipeline(*args, **kwargs):
        pipe = pipeline(*args, **kwargs)
        if len(done) == sends:
            return pipe
        done.append(pipe)
        evalsha, execute, queued = pipe.evalsha, pipe.execute, []

        def evalsha_after_flush(*command):
            if len(queued) == position:
                pipe.script_flush()
            queued.append(command)
            return evalsha(*command)

        async def execute_without_flush(raise_on_error=True):
            replies = await execute(raise_on_error=raise_on_error)
            return replies[:position] + replies[position + 1:] if len(queued) > position \
                else replies

        pipe.evalsha, pipe.execute = evalsha_after_flush, execute_without_flush
        return pipe

    store._redis.pipeline = flushing_pipeline


@pytest.mark.redis
def test_a_server_that_forgot_the_script_gets_it_again_within_the_flush(redis_server):
    """NOSCRIPT (a restarted server) was taken for an outage: the store went unavailable and
    its records waited a backoff. The script is loaded again and the records the server ran
    nothing for are sent again in the same flush, the others not (they ran: sent again, they
    would count twice)."""
    flips = []

    async def scenario():
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        store = fast_store(redis_server.url, unique_prefix(), on_availability_change=flips.append,
                           flush_interval_s=60.0, half_life_s=1e9)
        await store.start()
        arms = [StatsKey(KEY.model, KEY.bucket, f"arm{i}") for i in range(3)]
        store.record(arms[0], spec_stats(), decode_time_s=0.5)
        assert await store.flush()
        raw.script_flush()
        for key in arms:
            store.record(key, spec_stats(), decode_time_s=0.5)
        assert await store.flush()
        # Forgotten between a batch's records: the first ran, the others are sent again.
        flushing_scripts_before(store, 1, sends=1)
        for key in arms:
            store.record(key, spec_stats(), decode_time_s=0.5)
        assert await store.flush()
        assert store.available and store.write_errors == 0 and store.pending == 0
        assert await store.refresh()
        lifetimes = {key.arm: stats.lifetime_requests for key, stats in store.snapshot().items()}
        assert lifetimes == {"arm0": 3.0, "arm1": 2.0, "arm2": 2.0}
        # Forgotten again before the records sent again: then it is an outage, as before.
        flushing_scripts_before(store, 0, sends=2)
        store.record(arms[0], spec_stats(), decode_time_s=0.5)
        assert not await store.flush()
        assert store.pending == 1 and store.dropped_writes == 0 and not store.available
        assert await store.flush() and store.available
        assert await store.refresh()
        assert store.snapshot()[arms[0]].lifetime_requests == 4.0
        raw.close()
        await store.close()

    asyncio.run(scenario())
    assert flips == [True, False, True]
