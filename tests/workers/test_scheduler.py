"""The step scheduler, with stand-in generations (the engine's own are tested beside it)."""

from __future__ import annotations

import asyncio
import time

from workers.scheduler import StepScheduler
from workers.stats import SpecDecodeStats


class CountingGeneration:
    """Commits one token per step, taking ``step_s`` in the decode thread, for ``steps``."""

    def __init__(self, steps: int, step_s: float = 0.02):
        self.steps, self.step_s = steps, step_s
        self.output: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.stats = SpecDecodeStats()

    def step(self) -> list[int]:
        time.sleep(self.step_s)
        self.output.append(len(self.output))
        self.stats.num_output_tokens = len(self.output)
        if len(self.output) == self.steps:
            self.finished, self.finish_reason = True, "length"
        return [self.output[-1]]


def test_a_slow_consumer_reads_every_step_through_the_last():
    """While a consumer handles a step (sending it to a slow client), the decode thread runs
    the next ones and may finish the generation: the consumer must still read every step,
    and learn of the end from the step that ended it."""
    async def scenario():
        scheduler = StepScheduler()
        gen = CountingGeneration(steps=4)
        read, ends, counts = [], [], []
        async for step in scheduler.stream(gen):
            read += step.tokens
            ends.append((step.finished, step.finish_reason))
            counts.append(step.stats.num_output_tokens)
            await asyncio.sleep(0.15)  # the next steps finish meanwhile
        return gen, read, ends, counts

    gen, read, ends, counts = asyncio.run(scenario())
    assert read == gen.output == [0, 1, 2, 3]
    assert ends == [(False, None)] * 3 + [(True, "length")]
    # Each step's statistics as they were after it (a consumer stopping early reads those).
    assert counts == [1, 2, 3, 4]


def test_requests_take_turns():
    async def scenario():
        scheduler = StepScheduler()
        order: list[str] = []

        async def consume(name: str, gen: CountingGeneration):
            async for _ in scheduler.stream(gen):
                order.append(name)

        await asyncio.gather(consume("a", CountingGeneration(3)),
                             consume("b", CountingGeneration(3)))
        return order

    order = asyncio.run(scenario())
    assert sorted(order) == ["a"] * 3 + ["b"] * 3
    assert order[:4] in (["a", "b", "a", "b"], ["b", "a", "b", "a"]), order


class ChunkedPrefillGeneration(CountingGeneration):
    """Spends its first ``chunks`` steps on its prompt (committing nothing), as a long prompt
    does in the engine, then counts."""

    def __init__(self, chunks: int, steps: int, step_s: float = 0.02):
        super().__init__(steps, step_s)
        self.chunks = chunks

    def step(self) -> list[int]:
        if self.chunks:
            time.sleep(self.step_s)
            self.chunks -= 1
            return []
        return super().step()


def test_a_long_prompt_s_prefill_chunks_let_other_streams_decode():
    async def scenario():
        scheduler = StepScheduler()
        events: list[tuple[str, list[int]]] = []

        async def consume(name: str, gen: CountingGeneration, delay: float = 0.0):
            await asyncio.sleep(delay)
            async for step in scheduler.stream(gen):
                events.append((name, step.tokens))

        await asyncio.gather(consume("long", ChunkedPrefillGeneration(chunks=4, steps=2)),
                             consume("short", CountingGeneration(2), delay=0.005))
        return events

    events = asyncio.run(scenario())
    # Chunks hand nothing to the consumer; the short request decodes between them.
    assert all(tokens for _, tokens in events)
    assert [tokens for name, tokens in events if name == "long"] == [[0], [1]]
    assert [name for name, _ in events][:2] == ["short", "short"]


class RecordingGeneration(CountingGeneration):
    """Notes in ``log`` each step it takes, under its ``name``."""

    def __init__(self, name: str, log: list[str], steps: int):
        super().__init__(steps, step_s=0.005)
        self.name, self.log = name, log

    def step(self) -> list[int]:
        self.log.append(self.name)
        return super().step()


def test_generations_past_max_active_wait_their_turn_first_come_first_served():
    """With two slots, a third and fourth generation take no step (hold no KV cache) until a
    slot frees, and are admitted in the order they came."""
    async def scenario():
        scheduler = StepScheduler(max_active=2)
        log: list[str] = []
        counts: list[tuple[int, int]] = []

        async def consume(name: str, steps: int, delay: float):
            await asyncio.sleep(delay)
            async for _ in scheduler.stream(RecordingGeneration(name, log, steps)):
                counts.append((scheduler.active, scheduler.waiting))

        await asyncio.gather(consume("a", 3, 0), consume("b", 6, 0.001),
                             consume("c", 2, 0.002), consume("d", 2, 0.003))
        return log, counts, scheduler

    log, counts, scheduler = asyncio.run(scenario())
    assert max(active for active, _ in counts) == 2
    assert max(waiting for _, waiting in counts) == 2
    # c starts only after a's last step, d only after c's or b's.
    assert log.index("c") > max(i for i, name in enumerate(log) if name == "a")
    assert log.index("d") > log.index("c")
    assert log.index("d") > min(max(i for i, n in enumerate(log) if n == name)
                                for name in ("b", "c"))
    assert sorted(log) == ["a"] * 3 + ["b"] * 6 + ["c"] * 2 + ["d"] * 2
    assert (scheduler.active, scheduler.waiting) == (0, 0)


def test_a_waiting_generation_cancelled_frees_its_place_and_never_steps():
    async def scenario():
        scheduler = StepScheduler(max_active=1)
        log: list[str] = []

        async def consume(name: str, steps: int):
            async for _ in scheduler.stream(RecordingGeneration(name, log, steps)):
                pass

        first = asyncio.create_task(consume("a", 5))
        await asyncio.sleep(0.001)
        waiting = asyncio.create_task(consume("b", 5))
        last = asyncio.create_task(consume("c", 2))
        await asyncio.sleep(0.002)
        assert scheduler.waiting == 2
        waiting.cancel()
        await asyncio.gather(first, last)
        try:
            await waiting
        except asyncio.CancelledError:
            pass
        return log, scheduler

    log, scheduler = asyncio.run(scenario())
    assert "b" not in log
    assert log == ["a"] * 5 + ["c"] * 2
    assert (scheduler.active, scheduler.waiting) == (0, 0)


def test_max_active_below_one_is_refused():
    import pytest

    with pytest.raises(ValueError, match="max_active"):
        StepScheduler(max_active=0)
