"""Prometheus metrics, named like vLLM's with the prefix ``smollm2:``. Each app has its own registry.

Gauges and the engine's own counters are read from ``engine.stats()`` when Prometheus scrapes, so they
are never stale; per-request counters and histograms are observed by the serving layer as tokens flow.
Every metric but ``http_requests_total`` and ``http_connections_closed_total`` has a ``model_name`` label as well.

| Metric | Type | Labels | Meaning |
|---|---|---|---|
| `smollm2:num_requests_running` | gauge | | sequences in the running batch |
| `smollm2:num_requests_waiting` | gauge | | sequences waiting to be scheduled (incl. preempted) |
| `smollm2:kv_cache_usage_perc` | gauge | | fraction of KV cache blocks in use, 0..1 |
| `smollm2:num_preemptions_total` | counter | | sequences preempted (blocks freed, recomputed later) |
| `smollm2:prefix_cache_queries_total` | counter | | prompt tokens looked up in the prefix cache |
| `smollm2:prefix_cache_hits_total` | counter | | prompt tokens found in the prefix cache |
| `smollm2:engine_restarts_total` | counter | | times the engine core died and was restarted |
| `smollm2:spec_decode_num_draft_tokens_total` | counter | | n-gram draft tokens verified (`--speculative-ngram`) |
| `smollm2:spec_decode_num_accepted_tokens_total` | counter | | draft tokens the model agreed with (kept as output) |
| `smollm2:spec_decode_acceptance_rate` | gauge | | accepted / drafted tokens since start (0 before any draft) |
| `smollm2:prompt_tokens_total` | counter | | prompt tokens of admitted requests |
| `smollm2:generation_tokens_total` | counter | | tokens generated (and delivered) |
| `smollm2:request_success_total` | counter | `finished_reason` | finished choices by reason: stop, length, abort |
| `smollm2:time_to_first_token_seconds` | histogram | | arrival to first generated token, per request |
| `smollm2:inter_token_latency_seconds` | histogram | | time between two tokens of one choice |
| `smollm2:request_time_per_output_token_seconds` | histogram | | per choice: (last token - first token) / (tokens - 1) |
| `smollm2:request_queue_time_seconds` | histogram | | arrival in the engine to first scheduled |
| `smollm2:request_prefill_time_seconds` | histogram | | time to first token minus queue time, per request (measured at the server) |
| `smollm2:request_decode_time_seconds` | histogram | | first token to last token, per request (measured at the server) |
| `smollm2:e2e_request_latency_seconds` | histogram | | arrival to the last choice's finish, per request |
| `smollm2:request_prompt_tokens` | histogram | | prompt length, per request |
| `smollm2:request_generation_tokens` | histogram | | tokens generated, per request (all choices) |
| `smollm2:cache_config_info` | gauge | `block_size`, `num_blocks`, `max_model_len`, `max_num_seqs`, `max_num_batched_tokens`, `kv_cache_memory_bytes`, `enable_prefix_caching` | the KV cache's configuration; value 1 |
| `smollm2:http_requests_total` | counter | `handler`, `method`, `status` only | HTTP responses by route template (`unmatched` for unknown paths), method (`other` past the usual seven) and status code |
| `smollm2:http_connections_closed_total` | counter | `reason` only | connections the server closed: `limit` (over --max-connections, answered 503), `request_timeout` (headers or body slower than --client-timeout, 408), `write_stall` (a client that read nothing for --client-timeout) |
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.settings import DEFAULT_MODEL_NAME

PREFIX = "smollm2:"
CACHE_CONFIG_LABELS = (
    "block_size", "num_blocks", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "kv_cache_memory_bytes", "enable_prefix_caching",
)  # fmt: skip
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
    (
        "engine_compute_threads",
        "gauge",
        "compute_threads",
        "CPU threads the engine steps on now: fewer than its start-up count while other processes hold its "
        "CPUs (0 on GPU).",
    ),
    (
        "spec_decode_num_draft_tokens",
        "counter",
        "spec_decode_num_draft_tokens",
        "N-gram draft tokens verified by speculative decoding.",
    ),
    (
        "spec_decode_num_accepted_tokens",
        "counter",
        "spec_decode_num_accepted_tokens",
        "Draft tokens the model agreed with.",
    ),
]
_DRAFTED, _ACCEPTED = "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens"


def stats_mapping(stats: Any) -> Mapping[str, Any]:
    """EngineStats (or a test engine's dict or object) as a mapping."""
    if is_dataclass(stats) and not isinstance(stats, type):
        return asdict(stats)
    return stats if isinstance(stats, Mapping) else vars(stats)


class EngineStatsCollector(Collector):
    """Reads ``stats()`` at scrape time; an engine that is absent or fails yields no samples, not an error."""

    def __init__(self, stats: Callable[[], Any], model_name: str) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        try:
            stats = stats_mapping(self._stats())
        except Exception:  # engine still loading or dead: /health says so; /metrics must still answer
            return
        for name, kind, key, help_text in _ENGINE_METRICS:
            if key not in stats:
                continue
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            metric = family(PREFIX + name, help_text, labels=["model_name"])
            metric.add_metric([self._model_name], float(stats[key]))
            yield metric
        if _DRAFTED in stats and _ACCEPTED in stats:
            rate = GaugeMetricFamily(
                PREFIX + "spec_decode_acceptance_rate",
                "Accepted / drafted speculative tokens since start (0 before any draft).",
                labels=["model_name"],
            )
            drafted = stats[_DRAFTED]
            rate.add_metric([self._model_name], stats[_ACCEPTED] / drafted if drafted else 0.0)
            yield rate

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no describe-time registration checks: samples depend on the engine


class ServerMetrics:
    """The app's registry. Every engine and request metric carries `model_name` (vLLM's convention), so
    dashboards and alerts select a model even when one Prometheus scrapes several servers."""

    def __init__(self, stats: Callable[[], Any], model_name: str = DEFAULT_MODEL_NAME) -> None:
        self.registry = reg = CollectorRegistry()
        self.model_name = model_name
        reg.register(EngineStatsCollector(stats, model_name))
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = self._counter("generation_tokens", "Generated tokens delivered.")
        self._success = Counter(
            PREFIX + "request_success",
            "Finished choices by finish reason.",
            ["model_name", "finished_reason"],
            registry=reg,
        )
        for reason in ("stop", "length", "abort"):
            self.request_success(reason)  # present at 0 before the first request
        self.ttft = self._histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = self._histogram("inter_token_latency_seconds", "Inter-token latency.", _ITL_BUCKETS)
        self.tpot = self._histogram(
            "request_time_per_output_token_seconds",
            "Per choice: (last token - first token) / (tokens - 1).",
            _ITL_BUCKETS,
        )
        self.queue_time = self._histogram(
            "request_queue_time_seconds", "Time waiting before first scheduled.", _LATENCY_BUCKETS
        )
        self.prefill_time = self._histogram(
            "request_prefill_time_seconds", "Time to first token minus queue time.", _LATENCY_BUCKETS
        )
        self.decode_time = self._histogram(
            "request_decode_time_seconds", "First token to last token of a request.", _LATENCY_BUCKETS
        )
        # the dashboard's recent window: latencies, and token counts for its tokens/s
        self.recent_ttft = RecentSamples()
        self.recent_itl = RecentSamples()
        self.recent_prompt_tokens = RecentSamples(window=60.0)
        self.recent_generation_tokens = RecentSamples(window=60.0)
        self.e2e = self._histogram(
            "e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS
        )
        self.prompt_length = self._histogram(
            "request_prompt_tokens", "Prompt tokens per request.", _length_buckets()
        )
        self.generation_length = self._histogram(
            "request_generation_tokens", "Generated tokens per request (all choices).", _length_buckets()
        )
        self.http_requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests by route template, method and status code.",
            ["handler", "method", "status"],
            registry=reg,
        )
        self.connections_closed = Counter(
            PREFIX + "http_connections_closed",
            "HTTP connections the server closed to bound what clients hold, by reason.",
            ["reason"],
            registry=reg,
        )
        for reason in ("limit", "request_timeout", "write_stall"):
            self.connections_closed.labels(reason=reason)  # present at 0
        self._cache_config = Gauge(
            PREFIX + "cache_config_info", "KV cache configuration (value 1).", ["model_name", *CACHE_CONFIG_LABELS],
            registry=reg,
        )  # fmt: skip

    def _counter(self, name: str, help_text: str) -> Any:
        return Counter(PREFIX + name, help_text, ["model_name"], registry=self.registry).labels(
            self.model_name
        )

    def _histogram(self, name: str, help_text: str, buckets: Sequence[float]) -> Any:
        metric = Histogram(PREFIX + name, help_text, ["model_name"], buckets=buckets, registry=self.registry)
        return metric.labels(self.model_name)

    def generation_tokens_total(self) -> float:
        value = self.registry.get_sample_value(
            PREFIX + "generation_tokens_total", {"model_name": self.model_name}
        )
        return value or 0.0

    def request_success(self, reason: str) -> Any:
        return self._success.labels(model_name=self.model_name, finished_reason=reason)

    def set_cache_config(self, **config: Any) -> None:
        """`cache_config_info{block_size=..., num_blocks=...} 1`; a value not known is an empty label."""
        values = {key: "" if config.get(key) is None else str(config[key]) for key in CACHE_CONFIG_LABELS}
        self._cache_config.clear()
        self._cache_config.labels(model_name=self.model_name, **values).set(1)


