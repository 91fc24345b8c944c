"""The acceptance-statistics store: decayed per-(model, bucket, arm) records shared by replicas.

Decoder replicas ``record()`` one ``SpecDecodeStats`` per finished request; the router reads
``snapshot()``, which only ever touches the in-process cache. Two backends:
``InProcessStatsStore`` (single machine) and ``RedisStatsStore`` (shared by all replicas).

Every record is decayed with a half-life (except its ``lifetime_requests`` count): before new
values are added, both the stored and the new figures are scaled by ``0.5 ** (age /
half_life_s)`` to the later of the two timestamps.
``snapshot()`` returns the figures decayed to the time of the call; ``updated_at`` stays the time
of the last write.

Every figure is a finite number of at least zero: ``record()`` refuses a request whose figures
are not (a NaN or an infinity stored once would stay through every later write, each of which
refreshes the key's TTL), the script refuses them again, and a refresh deletes a stored hash
that holds one.

Redis stamps records with its own clock, so writers' clocks need not agree: a writer sends each
record's age (its clock now minus the record's stamp, both on its clock), and the script stamps
the record with the server's ``TIME`` minus that age. Stamps taken from writers' clocks once let
a replica a day ahead freeze a key (every other record looked old beside it) and one 6 h behind
decay its records to nothing while they still counted in ``lifetime_requests``. Readers'
clocks need not agree either: each refresh reads the server's ``TIME`` with the records, and
``snapshot()`` decays them to the reader's clock plus the last offset seen between the two. A
reader an hour ahead of the server once read every figure halved (with a one-hour half-life),
and one 6 h ahead read 1/64 of them and routed by its priors; one behind read them as fresher
than they were. The reader's own clock stays local (``clock``, which the router uses for its
intervals): only the decay is on the server's.

Redis key schema (numbers only: no prompt text, nothing pickled; values are parsed with float()):

* ``{prefix}:{model}:{bucket}:{arm}`` -- a hash per key with the fields ``requests``,
  ``num_spec_steps``, ``num_drafts``, ``num_draft_tokens``, ``num_accepted_tokens``,
  ``draft_time_s``, ``verify_time_s``, ``num_output_tokens``, ``decode_time_s``,
  ``num_draft_levels``, ``goodput_sum`` and ``goodput_sq_sum`` (sums of each request's tokens
  per second and of its square: how widely goodput spreads), ``acc_pos:0``, ``acc_pos:1``, ...
  (steps that accepted the draft at that position), ``tried_pos:0``, ``tried_pos:1``, ...
  (steps whose draft reached that position with the earlier ones accepted) and ``updated_at``
  (unix seconds on the Redis server's clock), and ``lifetime_requests``: the requests ever
  recorded under the key, the one field never decayed (how much traffic has ridden on the
  bucket's choice). Components are percent-encoded (``%`` -> ``%25``, ``:`` -> ``%3A``) so a
  ``:`` in a name cannot collide. Each write refreshes the hash's TTL.
* ``{prefix}:index`` -- a sorted set of the hash keys scored by ``updated_at``, so reads need no
  SCAN; members older than the TTL are pruned on write, and the index shares the TTL.

Each record is applied atomically by one Lua script (check, stamp, decay, add, EXPIRE, index).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from workers.stats import (
    SpecDecodeStats,
    acceptance_rate,
    add_lists,
    mean_acceptance_length,
)

log = logging.getLogger(__name__)

# A request's record needs a decoding step after its first token (see ``StatsStore.record``).
MIN_RECORDED_TOKENS = 2

_COUNTERS = ("requests", "num_spec_steps", "num_drafts", "num_draft_tokens",
             "num_accepted_tokens", "draft_time_s", "verify_time_s", "num_output_tokens",
             "decode_time_s", "num_draft_levels", "goodput_sum", "goodput_sq_sum")
# Counted and never decayed.
_LASTING = ("lifetime_requests",)
# Per-position lists: attribute -> hash field prefix.
_POS_FIELDS = {"accepted_per_pos": "acc_pos:", "tried_per_pos": "tried_pos:"}
# redis-py raises its own classes for the replies it knows, the code stripped from the message:
# ``MASTERDOWN`` (a replica cut from its primary) as MasterDownError, a ClusterDownError, and
# ``LOADING`` as BusyLoadingError, a ConnectionError. NOSCRIPT is resent at once with the script
# loaded again (``RedisStatsStore._write``): it is an outage only when that fails too.
_OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError,
                  NoScriptError, TryAgainError, ClusterDownError, OSError, asyncio.TimeoutError)
# Replies of a server that cannot write for now (disk full for its snapshots, a script running
# too long), which redis-py passes on as plain ResponseErrors: the records wait for it like for
# an outage.
_TRANSIENT_REPLIES = ("MISCONF", "BUSY")
_REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class UnknownOutcome(Exception):
    """A batch sent whose replies never came (a timeout or a dropped connection after the
    commands went out): the server may have applied any part of it."""


def _is_outage(error: object) -> bool:
    """Whether ``error`` means Redis cannot take records now (buffer and retry) rather than
    rejecting these ones (drop them)."""
    return isinstance(error, _OUTAGE_ERRORS) or (
        isinstance(error, ResponseError) and str(error).startswith(_TRANSIENT_REPLIES))

# ARGV: the record's age (seconds, on its writer's clock), the half-life, the TTL, then pairs of
# field name and value. Every number is checked before anything is written, so a refused record
# changes nothing (Redis 7's tonumber() reads 'nan' and 'inf' as such).
_APPLY_RECORD_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
for i = 1, #ARGV do
  if i < 4 or i % 2 == 1 then
    local value = tonumber(ARGV[i])
    if not (value and value >= 0 and value < math.huge) then
      return redis.error_reply('ERR statistics record refused: argument ' .. i .. ' is ' ..
                               ARGV[i] .. ', not a finite number of at least zero')
    end
  end
end
local age, half_life, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local time = redis.call('TIME')
local server_now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local now = server_now - age
local fields = {}
local current = redis.call('HGETALL', KEYS[1])
for i = 1, #current, 2 do
  fields[current[i]] = tonumber(current[i + 1]) or 0
end
-- A stamp ahead of this server's clock (written by a server whose clock ran ahead, before a
-- failover) would make every new record look old.
local old = math.min(fields['updated_at'] or now, server_now)
fields['updated_at'] = nil
local stamp = math.max(old, now)
local keep = 0.5 ^ ((stamp - old) / half_life)
local add = 0.5 ^ ((stamp - now) / half_life)
local lasting = {lifetime_requests = true}
for name, value in pairs(fields) do
  if not lasting[name] then
    fields[name] = value * keep
  end
end
for i = 4, #ARGV, 2 do
  local name = ARGV[i]
  fields[name] = (fields[name] or 0) + tonumber(ARGV[i + 1]) * (lasting[name] and 1 or add)
end
local flat = {'updated_at', stamp}
for name, value in pairs(fields) do
  flat[#flat + 1] = name
  flat[#flat + 1] = value
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], stamp, KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', server_now - ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return 1
"""


