"""The engine of ``s3d loadtest``: closed-loop HTTP load on a local s3d-serve, and its report.

This module owns the load-test configuration (``LoadConfig``, including the rule that the target
must be a loopback address), the run itself (``run_load`` / ``run_load_sync``: N client coroutines
sharing one ``httpx.AsyncClient``, each sending its next request as soon as the previous one ends,
until the request budget, the duration or the hard time cap is spent), the per-request
measurements (latency, time to first token and inter-token latency of streams, output tokens,
errors by kind, ``spec_decode`` figures) and the report (``LoadReport``, ``report_table``).

Definitions used by the report:

* Latency, TTFT, ITL, tokens and ``spec_decode`` figures come from successful requests only.
* Latency is the whole request: until the body is read, or until ``data: [DONE]`` for a stream.
* TTFT (streams only) is the time to the first event whose choices carry non-empty text. ITL
  (streams only) is the gap between successive such events; one event may hold several tokens
  (a speculative step can accept more than one), so it is the latency between text deliveries.
* Output tokens are ``usage.completion_tokens`` when the response has it (streams ask for it with
  ``stream_options.include_usage``), else the number of text events of the stream.
* Percentiles are nearest-rank: the p-th percentile of n sorted samples is the sample of rank
  ``ceil(p / 100 * n)``, always an observed value, and defined for a single sample.
* Error kinds: ``http_<status>`` for a non-2xx answer, ``stream_error`` for an error event in a
  stream, ``timeout`` when the request exceeds ``timeout_s`` in total, ``connection`` when the
  connection fails or breaks, ``protocol`` when a 2xx answer breaks the API contract (body that is
  not a completion, bad SSE JSON, stream without ``data: [DONE]``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workers.stats import mean_acceptance_length, nearest_rank

__all__ = [
    "DEFAULT_PROMPTS",
    "LoadConfig",
    "Percentiles",
    "LatencyStats",
    "SpecDecodeSummary",
    "LoadReport",
    "check_loopback",
    "request_kind",
    "run_load",
    "run_load_sync",
    "report_table",
]

DEFAULT_PROMPTS = (
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning, how are you?' into French.",
    "def fibonacci(n):",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
)

_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def check_loopback(base_url: str) -> str:
    """``base_url`` without a trailing ``/`` or ``/v1``; ValueError unless its host is loopback.

    Accepted hosts are ``localhost``, IPv4 127.0.0.0/8 and IPv6 ``::1`` (or an IPv4-mapped
    127.x address). Names are not resolved, so refusing a URL sends nothing, not even a DNS query.
    """
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"base_url is not a valid URL: {exc}") from exc
    if url.scheme not in ("http", "https"):
        raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
    host = url.host.lower()
    loopback = host in _LOOPBACK_NAMES
    if not loopback:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        loopback = address is not None and address.is_loopback
    if not loopback:
        raise ValueError(f"base_url must point to a loopback address (127.0.0.0/8, localhost or "
                         f"::1): the load test only runs against a server on this machine; got "
                         f"host {host!r} in {base_url!r}")
    return base_url.rstrip("/").removesuffix("/v1")


class LoadConfig(BaseModel):
    """What to send, how hard and for how long. Always bounded: ``max_duration_s`` caps the run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field("http://127.0.0.1:8000", description="Server URL; must be loopback.")
    api_key: str | None = Field(None, exclude=True, repr=False,
                                description="Bearer key; never written to the report.")
    clients: int = Field(4, ge=1, le=256, description="Concurrent clients (closed loop).")
    duration_s: float | None = Field(None, gt=0, allow_inf_nan=False,
                                     description="Start no request after this many seconds.")
    requests: int | None = Field(None, ge=1, description="Total requests to send.")
    max_duration_s: float = Field(
        600.0, gt=0, allow_inf_nan=False,
        description="Hard cap: requests still running are cancelled. Default: 600 s, or with "
                    "duration_s, duration_s + timeout_s if longer (the requests in flight at "
                    "the deadline may finish).")
    stream_fraction: float = Field(0.0, ge=0.0, le=1.0, description="Share of streamed requests.")
    chat_fraction: float = Field(0.0, ge=0.0, le=1.0,
                                 description="Share of /v1/chat/completions requests.")
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1,
                               description="Each kind of request (streamed or not, chat or "
                                           "not) takes them in turn.")
    arm: str | None = Field(None, description="Pin this speculative-decoding arm.")
    timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False,
                             description="Total time allowed to one request.")
    model: str | None = Field(None, description="The `model` field of requests.")

    @field_validator("base_url")
    @classmethod
    def _loopback(cls, value: str) -> str:
        return check_loopback(value)

    @model_validator(mode="before")
    @classmethod
    def _default_cap(cls, data):
        """Without a cap given, one that lets the requests in flight at ``duration_s`` run to
        their timeout (a cap of ``duration_s`` itself would cancel one per client, counted as
        neither ok nor failed)."""
        if isinstance(data, dict) and data.get("max_duration_s") is None:
            data = {k: v for k, v in data.items() if k != "max_duration_s"}
            duration = data.get("duration_s")
            if isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0:
                timeout = data.get("timeout_s", cls.model_fields["timeout_s"].default)
                if isinstance(timeout, (int, float)) and math.isfinite(timeout):
                    data["max_duration_s"] = max(600.0, duration + timeout)
        return data

    @model_validator(mode="after")
    def _bounded(self) -> LoadConfig:
        if self.duration_s is None and self.requests is None:
            raise ValueError("set duration_s, requests or both")
        if self.duration_s is not None and self.duration_s > self.max_duration_s:
            raise ValueError(f"duration_s ({self.duration_s}) exceeds max_duration_s "
                             f"({self.max_duration_s})")
        return self