def _length_buckets() -> list[float]:
    """1, 2, 5, 10, 20, 50 ... 20000 tokens."""
    return [m * 10**e for e in range(5) for m in (1, 2, 5)][:-1]


class HttpMetricsMiddleware:
    """Counts every HTTP response by route template (``/v1/completions``, not the raw path, so that
    scanners cannot blow up the label set; unknown paths are ``unmatched``), method and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's, to name a route answered before routing (a 413, a 429, a 401)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before any response: the server answers 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route") or self._match(scope)
            handler = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.http_requests.labels(handler, method, str(status)).inc()

    def _match(self, scope: Scope) -> BaseRoute | None:
        for route in self.routes:
            if route.matches(scope)[0] is not Match.NONE:
                return route
        return None


# The method label's values: HTTP lets a client send any token as a method, and each new one would be a new
# series (a scanner could grow the label set without bound); the rest count as "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class RecentSamples:
    """Observations of the last `window` seconds, for percentiles on the dashboard (Prometheus
    histograms only give bucket counts since start)."""

    def __init__(self, window: float = 300.0, maxlen: int = 50_000) -> None:
        self.window = window
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=maxlen)

    def add(self, value: float, now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, value))

    def _prune(self, now: float | None) -> float:
        now = time.monotonic() if now is None else now
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()
        return now

    def percentiles(self, quantiles: Sequence[float], now: float | None = None) -> list[float | None]:
        """Nearest-rank percentiles (None when there is no sample in the window)."""
        self._prune(now)
        values = sorted(v for _, v in self._samples)
        if not values:
            return [None for _ in quantiles]
        return [values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))] for q in quantiles]

    def rate(self, seconds: float, now: float | None = None) -> float:
        """Sum of the values added over the last `seconds` (at most the window), per second."""
        now = self._prune(now)
        return sum(v for t, v in self._samples if t >= now - seconds) / seconds


class RequestTimer:
    """Latencies of one engine request (one prompt and its n choices) as its outputs reach the server;
    a no-op when metrics are off (metrics=None).

    TTFT: arrival to the request's first token; prefill time is TTFT less the engine's queue time.
    ITL: per choice, one observation per token after its first; a delta of k tokens (a consumer that
    fell behind) counts k observations of gap / k, so the sum is the decode time and the count is
    tokens - 1. When the last choice finishes: E2E (arrival to then), decode time (first to last token),
    per choice the time per output token, and the prompt and generation lengths. Success: one per
    choice, by finish reason.
    """

    def __init__(self, metrics: ServerMetrics | None, num_prompt_tokens: int, n: int = 1) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.num_prompt_tokens = num_prompt_tokens
        self.queue_time = 0.0
        self.first_token: float | None = None
        self.first: dict[int, float] = {}  # choice index -> when its first tokens arrived
        self.last: dict[int, float] = {}  # choice index -> when its latest tokens arrived
        self.count: dict[int, int] = {}  # choice index -> tokens so far
        self.unfinished = n
        if metrics is not None:
            metrics.prompt_tokens.inc(num_prompt_tokens)
            metrics.recent_prompt_tokens.add(num_prompt_tokens)

    def tokens(self, index: int, n: int) -> None:
        """Choice `index` received `n` new tokens now."""
        if self.metrics is None or n <= 0:
            return
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
            self._first_token(now - self.arrival)
        last = self.last.get(index)
        if last is None:  # this choice's first tokens: all but the first arrived with no gap
            self.first[index] = now
            gaps = [0.0] * (n - 1)
        else:
            gaps = [(now - last) / n] * n
        for gap in gaps:
            self.metrics.itl.observe(gap)
            self.metrics.recent_itl.add(gap, now)
        self.last[index] = now
        self.count[index] = self.count.get(index, 0) + n
        self.metrics.generation_tokens.inc(n)
        self.metrics.recent_generation_tokens.add(n, now)

    def _first_token(self, ttft: float) -> None:
        assert self.metrics is not None
        self.metrics.ttft.observe(ttft)
        self.metrics.recent_ttft.add(ttft)
        self.metrics.prefill_time.observe(max(0.0, ttft - self.queue_time))

    def queued(self, seconds: float) -> None:
        """The engine's queue time; it comes with the request's first output, before its tokens."""
        self.queue_time = seconds
        if self.metrics is not None:
            self.metrics.queue_time.observe(seconds)

    def finished(self, reason: str) -> None:
        """One choice finished; the per-request histograms are observed when its last choice does."""
        if self.metrics is None:
            return
        self.metrics.request_success(reason).inc()
        self.unfinished -= 1
        if self.unfinished == 0:
            self._request_done(time.monotonic())

    def _request_done(self, now: float) -> None:
        assert self.metrics is not None
        m = self.metrics
        m.e2e.observe(now - self.arrival)
        m.prompt_length.observe(self.num_prompt_tokens)
        m.generation_length.observe(sum(self.count.values()))
        if self.first_token is not None:
            m.decode_time.observe(max(self.last.values()) - self.first_token)
        for index, count in self.count.items():
            if count >= 2:
                m.tpot.observe((self.last[index] - self.first[index]) / (count - 1))