@dataclass(frozen=True)
class StatsKey:
    model: str
    bucket: str
    arm: str


def _decay_factor(age_s: float, half_life_s: float) -> float:
    return 0.5 ** (max(age_s, 0.0) / half_life_s)


@dataclass
class ArmStats:
    """The aggregated, decayed record of one ``StatsKey``."""

    requests: float = 0.0
    num_spec_steps: float = 0.0
    num_drafts: float = 0.0
    num_draft_tokens: float = 0.0
    num_accepted_tokens: float = 0.0
    accepted_per_pos: list[float] = field(default_factory=list)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    num_output_tokens: float = 0.0
    decode_time_s: float = 0.0  # the requests' own decoding time (their steps after the first)
    num_draft_levels: float = 0.0
    tried_per_pos: list[float] = field(default_factory=list)
    goodput_sum: float = 0.0  # of the requests' own tokens per second
    goodput_sq_sum: float = 0.0
    # Requests ever recorded under the key, never decayed.
    lifetime_requests: float = 0.0
    updated_at: float = 0.0

    @classmethod
    def from_spec_decode(cls, stats: SpecDecodeStats, decode_time_s: float,
                         now: float) -> ArmStats:
        """One request's record; ``decode_time_s`` is the time of its own steps after the first
        token, which came with the prompt (``SpecDecodeStats.decode_time_s``, not the wall time
        between, which counts the replica's other requests): its goodput is the tokens decoded
        in that time, the others."""
        decoded = max(stats.num_output_tokens - 1, 0)
        goodput = decoded / decode_time_s if decode_time_s > 0 else 0.0
        return cls(requests=1.0, lifetime_requests=1.0,
                   num_spec_steps=float(stats.num_spec_steps),
                   num_drafts=float(stats.num_drafts),
                   num_draft_tokens=float(stats.num_draft_tokens),
                   num_accepted_tokens=float(stats.num_accepted_tokens),
                   accepted_per_pos=[float(n) for n in stats.accepted_per_pos],
                   tried_per_pos=[float(n) for n in stats.tried_per_pos],
                   num_draft_levels=float(stats.num_draft_levels),
                   draft_time_s=float(stats.draft_time_s),
                   verify_time_s=float(stats.verify_time_s),
                   num_output_tokens=float(stats.num_output_tokens),
                   decode_time_s=float(decode_time_s),
                   goodput_sum=goodput, goodput_sq_sum=goodput * goodput,
                   updated_at=now)

    @property
    def mean_acceptance_length(self) -> float:
        return mean_acceptance_length(self.num_accepted_tokens, self.num_spec_steps)

    @property
    def draft_acceptance_rate(self) -> float:
        return acceptance_rate(self.num_accepted_tokens, self.num_draft_tokens)

    @property
    def goodput_tokens_per_s(self) -> float:
        """Tokens decoded per second of decoding: each request's first token came with its
        prompt, before its decode time started (decayed alike, ``requests`` counts them)."""
        if not self.decode_time_s:
            return 0.0
        return max(self.num_output_tokens - self.requests, 0.0) / self.decode_time_s

    @property
    def goodput_relative_variance(self) -> tuple[float, float] | None:
        """``(variance of per-request goodput / its mean squared, degrees of freedom)``, or None
        without two requests' worth of figures (records from before these fields existed)."""
        n = self.requests
        if n <= 1 or self.goodput_sum <= 0:
            return None
        mean = self.goodput_sum / n
        variance = max(self.goodput_sq_sum / n - mean * mean, 0.0) * n / (n - 1)
        return variance / (mean * mean), n - 1

    @property
    def acceptance_rate_per_pos(self) -> list[float]:
        """Share of drafting steps that accepted the token at each draft position."""
        if not self.num_drafts:
            return [0.0] * len(self.accepted_per_pos)
        return [n / self.num_drafts for n in self.accepted_per_pos]

    def scaled(self, factor: float) -> ArmStats:
        values = dict(vars(self))
        for name in _COUNTERS:
            values[name] *= factor
        for name in _POS_FIELDS:
            values[name] = [n * factor for n in values[name]]
        return ArmStats(**values)

    def decayed(self, now: float, half_life_s: float) -> ArmStats:
        return self.scaled(_decay_factor(now - self.updated_at, half_life_s))

    def combined(self, other: ArmStats, half_life_s: float) -> ArmStats:
        """Both decayed to the later timestamp, then added (what the Lua script does)."""
        stamp = max(self.updated_at, other.updated_at)
        a, b = self.decayed(stamp, half_life_s), other.decayed(stamp, half_life_s)
        return ArmStats(**{name: getattr(a, name) + getattr(b, name)
                           for name in _COUNTERS + _LASTING},
                        **{name: add_lists(getattr(a, name), getattr(b, name))
                           for name in _POS_FIELDS},
                        updated_at=stamp)

    def counter_fields(self) -> dict[str, float]:
        """The numeric hash fields except ``updated_at``."""
        fields = {name: float(getattr(self, name)) for name in _COUNTERS + _LASTING}
        for name, prefix in _POS_FIELDS.items():
            fields.update({f"{prefix}{i}": float(n) for i, n in enumerate(getattr(self, name))})
        return fields

    def invalid_fields(self) -> dict[str, float]:
        """The fields that are not finite numbers of at least zero (none in a sound record)."""
        fields = self.counter_fields() | {"updated_at": float(self.updated_at)}
        return {name: value for name, value in fields.items()
                if not (math.isfinite(value) and value >= 0)}

    @classmethod
    def from_fields(cls, fields: Mapping[str, str | float]) -> ArmStats:
        """The record a hash holds; ValueError for a field that is not a finite number."""
        bad = [k for k, v in fields.items() if not math.isfinite(float(v))]
        if bad:
            raise ValueError(f"fields that are not finite numbers: {bad}")
        counters = {name: float(fields.get(name, 0.0)) for name in _COUNTERS}
        # A record written before the field existed counts its decayed requests.
        counters["lifetime_requests"] = float(fields.get("lifetime_requests",
                                                         counters["requests"]))
        lists = {}
        for name, prefix in _POS_FIELDS.items():
            positions = {int(key[len(prefix):]): float(value)
                         for key, value in fields.items() if key.startswith(prefix)}
            lists[name] = [positions.get(i, 0.0)
                           for i in range(max(positions) + 1 if positions else 0)]
        return cls(**counters, **lists, updated_at=float(fields.get("updated_at", 0.0)))


