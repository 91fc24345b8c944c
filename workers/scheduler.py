"""Step scheduler: many requests on one replica, decoded step by step in turn.

The model runs one step at a time in a worker thread, so the replica's event loop stays free;
active generations take turns (round robin), so a long request never holds a short one back to the
end. A consumer that goes away (client disconnect, cancellation) frees its slot at once.

``max_active`` bounds the generations decoding at once (each holds a KV cache for its prompt and
``max_tokens``): more wait, first come first served, and take no memory until a slot frees.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from workers.engine import Generation
from workers.errors import EngineDeadError
from workers.stats import SpecDecodeStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One step's committed tokens and whether the generation ended with them, as they were
    when the step returned: the decode thread may already be running the next step while a
    consumer handles this one, so ``Generation.finished`` may speak of a step not yet read."""

    tokens: list[int]
    finished: bool
    finish_reason: str | None
    # The generation's statistics through this step, copied before the next step begins: a
    # consumer that stops early (a stop string) reads them while that step may be running.
    stats: SpecDecodeStats = field(default_factory=SpecDecodeStats)


@dataclass
class Slot:
    id: int
    generation: Generation
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False


class StepScheduler:
    def __init__(self, max_active: int | None = None) -> None:
        if max_active is not None and max_active < 1:
            raise ValueError(f"max_active must be at least 1, not {max_active}")
        self.max_active = max_active
        self.slots: dict[int, Slot] = {}
        self._waiting: deque[Slot] = deque()  # admitted in order as slots free
        self._ids = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.steps = 0
        self.error: BaseException | None = None

    @property
    def active(self) -> int:
        """Generations decoding (their turns taken in round robin)."""
        return len(self.slots)

    @property
    def waiting(self) -> int:
        """Generations waiting for a slot (``max_active`` decoding)."""
        return len(self._waiting)

    def _admit(self) -> None:
        while self._waiting and (self.max_active is None or len(self.slots) < self.max_active):
            slot = self._waiting.popleft()
            self.slots[slot.id] = slot
            self._wakeup.set()

    def _release(self, slot: Slot) -> None:
        """``slot`` leaves (finished, failed or its consumer gone): a waiting one takes it."""
        if self.slots.pop(slot.id, None) is None:
            try:
                self._waiting.remove(slot)
            except ValueError:
                pass
        self._admit()

    @property
    def healthy(self) -> bool:
        return self.error is None and (self._task is None or not self._task.done())

    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stream(self, generation: Generation) -> AsyncIterator[Step]:
        """Yield each step until the one that finishes the generation."""
        if not self.healthy:
            raise EngineDeadError(f"decoder loop stopped: {self.error!r}")
        self._ensure_started()
        slot = Slot(next(self._ids), generation)
        self._waiting.append(slot)
        self._admit()
        try:
            while True:
                item = await slot.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            slot.cancelled = True
            self._release(slot)

    async def _loop(self) -> None:
        order: list[int] = []
        try:
            while True:
                if not self.slots:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if not order:
                    order = list(self.slots)
                slot = self.slots.get(order.pop(0))
                if slot is None or slot.cancelled:
                    continue
                try:
                    tokens = await asyncio.to_thread(slot.generation.step)
                except Exception as exc:  # a bad request must not take the replica down
                    log.exception("generation %s failed", slot.id)
                    slot.generation.finished = True
                    slot.queue.put_nowait(exc)
                    self._release(slot)
                    continue
                self.steps += 1
                finished = slot.generation.finished
                if not tokens and not finished:
                    continue  # a chunk of a long prompt's prefill: nothing to hand over yet
                if not slot.cancelled:
                    slot.queue.put_nowait(Step(tokens, finished, slot.generation.finish_reason,
                                               slot.generation.stats.copy()))
                if finished:
                    self._release(slot)
        except BaseException as exc:
            self.error = exc
            for slot in [*self.slots.values(), *self._waiting]:
                slot.queue.put_nowait(EngineDeadError(f"decoder loop stopped: {exc!r}"))
            raise