class Percentiles(BaseModel):
    samples: int
    p50: float | None
    p95: float | None
    p99: float | None


class LatencyStats(Percentiles):
    mean: float | None
    max: float | None


class SpecDecodeSummary(BaseModel):
    responses: int = Field(description="Successful responses that carried a spec_decode object.")
    mean_acceptance_length: float | None = Field(
        description="Tokens per verify step over those responses' steps together (their "
                    "accepted tokens and steps pooled, as the server merges choices).")
    arms: dict[str, int] = Field(description="Arm that served each of those responses.")


class LoadReport(BaseModel):
    config: LoadConfig
    started_at: datetime
    duration_s: float = Field(description="Wall time of the run.")
    stopped_by: Literal["requests", "duration", "max_duration"]
    requests_sent: int
    requests_ok: int
    requests_failed: int
    requests_cancelled: int = Field(description="Still running when max_duration_s was reached.")
    errors: dict[str, int] = Field(description="Failed requests by kind.")
    requests_per_s: float = Field(description="Successful requests per second of the run.")
    output_tokens: int
    tokens_per_s: float = Field(description="Output tokens of successful requests per second.")
    latency_s: LatencyStats
    ttft_s: Percentiles = Field(description="Streamed requests only.")
    itl_s: Percentiles = Field(description="Streamed requests only.")
    spec_decode: SpecDecodeSummary


def _spread(index: int, fraction: float) -> tuple[bool, int]:
    """Whether item ``index`` is picked when ``fraction`` of the items are picked, evenly spaced,
    and its number among the items that went the same way."""
    picked_before = math.floor(index * fraction)
    picked = math.floor((index + 1) * fraction) > picked_before
    return picked, picked_before if picked else index - picked_before


def _kind(slot: int, stream_fraction: float, chat_fraction: float) -> tuple[bool, bool, int]:
    """``(stream, chat, rank)`` of request number ``slot``, ``rank`` its number among the
    requests of its kind."""
    stream, rank = _spread(slot, stream_fraction)
    chat, rank = _spread(rank, chat_fraction)
    return stream, chat, rank


def request_kind(slot: int, stream_fraction: float, chat_fraction: float) -> tuple[bool, bool]:
    """``(stream, chat)`` of request number ``slot``: deterministic and evenly spread.

    ``chat_fraction`` applies within the streamed and within the unstreamed requests, so every
    combination of the two shows up in proportion.
    """
    stream, chat, _ = _kind(slot, stream_fraction, chat_fraction)
    return stream, chat


@dataclass
class _Outcome:
    error: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    spec_decode: dict[str, Any] | None = None


def _request(config: LoadConfig, slot: int) -> tuple[str, dict]:
    """Request ``slot``'s path and body. Each kind takes the prompts in turn on its own: taken by
    ``slot``, a prompt would go with a kind (half the requests streamed and six prompts: streams
    only ever sent the odd ones)."""
    stream, chat, rank = _kind(slot, config.stream_fraction, config.chat_fraction)
    prompt = config.prompts[rank % len(config.prompts)]
    body: dict[str, Any] = {"max_tokens": config.max_tokens, "temperature": config.temperature,
                            "stream": stream}
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    if config.arm is not None:
        body["arm"] = config.arm
    if config.model is not None:
        body["model"] = config.model
    return path, body


def _usage_tokens(payload: dict) -> int | None:
    usage = payload.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else None


def _spec_decode(payload: dict) -> dict | None:
    spec = payload.get("spec_decode")
    return spec if isinstance(spec, dict) else None