class StatsStore(abc.ABC):
    """Records acceptance statistics and serves them from an in-process cache."""

    def __init__(self, half_life_s: float, clock: Callable[[], float],
                 on_availability_change: Callable[[bool], None] | None):
        if half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        self.half_life_s = half_life_s
        self.clock = clock
        self.on_availability_change = on_availability_change
        self.dropped_writes = 0
        self.skipped_records = 0
        self.write_errors = 0
        self.read_errors = 0
        self._refusals_logged = False
        # The cached records by (model, bucket): a decision reads one bucket's, whatever else
        # the fleet's cache holds.
        self._buckets: dict[tuple[str, str], dict[StatsKey, ArmStats]] = {}
        self._listeners: list[tuple[str, Callable[[list[str]], None]]] = []

    @property
    def feedback_lag_s(self) -> float:
        """How long a record written now takes, at most, to reach a reader's cache when all is
        well: none in process."""
        return 0.0

    @property
    def shared(self) -> bool:
        """Whether other processes (the decoder replicas) write to this store: not in process,
        where the router of an ingress without Redis reads a store nobody writes."""
        return False

    def subscribe(self, model: str, listener: Callable[[list[str]], None]) -> None:
        """Call ``listener`` with ``model``'s buckets whose cached figures changed: after each
        record merged into the cache (in-process), after each refresh (Redis; an empty list
        when nothing changed, so the listener still hears the refresh's tick).

        A Redis store with subscribers reads only their models' records."""
        self._listeners.append((model, listener))

    def _notify(self, changed: Iterable[tuple[str, str]], tick: bool = False) -> None:
        by_model: dict[str, list[str]] = {}
        for model, bucket in changed:
            by_model.setdefault(model, []).append(bucket)
        for model, listener in self._listeners:
            if model in by_model or tick:
                try:
                    listener(by_model.get(model, []))
                except Exception:  # a listener's bug must not stop the store
                    log.exception("statistics listener for %s failed", model)

    @property
    @abc.abstractmethod
    def available(self) -> bool: ...

    @property
    def pending(self) -> int:
        """Records recorded but not yet written to the backend."""
        return 0

    @abc.abstractmethod
    async def start(self) -> None:
        """Start background work; never fails because the backend is down."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop background work, writing what is queued if the backend allows."""

    def record(self, key: StatsKey, stats: SpecDecodeStats, decode_time_s: float) -> None:
        """Queue one finished request's statistics; never blocks, never raises on outages.

        A request that ended with its first token (``max_tokens`` 1, a stop string in the
        first token) ran no decoding step: its goodput would be a token over a few
        microseconds, an outlier that would inflate the bucket's spread for hours. It says
        nothing of the arm, so it is not recorded.

        A record with a figure that is not a finite number of at least zero (a NaN timing, an
        infinite decode time) is refused and counted in ``dropped_writes``: merged into a key
        it would spoil the key for good. The first is logged, not the storm a bug may send."""
        if stats.num_output_tokens < MIN_RECORDED_TOKENS:
            self.skipped_records += 1
            return
        record = ArmStats.from_spec_decode(stats, decode_time_s, self.clock())
        invalid = record.invalid_fields()
        if invalid:
            self.dropped_writes += 1
            if not self._refusals_logged:
                self._refusals_logged = True
                log.warning("refusing statistics records whose figures are not finite numbers "
                            "of at least zero (counted in dropped_writes, logged once), first "
                            "for %s: %s", key, invalid)
            return
        self._record(key, record)

    @abc.abstractmethod
    def _record(self, key: StatsKey, stats: ArmStats) -> None: ...

    def snapshot(self, model: str | None = None,
                 bucket: str | None = None) -> dict[StatsKey, ArmStats]:
        """Cached figures decayed to now (on the clock that stamped them: ``_now``), optionally
        of one model and one bucket; never touches the network. Only the records asked for are
        decayed: a router asks for one bucket per request, and a fleet's cache holds every
        bucket's (of the subscribed models, for a Redis store with subscribers)."""
        now = self._now()
        if model is not None and bucket is not None:
            records = self._buckets.get((model, bucket), {}).items()
        else:
            records = ((key, stats) for (m, b), arms in self._buckets.items()
                       if (model is None or m == model) and (bucket is None or b == bucket)
                       for key, stats in arms.items())
        return {key: stats.decayed(now, self.half_life_s) for key, stats in records}

    def _now(self) -> float:
        """Now on the clock the records are stamped with: the store's own clock in process."""
        return self.clock()

    def _replace_cache(self, records: Mapping[StatsKey, ArmStats]) -> None:
        buckets: dict[tuple[str, str], dict[StatsKey, ArmStats]] = {}
        for key, stats in records.items():
            buckets.setdefault((key.model, key.bucket), {})[key] = stats
        old, self._buckets = self._buckets, buckets
        self._notify((b for b in old.keys() | buckets.keys() if old.get(b) != buckets.get(b)),
                     tick=True)

    async def flush(self) -> bool:
        """Write what is queued now; False when the backend was unreachable."""
        return True

    async def refresh(self) -> bool:
        """Reload the cache from the backend now; True on success."""
        return True


