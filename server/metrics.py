"""Prometheus metrics, named like vLLM's with the prefix ``smollm2:``. Each app has its own registry.

Gauges and the engine's own counters are read from ``engine.stats()`` when Prometheus scrapes, so they
are never stale; per-request counters and histograms are observed by the serving layer as tokens flow.

| Metric | Type | Labels | Meaning |
|---|---|---|---|
| `smollm2:num_requests_running` | gauge | | sequences in the running batch |
| `smollm2:num_requests_waiting` | gauge | | sequences waiting to be scheduled (incl. preempted) |
| `smollm2:kv_cache_usage_perc` | gauge | | fraction of KV cache blocks in use, 0..1 |
| `smollm2:num_preemptions_total` | counter | | sequences preempted (blocks freed, recomputed later) |
| `smollm2:prefix_cache_queries_total` | counter | | prompt tokens looked up in the prefix cache |
| `smollm2:prefix_cache_hits_total` | counter | | prompt tokens found in the prefix cache |
| `smollm2:engine_restarts_total` | counter | | times the engine core died and was restarted |
| `smollm2:prompt_tokens_total` | counter | | prompt tokens of admitted requests |
| `smollm2:generation_tokens_total` | counter | | tokens generated (and delivered) |
| `smollm2:request_success_total` | counter | `finished_reason` | finished choices by reason: stop, length, abort |
| `smollm2:time_to_first_token_seconds` | histogram | | arrival to first generated token, per request |
| `smollm2:inter_token_latency_seconds` | histogram | | time between two tokens of one choice |
| `smollm2:request_queue_time_seconds` | histogram | | arrival in the engine to first scheduled |
| `smollm2:e2e_request_latency_seconds` | histogram | | arrival to the last choice's finish, per request |
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "smollm2:"
disable_created_metrics()  # no *_created series: they double the output and nobody graphs them
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
)

# (name without prefix, kind, stats() key, help)
_ENGINE_METRICS = [
    ("num_requests_running", "gauge", "num_running", "Number of sequences in the running batch."),
    ("num_requests_waiting", "gauge", "num_waiting", "Number of sequences waiting to be scheduled."),
    ("kv_cache_usage_perc", "gauge", "kv_cache_usage", "Fraction of KV cache blocks in use (0..1)."),
    ("num_preemptions", "counter", "num_preemptions", "Sequences preempted so far."),
    (
        "prefix_cache_queries",
        "counter",
        "prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache.",
    ),
    ("prefix_cache_hits", "counter", "prefix_cache_hits", "Prompt tokens served from the prefix cache."),
    ("engine_restarts", "counter", "num_engine_restarts", "Times the engine core died and was restarted."),
]


def _as_mapping(stats: Any) -> Mapping[str, Any]:
    if is_dataclass(stats) and not isinstance(stats, type):
        return asdict(stats)
    return stats if isinstance(stats, Mapping) else vars(stats)


class EngineStatsCollector(Collector):
    """Reads ``stats()`` at scrape time; an engine that is absent or fails yields no samples, not an error."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            stats = _as_mapping(self._stats())
        except Exception:  # engine still loading or dead: /health says so; /metrics must still answer
            return
        for name, kind, key, help_text in _ENGINE_METRICS:
            if key not in stats:
                continue
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(PREFIX + name, help_text, value=float(stats[key]))

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no describe-time registration checks: samples depend on the engine


class ServerMetrics:
    def __init__(self, stats: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(stats))
        reg = self.registry
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of admitted requests.", registry=reg
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens delivered.", registry=reg
        )
        self.request_success = Counter(
            PREFIX + "request_success",
            "Finished choices by finish reason.",
            ["finished_reason"],
            registry=reg,
        )
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(finished_reason=reason)  # present at 0 before the first request
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time to first token.",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds", "Inter-token latency.", buckets=_ITL_BUCKETS, registry=reg
        )
        self.queue_time = Histogram(
            PREFIX + "request_queue_time_seconds",
            "Time waiting before first scheduled.",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "End-to-end request latency.",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )


class RequestTimer:
    """Latencies of one engine request (one prompt and its n choices) as its outputs reach the server;
    a no-op when metrics are off (metrics=None).

    TTFT: arrival to the request's first token. ITL: per choice, one observation per token after its
    first; a delta of k tokens (a consumer that fell behind) counts k observations of gap / k, so the
    sum is the decode time and the count is tokens - 1. Queue time comes from the engine. E2E: arrival
    to the last choice's finish, once per request. Success: one per choice, by finish reason.
    """

    def __init__(self, metrics: ServerMetrics | None, num_prompt_tokens: int, n: int = 1) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.last: dict[int, float] = {}  # choice index -> when its latest tokens arrived
        self.unfinished = n
        if metrics is not None:
            metrics.prompt_tokens.inc(num_prompt_tokens)

    def tokens(self, index: int, n: int) -> None:
        """Choice `index` received `n` new tokens now."""
        if self.metrics is None or n <= 0:
            return
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
            self.metrics.ttft.observe(now - self.arrival)
        last = self.last.get(index)
        if last is None:  # this choice's first tokens: all but the first arrived with no gap
            for _ in range(n - 1):
                self.metrics.itl.observe(0.0)
        else:
            for _ in range(n):
                self.metrics.itl.observe((now - last) / n)
        self.last[index] = now
        self.metrics.generation_tokens.inc(n)

    def queued(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.queue_time.observe(seconds)

    def finished(self, reason: str) -> None:
        """One choice finished; the request's e2e latency is observed when its last choice does."""
        if self.metrics is None:
            return
        self.metrics.request_success.labels(finished_reason=reason).inc()
        self.unfinished -= 1
        if self.unfinished == 0:
            self.metrics.e2e.observe(time.monotonic() - self.arrival)