def _has_text(payload: dict) -> bool:
    """Whether a stream chunk (completion ``text`` or chat ``delta.content``) carries text."""
    choices = payload.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(text, str) and text:
            return True
    return False


def _sse_data(line: str) -> str:
    """The payload of an SSE ``data:`` line; empty for blank lines, comments and other fields."""
    name, _, value = line.partition(":")
    return value.removeprefix(" ") if name == "data" else ""


async def _unary(client: httpx.AsyncClient, path: str, body: dict, started: float) -> _Outcome:
    response = await client.post(path, json=body)
    if not response.is_success:
        return _Outcome(error=f"http_{response.status_code}")
    try:
        payload = response.json()
    except ValueError:
        return _Outcome(error="protocol")
    if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
        return _Outcome(error="protocol")
    return _Outcome(latency_s=time.perf_counter() - started, tokens=_usage_tokens(payload) or 0,
                    spec_decode=_spec_decode(payload))


async def _streamed(client: httpx.AsyncClient, path: str, body: dict, started: float) -> _Outcome:
    async with client.stream("POST", path, json=body) as response:
        if not response.is_success:
            await response.aread()
            return _Outcome(error=f"http_{response.status_code}")
        first = last = None
        gaps: list[float] = []
        events = 0
        usage_tokens = None
        spec = None
        async for line in response.aiter_lines():
            data = _sse_data(line)
            if not data:
                continue
            if data == "[DONE]":
                return _Outcome(latency_s=time.perf_counter() - started,
                                ttft_s=None if first is None else first - started, itl_s=gaps,
                                tokens=events if usage_tokens is None else usage_tokens,
                                spec_decode=spec)
            try:
                payload = json.loads(data)
            except ValueError:
                return _Outcome(error="protocol")
            if not isinstance(payload, dict):
                return _Outcome(error="protocol")
            if "error" in payload:
                return _Outcome(error="stream_error")
            if _has_text(payload):
                now = time.perf_counter()
                if last is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                events += 1
            if _usage_tokens(payload) is not None:
                usage_tokens = _usage_tokens(payload)
            spec = _spec_decode(payload) or spec
        return _Outcome(error="protocol")  # the stream ended without data: [DONE]


