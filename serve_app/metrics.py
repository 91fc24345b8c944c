"""Prometheus metrics through ``ray.serve.metrics``, fed from the one acceptance-stats record."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ray.serve import metrics

from workers.stats import SpecDecodeStats


def _inc(counter: metrics.Counter, value: float, tags: dict) -> None:
    """Ray counters refuse increments of zero."""
    if value > 0:
        counter.inc(value, tags)


log = logging.getLogger(__name__)

# How often a decoder replica sets its gauges again (see ``DecoderMetrics``).
GAUGE_REFRESH_S = 5.0

LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
# The router's decision is sub-millisecond: its buckets, in seconds, bracket the 1 ms target.
DECISION_BUCKETS = [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2]


class _KeptGauges:
    """Gauges set again every ``GAUGE_REFRESH_S`` by a daemon thread: Ray drops a gauge from its
    Prometheus export about 20 s after its last ``set()`` (seen with Ray 2.60), so a steady value
    (Redis up for hours, a full pool) would vanish, and an alert on
    ``s3d_stats_store_available == 0`` would stop firing 20 s into an outage."""

    def __init__(self) -> None:
        self._gauges: dict[metrics.Gauge, float] = {}
        self._watch: Callable[[], None] | None = None
        # Left unset until the store's first answer (``set_store_available``; the deployments
        # start their store as they start): a 1 set here claimed Redis up during an outage
        # until that answer came.
        self.store_available = metrics.Gauge(
            "s3d_stats_store_available", "1 when the statistics store (Redis) is reachable.")
        threading.Thread(target=self._keep_gauges, name="s3d-gauges", daemon=True).start()

    def _set(self, gauge: metrics.Gauge, value: float) -> None:
        self._gauges[gauge] = value
        gauge.set(value)

    def _keep_gauges(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            if self._watch is not None:
                try:
                    self._watch()
                except Exception:
                    log.exception("reading the statistics store's figures failed")
            for gauge, value in list(self._gauges.items()):
                try:
                    gauge.set(value)
                except Exception:  # a metric is a sink: never let it end the thread
                    log.exception("setting a gauge failed")

    def set_store_available(self, available: bool) -> None:
        self._set(self.store_available, 1 if available else 0)


class DecoderMetrics(_KeptGauges):
    def __init__(self) -> None:
        super().__init__()
        tags = ("arm",)
        self.num_drafts = metrics.Counter(
            "spec_decode_num_drafts", "Verify steps that checked drafted tokens.", tag_keys=tags)
        self.num_draft_tokens = metrics.Counter(
            "spec_decode_num_draft_tokens", "Drafted tokens verified.", tag_keys=tags)
        self.num_accepted_tokens = metrics.Counter(
            "spec_decode_num_accepted_tokens", "Drafted tokens accepted.", tag_keys=tags)
        self.accepted_per_pos = metrics.Counter(
            "spec_decode_num_accepted_tokens_per_pos", "Accepted drafted tokens by position.",
            tag_keys=("arm", "position"))
        self.output_tokens = metrics.Counter(
            "s3d_output_tokens", "Generated tokens.", tag_keys=tags)
        self.request_latency = metrics.Histogram(
            "s3d_decoder_request_latency_s", "Decoder time per request.",
            boundaries=LATENCY_BUCKETS, tag_keys=tags)
        self.ttft = metrics.Histogram(
            "s3d_time_to_first_token_s", "Time to first token in the decoder.",
            boundaries=LATENCY_BUCKETS, tag_keys=tags)
        self.tokens_per_s = metrics.Histogram(
            "s3d_tokens_per_s", "Decode tokens per second per request.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500], tag_keys=tags)
        self.pool_tokens = metrics.Gauge(
            "s3d_pool_tokens", "Tokens in the replica's pool of earlier outputs (n-gram drafts).")
        self.stats_pending = metrics.Gauge(
            "s3d_stats_pending_writes", "Requests' statistics waiting to be written to Redis.")
        self.stats_dropped = metrics.Counter(
            "s3d_stats_dropped_writes", "Requests' statistics dropped: buffer full during an "
            "outage, refused by Redis, or figures that are not finite numbers.")
        self._dropped_seen = 0
        self.active_generations = metrics.Gauge(
            "s3d_active_generations", "Generations the replica is decoding (each of a "
            "request's n choices one).")
        self.waiting_generations = metrics.Gauge(
            "s3d_waiting_generations", "Generations waiting for a decoding slot "
            "(max_active_generations busy).")

    def watch(self, store, scheduler) -> None:
        """Export the store's waiting and dropped records and the scheduler's generations with
        the gauges' refresh."""
        self._watch = lambda: self._figures(store, scheduler)

    def _figures(self, store, scheduler) -> None:
        self._set(self.stats_pending, store.pending)
        _inc(self.stats_dropped, store.dropped_writes - self._dropped_seen, {})
        self._dropped_seen = store.dropped_writes
        self._set(self.active_generations, scheduler.active)
        self._set(self.waiting_generations, scheduler.waiting)

    def observe_request(self, stats: SpecDecodeStats, arm: str, seconds: float,
                        ttft: float, pool_tokens: int) -> None:
        tags = {"arm": arm}
        self._set(self.pool_tokens, pool_tokens)
        _inc(self.num_drafts, stats.num_drafts, tags)
        _inc(self.num_draft_tokens, stats.num_draft_tokens, tags)
        _inc(self.num_accepted_tokens, stats.num_accepted_tokens, tags)
        for pos, n in enumerate(stats.accepted_per_pos):
            _inc(self.accepted_per_pos, n, {"arm": arm, "position": str(pos)})
        _inc(self.output_tokens, stats.num_output_tokens, tags)
        self.request_latency.observe(seconds, tags)
        self.ttft.observe(ttft, tags)
        decode = seconds - ttft
        if stats.num_output_tokens > 1 and decode > 0:
            self.tokens_per_s.observe((stats.num_output_tokens - 1) / decode, tags)


class IngressMetrics(_KeptGauges):
    """The ingress's store only reads (its refresh feeds the router), so its gauge says whether
    routes come from the fleet's current figures or from its cache and the profile's priors."""

    def __init__(self) -> None:
        super().__init__()
        self.arm_chosen = metrics.Counter(
            "s3d_arm_chosen", "Arms chosen by the router (or pinned by the request).",
            tag_keys=("arm", "pinned"))
        self.latency = metrics.Histogram(
            "s3d_request_latency_s", "End-to-end request latency at the ingress.",
            boundaries=LATENCY_BUCKETS)
        self.decision = metrics.Histogram(
            "s3d_router_decision_s", "The router's decision per request (the prompt's context "
            "bucket and its arm).", boundaries=DECISION_BUCKETS)

    def observe_decision(self, seconds: float) -> None:
        self.decision.observe(seconds)

    def observe_arm(self, arm: str, pinned: bool) -> None:
        self.arm_chosen.inc(1, {"arm": arm, "pinned": str(pinned).lower()})

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)