class InProcessStatsStore(StatsStore):
    """The single-process default: records are merged into the cache as they arrive."""

    def __init__(self, half_life_s: float = 3600.0, clock: Callable[[], float] = time.time,
                 on_availability_change: Callable[[bool], None] | None = None):
        super().__init__(half_life_s, clock, on_availability_change)

    @property
    def available(self) -> bool:
        return True

    async def start(self) -> None:
        if self.on_availability_change is not None:
            self.on_availability_change(True)

    async def close(self) -> None:
        pass

    def _record(self, key: StatsKey, new: ArmStats) -> None:
        arms = self._buckets.setdefault((key.model, key.bucket), {})
        current = arms.get(key)
        arms[key] = new if current is None else current.combined(new, self.half_life_s)
        self._notify([(key.model, key.bucket)])


def _escape(component: str) -> str:
    return component.replace("%", "%25").replace(":", "%3A")


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


class RedisStatsStore(StatsStore):
    """Statistics shared through Redis, written in batches and read into a periodic cache.

    Records waiting to be written are merged per key (decayed to the later one and added, as
    the script does), so a long outage costs one record per key, not one per request;
    ``max_buffer`` bounds the keys waiting. A batch is sent at most once, since the script
    adds and a batch the server applied in part or whole would count twice: redis-py does not
    resend it, and a batch whose replies never came (``UnknownOutcome``: a stalled server
    runs it after the socket timed out) is dropped and counted, not queued again. What met an
    outage before anything was sent (a ping first says the connection stands), or a reply
    saying the server ran none of it, is queued again for the next flush; records the server
    ran no script for (NOSCRIPT: it restarted) are sent again at once, the script loaded.

    ``reads=False`` (a decoder replica, which writes and never routes) pings Redis on the
    refresh interval instead of reading every record: its availability stays current while
    it is idle, at no parsing cost beside its decoding.
    """

    def __init__(self, url: str, prefix: str = "s3d:stats:v1", half_life_s: float = 3600.0,
                 ttl_s: int = 7 * 24 * 3600, refresh_interval_s: float = 2.0,
                 flush_interval_s: float = 0.5, max_buffer: int = 10000,
                 socket_timeout_s: float = 0.5, password: str | None = None,
                 max_backoff_s: float = 5.0, clock: Callable[[], float] = time.time,
                 on_availability_change: Callable[[bool], None] | None = None,
                 reads: bool = True):
        """``password`` is used when the URL carries none; a password in the URL wins."""
        super().__init__(half_life_s, clock, on_availability_change)
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        if ttl_s < 1:
            raise ValueError("ttl_s must be at least one second")
        self.prefix = prefix
        self.reads = reads
        self.ttl_s = int(ttl_s)
        self.refresh_interval_s = refresh_interval_s
        self.flush_interval_s = flush_interval_s
        self.max_buffer = max_buffer
        self.socket_timeout_s = socket_timeout_s
        self.max_backoff_s = max_backoff_s
        self._where = _redacted(url)
        self._redis = aioredis.Redis.from_url(
            url, password=password, decode_responses=True, socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 0))
        # The script is loaded before a send when the server may not have it (first, and
        # after a NOSCRIPT reply: a restarted server), so a send is one round trip and each
        # record's EVALSHA either runs or is refused, never half-sent after a check.
        self._script_sha: str | None = None
        # Index members whose hash could not be parsed, warned about once while they last.
        self._malformed: set[str] = set()
        # Index members skipped (a name this store does not write, a key of another type),
        # warned about and counted in ``read_errors`` once while they last: they stay until the
        # index prunes them a TTL after their score, and a refresh every 2 s warned each time.
        self._skipped: set[str] = set()
        # The server's clock minus this store's, as the last refresh that read ``TIME`` saw it
        # (0 before: the clocks taken to agree until then).
        self._server_offset_s = 0.0
        self._time_refusal_logged = False
        # Waiting records by key, oldest key first: (merged record, requests in it).
        self._buffer: dict[StatsKey, tuple[ArmStats, int]] = {}
        self._in_flight = 0
        self._flush_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._closing = asyncio.Event()
        # Reads and writes are judged apart (a demoted primary serves reads and refuses
        # writes): the store is available when neither last failed.
        self._reachable: dict[str, bool] = {}
        self._available: bool | None = None
        self._drops_logged = False

    @property
    def feedback_lag_s(self) -> float:
        """A writer's flush (on this store's interval) and a reader's refresh."""
        return self.flush_interval_s + self.refresh_interval_s

    @property
    def shared(self) -> bool:
        return True

    @property
    def available(self) -> bool:
        return bool(self._available)

    @property
    def pending(self) -> int:
        # list() copies in one step: the metrics thread reads this while the loop adds keys.
        return sum(n for _, n in list(self._buffer.values())) + self._in_flight

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:index"

    def hash_key(self, key: StatsKey) -> str:
        return ":".join((self.prefix, _escape(key.model), _escape(key.bucket), _escape(key.arm)))

    def parse_hash_key(self, name: str) -> StatsKey:
        model, bucket, arm = name[len(self.prefix) + 1:].split(":")
        return StatsKey(unquote(model), unquote(bucket), unquote(arm))

    async def start(self) -> None:
        """One refresh (bounded by the socket timeout), then the background loops. Never
        raises: a failure of the first refresh is the loops' to recover from."""
        await self._guarded(self.refresh)
        self._tasks = [
            asyncio.create_task(self._every(self.flush_interval_s, self.flush)),
            asyncio.create_task(self._every(self.refresh_interval_s, self.refresh)),
        ]

    async def close(self) -> None:
        self._closing.set()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._tasks = []
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.flush(), timeout=max(2 * self.socket_timeout_s, 1.0))
        if self.pending:
            log.warning("closing the statistics store with %d records unwritten", self.pending)
        await self._redis.aclose()

    def _record(self, key: StatsKey, stats: ArmStats) -> None:
        self._enqueue([(key, (stats, 1))])

    def _enqueue(self, items: list[tuple[StatsKey, tuple[ArmStats, int]]],
                 front: bool = False) -> None:
        """Merge ``items`` into the waiting records (``front``: they are older than those, a
        batch that met an outage); past ``max_buffer`` keys, the oldest keys' are dropped."""
        if front:
            waiting, self._buffer = self._buffer, dict(items)
        else:
            waiting = dict(items)
        for key, (stats, n) in waiting.items():
            held = self._buffer.get(key)
            self._buffer[key] = (stats, n) if held is None else (
                held[0].combined(stats, self.half_life_s), held[1] + n)
        while len(self._buffer) > self.max_buffer:
            _, n = self._buffer.pop(next(iter(self._buffer)))
            self.dropped_writes += n
            if not self._drops_logged:
                self._drops_logged = True
                log.warning("statistics buffer full (%d keys): dropping the oldest keys' "
                            "records until %s takes writes again", self.max_buffer, self._where)

    async def flush(self) -> bool:
        async with self._flush_lock:
            batch, self._buffer = list(self._buffer.items()), {}
            if not batch:
                return True
            self._in_flight = sum(n for _, (_, n) in batch)
            try:
                results = await self._write(batch)
            except asyncio.CancelledError:
                self._enqueue(batch, front=True)
                raise
            finally:
                self._in_flight = 0
            return self._settle(batch, results)

    async def _write(self, batch: list[tuple[StatsKey, tuple[ArmStats, int]]]) -> list:
        """One result per record: the script's reply or the error it met.

        A NOSCRIPT reply (a server restarted, or its script cache flushed) says the script did
        not run for that record: those records, and only those (the others' ran, and a
        record applied twice counts twice), are sent once more with the script loaded again,
        in the same flush. What fails then is settled like any other reply."""
        results = await self._send(batch)
        unrun = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if unrun:
            log.info("statistics script missing on %s (%d of %d records): loading it again",
                     self._where, len(unrun), len(batch))
            for i, r in zip(unrun, await self._send([batch[i] for i in unrun]), strict=True):
                results[i] = r
        return results

    async def _send(self, batch: list[tuple[StatsKey, tuple[ArmStats, int]]]) -> list:
        """One pipeline of the batch's records, the script loaded first if need be; each
        record is sent with its age on this writer's clock (the script stamps it on the
        server's)."""
        try:  # nothing sent yet: an outage here leaves the batch unapplied
            if self._script_sha is None:
                self._script_sha = await self._redis.script_load(_APPLY_RECORD_LUA)
            else:
                await self._redis.ping()
        except _REDIS_ERRORS as exc:
            return [exc] * len(batch)
        now = self.clock()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, (stats, _) in batch:
                    args = [max(now - stats.updated_at, 0.0), self.half_life_s, self.ttl_s]
                    for name, value in stats.counter_fields().items():
                        args += [name, value]
                    pipe.evalsha(self._script_sha, 2, self.hash_key(key), self.index_key, *args)
                results = await pipe.execute(raise_on_error=False)
        except _REDIS_ERRORS as exc:
            if _is_outage(exc):
                return [UnknownOutcome(repr(exc))] * len(batch)
            return [exc] * len(batch)
        if any(isinstance(r, NoScriptError) for r in results):
            self._script_sha = None  # a restarted server: load it again before the next send
        return results

    def _settle(self, batch: list[tuple[StatsKey, tuple[ArmStats, int]]],
                results: list) -> bool:
        """Requeue what met an outage, count and drop what the server rejected or may have
        applied (``UnknownOutcome``); False on outage."""
        unknown, outages, rejected, retry = [], [], [], []
        for item, r in zip(batch, results, strict=True):
            if isinstance(r, UnknownOutcome):
                unknown.append((item, r))
            elif _is_outage(r):
                outages.append(r)
                retry.append(item)
            elif isinstance(r, Exception):
                rejected.append((item, r))
        if rejected:
            requests = sum(n for (_, (_, n)), _ in rejected)
            log.error("statistics store rejected %d records (%d requests), e.g. %r",
                      len(rejected), requests, rejected[0][1])
            self.dropped_writes += requests
        if unknown:
            requests = sum(n for (_, (_, n)), _ in unknown)
            log.warning("no reply to %d records (%d requests) sent to %s (%s): dropped, as the "
                        "server may have applied them", len(unknown), requests, self._where,
                        unknown[0][1])
            self.dropped_writes += requests
        self.write_errors += len(rejected) + bool(outages or unknown)
        self._enqueue(retry, front=True)
        self._set_available(not outages, outages[0] if outages else None, "write")
        if unknown:
            # The connection failed, not the writing: with nothing queued again to retry, a
            # write-channel failure would stay until the replica's next request. The refresh
            # loop's next read or ping says when the server answers again.
            self._set_available(False, unknown[0][1], "read")
        return not (outages or unknown)

    async def refresh(self) -> bool:
        """Reload the cache (``reads``), or ping: either says whether Redis is reachable. A
        read that failed for any Redis error leaves the store unavailable until one succeeds:
        the cache is as stale as in an outage."""
        try:
            if self.reads:
                cache = await self._read()
            else:
                await self._redis.ping()
        except _REDIS_ERRORS as exc:
            self.read_errors += 1
            if not _is_outage(exc):
                log.error("reading statistics failed: %r", exc)
            self._set_available(False, exc, "read")
            return False
        if self.reads:
            self._replace_cache(cache)
        self._set_available(True, None, "read")
        return True

    def _models_read(self) -> set[str] | None:
        """The models whose records a refresh reads: the subscribed ones, or every model (None)
        when nothing subscribed (a store read only through ``snapshot()``). A fleet's Redis
        holds every model's records and a router follows one: fetching and parsing the others'
        on the event loop every refresh was work for nothing."""
        return {model for model, _ in self._listeners} or None

    def _now(self) -> float:
        """Now on the server's clock, which stamps the records: this store's clock plus the
        offset the last refresh measured."""
        return self.clock() + self._server_offset_s

    async def _read(self) -> dict[StatsKey, ArmStats]:
        names = await self._redis.zrange(self.index_key, 0, -1)
        models = self._models_read()
        if models is not None:
            heads = tuple(f"{self.prefix}:{_escape(model)}:" for model in models)
            names = [name for name in names if name.startswith(heads)]
        keys, skipped = {}, {}
        for name in names:
            try:
                keys[name] = self.parse_hash_key(name)
            except ValueError:  # not fetched: nothing of it could be read
                skipped[name] = "not a name this store writes"
        async with self._redis.pipeline(transaction=False) as pipe:
            # The server's clock, read in the round trip of the records it stamped.
            pipe.time()
            for name in keys:
                pipe.hgetall(name)
            before = self.clock()
            # One key of the wrong type (written by something else under the prefix) skips
            # that key, not the refresh.
            server_time, *hashes = await pipe.execute(raise_on_error=False)
            after = self.clock()
        self._measure_offset(server_time, (before + after) / 2)
        cache, malformed = {}, {}
        for (name, key), fields in zip(keys.items(), hashes, strict=True):
            if isinstance(fields, Exception):
                if _is_outage(fields):
                    raise fields
                skipped[name] = repr(fields)
            elif fields:
                try:
                    cache[key] = ArmStats.from_fields(fields)
                except ValueError as exc:
                    malformed[name] = exc
        for name, why in skipped.items():
            if name not in self._skipped:
                self.read_errors += 1
                log.warning("skipping statistics key %s while it is in the index: %s", name, why)
        self._skipped = set(skipped)
        for name, exc in malformed.items():
            await self._discard(name, exc)
        self._malformed = set(malformed)
        return cache

    def _measure_offset(self, server_time: tuple[int, int] | Exception, local: float) -> None:
        """Keep the server's ``TIME`` reply minus ``local``, this store's clock midway through
        the round trip (off by half of it at most: nothing beside a half-life). A refused
        ``TIME`` (an ACL that denies it) keeps the last offset, warned about once; an outage
        fails the refresh like the records' replies would."""
        if isinstance(server_time, Exception):
            if _is_outage(server_time):
                raise server_time
            if not self._time_refusal_logged:
                self._time_refusal_logged = True
                log.warning("reading the clock of %s failed (%r): figures are decayed to this "
                            "store's clock, with the last offset measured (%.3f s)", self._where,
                            server_time, self._server_offset_s)
            return
        seconds, micros = server_time
        self._server_offset_s = seconds + micros / 1e6 - local
        self._time_refusal_logged = False

    async def _discard(self, name: str, error: ValueError) -> None:
        """Delete a hash that cannot be parsed (a NaN stored by a writer from before the checks)
        and its index member. Skipped, it would stay for good: the script keeps a NaN through
        every write and each write refreshes the TTL, so the router saw the arm as never tried.

        The hash is read again under WATCH and deleted only if it still cannot be parsed and no
        record landed since. A failure (a demoted primary refuses the delete) is left for the
        next refresh, without touching the availability: the read succeeded, and writes are
        judged by the flushes. Each hash is warned about once while it lasts."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(name)
                try:
                    ArmStats.from_fields(await pipe.hgetall(name))
                    return  # gone since (another reader deleted it) or readable again
                except ValueError:
                    pipe.multi()
                    pipe.delete(name)
                    pipe.zrem(self.index_key, name)
                    await pipe.execute()
            outcome = "deleted"
        except _REDIS_ERRORS as exc:  # WatchError too: a record landed since
            outcome = f"not deleted yet ({exc!r}), tried again each refresh"
        if name not in self._malformed:
            self.read_errors += 1
            log.warning("malformed statistics hash %s (%s): %s", name, error, outcome)

    async def _every(self, interval_s: float, operation: Callable[[], Awaitable[bool]]) -> None:
        delay = interval_s
        while not await self._closed_within(delay):
            ok = await self._guarded(operation)
            delay = interval_s if ok else min(2 * delay, max(self.max_backoff_s, interval_s))

    @staticmethod
    async def _guarded(operation: Callable[[], Awaitable[bool]]) -> bool:
        """``operation()``, with any error but cancellation logged and taken as a failure: a
        background loop that ended on one bad reply would stop writing or reading for good."""
        try:
            return await operation()
        except Exception:
            log.exception("statistics store %s failed", getattr(operation, "__name__", "work"))
            return False

    async def _closed_within(self, delay_s: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._closing.wait(), delay_s)
        return self._closing.is_set()

    def _set_available(self, reachable: bool, error: BaseException | None,
                       channel: str) -> None:
        self._reachable[channel] = reachable
        available = all(self._reachable.values())
        if available == self._available:
            return
        if not available:
            log.warning("statistics store at %s unavailable (%s failed), buffering writes: %r",
                        self._where, channel, error)
        elif self._available is False:
            log.info("statistics store at %s available again", self._where)
            self._drops_logged = False
        self._available = available
        if self.on_availability_change is not None:
            self.on_availability_change(available)


_MEMORY_OPTIONS = ("half_life_s", "clock", "on_availability_change")


def make_store(url: str | None, **kwargs) -> StatsStore:
    """``None`` or ``memory://`` -> in-process store; ``redis://``/``rediss://`` -> Redis.

    Options only the Redis store understands are ignored for the in-process store.
    """
    if url is None or url == "memory://":
        return InProcessStatsStore(**{k: v for k, v in kwargs.items() if k in _MEMORY_OPTIONS})
    if url.startswith(("redis://", "rediss://")):
        return RedisStatsStore(url, **kwargs)
    raise ValueError(f"unsupported statistics store URL scheme: {url.split('://')[0]!r}")