async def _send(client: httpx.AsyncClient, config: LoadConfig, slot: int) -> _Outcome:
    """One request; a failure is returned as the outcome's error kind, never raised."""
    path, body = _request(config, slot)
    started = time.perf_counter()
    call = _streamed if body["stream"] else _unary
    try:
        return await asyncio.wait_for(call(client, path, body, started), config.timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return _Outcome(error="timeout")
    except httpx.TransportError:
        return _Outcome(error="connection")
    except httpx.HTTPError:  # e.g. a body that cannot be decoded
        return _Outcome(error="protocol")


class _Run:
    """Hands out request slots until the budget is spent, and keeps the outcomes."""

    def __init__(self, config: LoadConfig, start: float):
        self.config = config
        self.deadline = start + config.duration_s if config.duration_s is not None else math.inf
        self.sent = 0
        self.outcomes: list[_Outcome] = []

    def next_slot(self) -> int | None:
        if self.config.requests is not None and self.sent >= self.config.requests:
            return None
        if time.perf_counter() >= self.deadline:
            return None
        self.sent += 1
        return self.sent - 1


# A client whose request found no server waits this long before its next one: a run against a
# service that is down reports its connection errors, at a pace that is not a busy loop.
CONNECTION_ERROR_PAUSE_S = 0.5


async def _client_loop(client: httpx.AsyncClient, run: _Run) -> None:
    while (slot := run.next_slot()) is not None:
        outcome = await _send(client, run.config, slot)
        run.outcomes.append(outcome)
        if outcome.error == "connection":
            await asyncio.sleep(CONNECTION_ERROR_PAUSE_S)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _percentiles(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    return {"samples": len(ordered),
            **{f"p{p}": _round(nearest_rank(ordered, p / 100)) for p in (50, 95, 99)}}


def _latency(samples: list[float]) -> LatencyStats:
    return LatencyStats(**_percentiles(samples),
                        mean=_round(sum(samples) / len(samples)) if samples else None,
                        max=_round(max(samples, default=None)))


def _spec_summary(outcomes: list[_Outcome]) -> SpecDecodeSummary:
    """The responses' ``spec_decode`` figures. Their acceptance length pools accepted tokens and
    steps: a mean of the responses' means would weigh a response of two steps like one of two
    hundred, and count one of a single token (no step, length 0) as a step that accepted none."""
    specs = [o.spec_decode for o in outcomes if o.spec_decode is not None]
    counts = [(s["num_accepted_tokens"], s["num_spec_steps"]) for s in specs
              if isinstance(s.get("num_accepted_tokens"), int)
              and isinstance(s.get("num_spec_steps"), int)]
    accepted, steps = sum(a for a, _ in counts), sum(n for _, n in counts)
    arms = Counter(s["arm"] for s in specs if isinstance(s.get("arm"), str))
    return SpecDecodeSummary(
        responses=len(specs),
        mean_acceptance_length=_round(mean_acceptance_length(accepted, steps)) if steps else None,
        arms=dict(sorted(arms.items())))


def _report(run: _Run, started_at: datetime, duration: float, capped: bool) -> LoadReport:
    config = run.config
    ok = [o for o in run.outcomes if o.error is None]
    errors = Counter(o.error for o in run.outcomes if o.error is not None)
    if capped:
        stopped_by = "max_duration"
    elif config.requests is not None and run.sent >= config.requests:
        stopped_by = "requests"
    else:
        stopped_by = "duration"
    tokens = sum(o.tokens for o in ok)
    return LoadReport(
        config=config, started_at=started_at, duration_s=round(duration, 6),
        stopped_by=stopped_by, requests_sent=run.sent, requests_ok=len(ok),
        requests_failed=len(run.outcomes) - len(ok),
        requests_cancelled=run.sent - len(run.outcomes), errors=dict(sorted(errors.items())),
        requests_per_s=round(len(ok) / duration, 4), output_tokens=tokens,
        tokens_per_s=round(tokens / duration, 4),
        latency_s=_latency([o.latency_s for o in ok]),
        ttft_s=Percentiles(**_percentiles([o.ttft_s for o in ok if o.ttft_s is not None])),
        itl_s=Percentiles(**_percentiles([gap for o in ok for gap in o.itl_s])),
        spec_decode=_spec_summary(ok))


async def run_load(config: LoadConfig) -> LoadReport:
    """Run the load test described by ``config``; request failures are counted, not raised."""
    base_url = check_loopback(config.base_url)  # again: model_construct skips validation
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.clients,
                          max_keepalive_connections=config.clients)
    started_at = datetime.now(timezone.utc)
    start = time.perf_counter()
    run = _Run(config, start)
    # trust_env=False: no proxy from the environment, so requests go straight to the loopback host
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(config.timeout_s),
                                 trust_env=False) as client:
        tasks = [asyncio.create_task(_client_loop(client, run)) for _ in range(config.clients)]
        done, pending = await asyncio.wait(tasks, timeout=config.max_duration_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in this module surfaces here; request failures never do
    return _report(run, started_at, time.perf_counter() - start, capped=bool(pending))


def run_load_sync(config: LoadConfig) -> LoadReport:
    """``run_load`` in a fresh event loop, for callers without one (the CLI)."""
    return asyncio.run(run_load(config))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def report_table(report: LoadReport) -> str:
    """The report as Markdown tables (readable as plain text); latencies in milliseconds."""
    config = report.config
    errors = ", ".join(f"{kind}: {count}" for kind, count in report.errors.items()) or "none"
    spec = report.spec_decode
    arms = ", ".join(f"{arm}: {count}" for arm, count in spec.arms.items()) or "-"
    acceptance = ("-" if spec.mean_acceptance_length is None
                  else f"{spec.mean_acceptance_length:.3f}")
    lines = [
        f"s3d loadtest: {config.base_url}, {config.clients} clients, "
        f"{report.duration_s:.2f} s, stopped by {report.stopped_by}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests sent | {report.requests_sent} |",
        f"| requests ok | {report.requests_ok} |",
        f"| requests failed | {report.requests_failed} |",
        f"| requests cancelled | {report.requests_cancelled} |",
        f"| errors | {errors} |",
        f"| requests/s | {report.requests_per_s:.2f} |",
        f"| output tokens | {report.output_tokens} |",
        f"| tokens/s | {report.tokens_per_s:.1f} |",
        f"| mean acceptance length | {acceptance} |",
        f"| arms | {arms} |",
        "",
        "| latency (ms) | samples | p50 | p95 | p99 | mean | max |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [("request", report.latency_s), ("TTFT (streams)", report.ttft_s),
            ("ITL (streams)", report.itl_s)]
    for name, stats in rows:
        extra = ([_ms(stats.mean), _ms(stats.max)] if isinstance(stats, LatencyStats)
                 else ["-", "-"])
        cells = [name, str(stats.samples), _ms(stats.p50), _ms(stats.p95), _ms(stats.p99), *extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
