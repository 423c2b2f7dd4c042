"""Serving benchmark: our server against peer servers, on the same model and the same load.

The load client works in the manner of vLLM's ``benchmark_serving``: N concurrent clients stream
``/v1/completions`` (fixed ~64-token prompts, 128 tokens out, temperature 0, ``ignore_eos``) and we
record, per request, the arrival time of every SSE chunk. From those come output tok/s, requests/s,
time to first token (TTFT) and inter-token latency (ITL, the gaps between chunks).

    python -m bench.serve_bench --out bench/results                 # ours + every peer, c=1,8,32,64
    python -m bench.serve_bench --quick --out bench/results         # ours + one peer, c=1,32
    python -m bench.serve_bench --peers ours --concurrency 1,8      # any subset

``--workload`` picks the load (default ``short``, the one above):

- ``long``: ~1,500-token prompts, each a different ordering of the text (so a prefix cache finds nothing
  to reuse), 128 tokens out; first a prefill probe at one stream: the same kind of prompt with
  ``max_tokens`` 1, ``--prefill-runs`` times in turn, giving TTFT p50 and prompt tokens/s.
- ``shared-prefix``: streamed ``/v1/chat/completions`` whose messages share one ~1,000-token system
  prompt, each with a short distinct user message, 128 tokens out: what the prefix cache saves.
- ``mixed``: short-prompt streams at the given concurrency while ``--long-requests`` ~1,500-token prompts
  (16 tokens out) arrive at ``--long-rate`` per second; the short streams' ITL and the long prompts' TTFT
  are reported apart, so "running streams are not starved" is a figure.

Prompt lengths are aimed at client-side (words x tokens per word), so every server gets the same text;
the tables give the prompt tokens the servers reported in their usage blocks.

Only loopback URLs are accepted, and every run is bounded in requests and in time (a hard deadline).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import itertools
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import torch

from bench.ceilings import Ceilings
from bench.ceilings import measure as measure_ceilings
from bench.sse_client import StreamingClient

# The figures (bf16 GEMM rate and weight bandwidth of a Zen 5 host; bench/ceilings.py measures ours).
DECODE_ROOFLINE_TOK_S_AT_32 = 2300.0
SINGLE_STREAM_FLOOR_MS = 5.0

# A fixed public-domain text (the opening of "A Tale of Two Cities"): prompts are windows of it,
# so every run and every server sees the same prompts, each with a different prefix.
_SOURCE_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
    "of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of "
    "Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair, we "
    "had everything before us, we had nothing before us, we were all going direct to Heaven, we were "
    "all going direct the other way - in short, the period was so far like the present period, that "
    "some of its noisiest authorities insisted on its being received, for good or for evil, in the "
    "superlative degree of comparison only. There were a king with a large jaw and a queen with a "
    "plain face, on the throne of England; there were a king with a large jaw and a queen with a fair "
    "face, on the throne of France. In both countries it was clearer than crystal to the lords of the "
    "State preserves of loaves and fishes, that things in general were settled for ever. It was the "
    "year of Our Lord one thousand seven hundred and seventy-five. Spiritual revelations were conceded "
    "to England at that favoured period, as at this."
)
PROMPT_WORDS = 48  # ~64 tokens with the SmolLM2 tokenizer
NUM_PROMPTS = 64
WORKLOADS = ("short", "long", "shared-prefix", "mixed")
LONG_PROMPT_TOKENS = 1500  # the prefill figures are for 1,500-token prompts
SYSTEM_PROMPT_TOKENS = 1000
LONG_MAX_TOKENS_IN_MIXED = 16  # long arrivals in the mixed load are mostly prefill, not more decode streams
# SmolLM2 tokens per word of the shuffled clauses below (tests measure it with the real tokenizer).
TOKENS_PER_WORD = 1.19
# The prefill figures: one 1,500-token prompt at >= 3,000 prompt tokens/s, TTFT <= 500 ms.
PREFILL_TARGET_TOK_S = 3000.0
PREFILL_TARGET_TTFT_MS = 500.0


def make_prompts(n: int = NUM_PROMPTS, words: int = PROMPT_WORDS) -> list[str]:
    """Deterministic prompts: ``words``-word windows of the fixed text at distinct offsets."""
    tokens = _SOURCE_TEXT.split()
    stride = max(1, len(tokens) // n) if n <= len(tokens) else 1
    prompts = []
    for i in range(n):
        start = (i * stride + i // len(tokens)) % len(tokens)
        window = [tokens[(start + j) % len(tokens)] for j in range(words)]
        prompts.append(" ".join(window))
    return prompts


def _clauses() -> list[str]:
    return [c.strip() for c in re.split(r"[,;.]", _SOURCE_TEXT) if c.strip()]


def _shuffled_text(rng: random.Random, words: int) -> str:
    """``words`` words of the text's clauses in the order ``rng`` draws, reshuffled at each pass."""
    clauses, out = _clauses(), []
    while len(out) < words:
        for clause in rng.sample(clauses, len(clauses)):
            out.extend(clause.split())
            out[-1] += rng.choice((",", ",", ";", "."))
    return " ".join(out[:words])


def make_long_prompt(index: int, tokens: int = LONG_PROMPT_TOKENS) -> str:
    """A ~``tokens``-token prompt, its own ordering of the text per ``index``. The numbered opening makes
    two prompts differ within their first few tokens, so no prefix cache can serve one from another."""
    head = f"Passage {index}:"
    body = _shuffled_text(random.Random(index), max(1, round(tokens / TOKENS_PER_WORD) - 2))
    return f"{head} {body}"


def make_long_prompts(n: int, start: int = 0, tokens: int = LONG_PROMPT_TOKENS) -> list[str]:
    return [make_long_prompt(i, tokens) for i in range(start, start + n)]


def make_system_prompt(tokens: int = SYSTEM_PROMPT_TOKENS) -> str:
    """One fixed ~``tokens``-token system prompt (instructions + reference text) for the chat load."""
    head = "You are a careful assistant. Answer from the reference text below.\n\nReference text:"
    words = max(1, round(tokens / TOKENS_PER_WORD) - len(head.split()))
    return f"{head} {_shuffled_text(random.Random('system'), words)}"


def make_user_messages(n: int, start: int = 0) -> list[str]:
    """Short user messages (~30 tokens), distinct per index: a question about a window of the text."""
    words = _SOURCE_TEXT.split()
    out = []
    for i in range(start, start + n):
        window = " ".join(words[(i * 7 + j) % len(words)] for j in range(12))
        out.append(f'Question {i}: which sentence of the reference text contains the words "{window}"?')
    return out


def require_loopback(url: str) -> None:
    """Refuse any URL whose host is not a loopback address: the benchmark only loads local servers."""
    host = urlsplit(url).hostname
    if host is None:
        raise ValueError(f"not a URL with a host: {url!r}")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing non-loopback benchmark target {url!r}: only 127.0.0.0/8, ::1, localhost")


@dataclass
class LoadConfig:
    base_url: str  # e.g. http://127.0.0.1:8000
    model: str
    concurrency: int
    num_requests: int
    max_tokens: int = 128
    deadline_s: float = 120.0  # hard limit for the whole run
    extra_body: dict[str, Any] = field(default_factory=dict)  # server-specific fields (ignore_eos...)
    sampling: dict[str, float] = field(default_factory=lambda: {"temperature": 0.0})  # the same for all
    prompts: list[str] = field(default_factory=make_prompts)
    # Set: chat requests (/v1/chat/completions) with this system message and each prompt as the user's.
    system_prompt: str | None = None


@dataclass
class RequestResult:
    ok: bool
    start: float
    end: float
    ttft: float | None = None
    chunk_gaps: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from the usage block, when the server sends one
    error: str = ""


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    completed: int
    errors: int
    output_tokens: int
    ttft_ms: list[float]
    itl_ms: list[float]
    first_error: str = ""
    cpu_percent: float | None = None  # server process tree; 100 = one core busy
    client_cpu_percent: float | None = None  # this load generator's own, on the same cores
    prompt_tokens: int = 0  # summed over the completed requests whose usage gave them
    prompt_counted: int = 0  # how many requests that was
    long: LoadResult | None = None  # the mixed load's long-prompt requests, summarized apart

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def prompt_tokens_per_req(self) -> float | None:
        return self.prompt_tokens / self.prompt_counted if self.prompt_counted else None

    @property
    def prompt_tok_per_s(self) -> float | None:
        """Prompt tokens of the completed requests / the run's wall time (None: no usage reported)."""
        if not self.prompt_counted or self.duration_s <= 0:
            return None
        return self.prompt_tokens / self.duration_s

    @property
    def req_per_s(self) -> float:
        return self.completed / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "completed": self.completed,
            "errors": self.errors,
            "output_tokens": self.output_tokens,
            "tok_per_s": round(self.tok_per_s, 2),
            "req_per_s": round(self.req_per_s, 3),
            "ttft_p50_ms": percentile(self.ttft_ms, 50),
            "ttft_p99_ms": percentile(self.ttft_ms, 99),
            "itl_p50_ms": percentile(self.itl_ms, 50),
            "itl_p99_ms": percentile(self.itl_ms, 99),
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_per_req": _round(self.prompt_tokens_per_req, 1),
            "prompt_tok_per_s": _round(self.prompt_tok_per_s, 1),
            "cpu_percent": self.cpu_percent,
            "client_cpu_percent": self.client_cpu_percent,
            "first_error": self.first_error,
        } | ({"long": self.long.to_dict()} if self.long is not None else {})


def _round(v: float | None, nd: int) -> float | None:
    return None if v is None else round(v, nd)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _chunk_text_and_usage(event: dict[str, Any]) -> tuple[str, int | None, int | None]:
    """(text, completion tokens, prompt tokens) of one SSE event, completions or chat chunks."""
    if "error" in event:
        raise RuntimeError(f"error event: {json.dumps(event['error'])[:200]}")
    text = "".join(
        c.get("text") or (c.get("delta") or {}).get("content") or "" for c in event.get("choices") or []
    )
    usage = event.get("usage") or {}
    return text, usage.get("completion_tokens"), usage.get("prompt_tokens")


async def stream_one(client: StreamingClient, cfg: LoadConfig, prompt: str) -> RequestResult:
    """One streaming completion; chunk arrival times give TTFT and the inter-token gaps."""
    if cfg.system_prompt is None:
        path, payload = "/v1/completions", {"prompt": prompt}
    else:
        messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": prompt}]
        path, payload = "/v1/chat/completions", {"messages": messages}
    body = {
        "model": cfg.model,
        **payload,
        "max_tokens": cfg.max_tokens,
        **cfg.sampling,
        "stream": True,
        **cfg.extra_body,
    }
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start, end=start)
    last: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    try:
        async with contextlib.aclosing(client.events(path, body)) as events:
            async for data in events:
                if data == "[DONE]":
                    continue  # read on to the body's end, so the connection can serve the next request
                text, n, n_prompt = _chunk_text_and_usage(json.loads(data))
                usage_tokens = n if n is not None else usage_tokens
                res.prompt_tokens = n_prompt if n_prompt is not None else res.prompt_tokens
                if not text:
                    continue  # a usage-only or empty chunk carries no token
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - start
                else:
                    res.chunk_gaps.append(now - last)
                last = now
                chunks += 1
        # Usage is exact; counting text chunks is the fallback (one token per chunk on all peers).
        res.output_tokens = usage_tokens if usage_tokens is not None else chunks
        res.ok = chunks > 0
        if not res.ok:
            res.error = "stream ended without any token"
    except Exception as exc:  # noqa: BLE001 - every failure is a counted error, not a crash
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    res.end = time.perf_counter()
    return res


async def _run_until(tasks: list[asyncio.Task[None]], deadline_s: float) -> None:
    """Wait for the tasks until the deadline, then cancel the rest."""
    _, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _unfinished(in_flight: dict[int, float], end: float) -> list[RequestResult]:
    """A failed result for each request still in flight at the deadline (its start time by key)."""
    return [RequestResult(ok=False, start=t, end=end, error="deadline reached") for t in in_flight.values()]


async def run_load(cfg: LoadConfig) -> LoadResult:
    """``num_requests`` completions from ``concurrency`` clients, stopped at ``deadline_s``.

    Requests still in flight at the deadline are cancelled and counted as errors.
    """
    require_loopback(cfg.base_url)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(cfg.num_requests):
        queue.put_nowait(i)
    results: list[RequestResult] = []
    in_flight: dict[int, float] = {}

    async def worker(wid: int, client: StreamingClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            in_flight[wid] = time.perf_counter()
            results.append(await stream_one(client, cfg, cfg.prompts[i % len(cfg.prompts)]))
            del in_flight[wid]

    t0 = time.perf_counter()
    async with StreamingClient(cfg.base_url) as client:
        tasks = [asyncio.create_task(worker(w, client)) for w in range(cfg.concurrency)]
        await _run_until(tasks, cfg.deadline_s)
    end = time.perf_counter()
    results += _unfinished(in_flight, end)
    return summarize(cfg.concurrency, results, t0)


async def run_mixed(short: LoadConfig, long: LoadConfig, rate: float) -> LoadResult:
    """``short.concurrency`` clients stream short prompts back to back while ``long.num_requests`` long
    prompts arrive, one every ``1 / rate`` seconds (the first after one interval, so the short streams
    are decoding by then, whatever the server's speed). The short clients start no new request once
    every long one has finished. The short streams' figures are the result; the long requests' are its
    ``long``. Requests in flight at ``short.deadline_s`` are cancelled and counted as errors.
    """
    require_loopback(short.base_url)
    require_loopback(long.base_url)
    short_results: list[RequestResult] = []
    long_results: list[RequestResult] = []
    in_flight: dict[int, float] = {}  # short clients by id
    long_in_flight: dict[int, float] = {}
    long_done = asyncio.Event()
    next_short = itertools.count()

    async def short_client(wid: int, client: StreamingClient) -> None:
        while not long_done.is_set():
            prompt = short.prompts[next(next_short) % len(short.prompts)]
            in_flight[wid] = time.perf_counter()
            res = await stream_one(client, short, prompt)
            short_results.append(res)
            del in_flight[wid]
            if not res.ok:
                break  # counted; a client that spun on a failing server would only count it again

    async def one_long(i: int, client: StreamingClient) -> None:
        long_in_flight[i] = time.perf_counter()
        long_results.append(await stream_one(client, long, long.prompts[i % len(long.prompts)]))
        del long_in_flight[i]

    async def arrivals(client: StreamingClient) -> None:
        sent = []
        for i in range(long.num_requests):
            await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - time.perf_counter()))
            sent.append(asyncio.create_task(one_long(i, client)))
        try:
            await asyncio.gather(*sent)
        finally:
            for t in sent:
                t.cancel()
            await asyncio.gather(*sent, return_exceptions=True)
        long_done.set()

    t0 = time.perf_counter()
    async with StreamingClient(short.base_url) as client:
        tasks = [asyncio.create_task(short_client(w, client)) for w in range(short.concurrency)]
        tasks.append(asyncio.create_task(arrivals(client)))
        await _run_until(tasks, short.deadline_s)
    end = time.perf_counter()
    short_results += _unfinished(in_flight, end)
    long_results += _unfinished(long_in_flight, end)
    result = summarize(short.concurrency, short_results, t0)
    result.long = summarize(short.concurrency, long_results, t0)
    return result


def summarize(concurrency: int, results: list[RequestResult], t0: float) -> LoadResult:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    # The window runs from the first send to the last completed request, as in benchmark_serving.
    end = max((r.end for r in results), default=t0)
    return LoadResult(
        concurrency=concurrency,
        duration_s=end - t0,
        completed=len(ok),
        errors=len(failed),
        output_tokens=sum(r.output_tokens for r in ok),
        ttft_ms=[r.ttft * 1000 for r in ok if r.ttft is not None],
        itl_ms=[g * 1000 for r in ok for g in r.chunk_gaps],
        first_error=failed[0].error if failed else "",
        prompt_tokens=sum(prompts),
        prompt_counted=len(prompts),
    )


# --- CPU use of the server process tree -------------------------------------------------------


def _proc_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its descendants (vLLM runs its engine in a child)."""
    try:
        import psutil  # optional

        root = psutil.Process(pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total
    except ImportError:
        return _proc_tree_cpu_seconds_procfs(pid)


def _procfs_stat(pid: int) -> tuple[int, float] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks  # ppid, utime+stime


def _proc_tree_cpu_seconds_procfs(pid: int) -> float:
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _procfs_stat(int(p)))}
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(p)
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        if p in stats:
            total += stats[p][1]
            stack.extend(children.get(p, []))
    return total


async def run_load_measured(
    cfg: LoadConfig, server_pid: int | None, long: LoadConfig | None = None, long_rate: float = 0.0
) -> LoadResult:
    """``run_load`` (``run_mixed`` given ``long``) plus the server's CPU use over the run (percent of one core)."""
    cpu0 = _proc_tree_cpu_seconds(server_pid) if server_pid else None
    t0, client0 = time.perf_counter(), time.process_time()
    result = await run_load(cfg) if long is None else await run_mixed(cfg, long, long_rate)
    result.client_cpu_percent = round(100.0 * (time.process_time() - client0) / (time.perf_counter() - t0), 1)
    if server_pid and cpu0 is not None:
        wall = time.perf_counter() - t0
        result.cpu_percent = 100.0 * (_proc_tree_cpu_seconds(server_pid) - cpu0) / wall if wall > 0 else None
    return result


# --- The benchmark driver ---------------------------------------------------------------------


@dataclass
class BenchPlan:
    peers: list[str]
    concurrencies: list[int]
    requests_per_client: int
    min_requests: int
    deadline_s: float
    warmup: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    workload: str = "short"
    long_rate: float = 0.5  # mixed: long prompts arriving per second
    long_requests: int = 8  # mixed: how many arrive
    prefill_runs: int = 5  # long: single-prompt prefill probes (max_tokens 1), 0 for none

    @property
    def context_per_slot(self) -> int:
        """Tokens one request holds (prompt + output): what a server that splits its context among
        slots (llama-server) must give each."""
        return 256 if self.workload == "short" else 2048

    @property
    def extra_slots(self) -> int:
        """Requests beyond the streams that can be in flight at once (the mixed load's long arrivals)."""
        return self.long_requests if self.workload == "mixed" else 0

    @property
    def sampling(self) -> dict[str, float]:
        """The request's sampling fields: greedy by default, as vLLM's and SGLang's published runs."""
        return {"temperature": self.temperature} | ({"top_p": self.top_p} if self.top_p < 1.0 else {})

    def num_requests(self, concurrency: int) -> int:
        return max(self.min_requests, concurrency * self.requests_per_client)


Cell = LoadResult | str  # a measurement, or the reason a peer could not be measured


def _fmt(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def results_table(
    table: dict[str, dict[int, Cell]], concurrencies: list[int], workload: str = "short"
) -> str:
    """Markdown: one row per peer and concurrency, with our throughput ratio to each peer. Prompt tok is
    the mean per request from the usage blocks; the mixed load's TTFT/ITL columns are the short streams',
    its long columns the long prompts' (count completed, mean prompt tokens, TTFT)."""
    cols = ["server", "c", "tok/s", "req/s", "prompt tok", "prompt tok/s", "TTFT p50", "TTFT p99"]
    cols += ["ITL p50", "ITL p99"]
    if workload == "mixed":
        cols += ["long n", "long prompt tok", "long TTFT p50", "long TTFT p99"]
    cols += ["errors", "CPU %", "ours / this"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    ours = table.get("ours", {})
    for peer, row in table.items():
        for c in concurrencies:
            cell = row.get(c)
            if cell is None:
                continue
            if isinstance(cell, str):  # the full reason is in the .json; keep the table a table
                reason = cell.replace("|", "/").replace("\n", " ")[:160]
                lines.append(f"| {peer} | {c} | {reason} |" + " |" * (len(cols) - 3))
                continue
            d = cell.to_dict()
            mine = ours.get(c)
            ratio = (
                f"{mine.tok_per_s / cell.tok_per_s:.2f}x"
                if isinstance(mine, LoadResult) and cell.tok_per_s > 0 and peer != "ours"
                else "-"
            )
            out = [peer, str(c), f"{d['tok_per_s']:.1f}", f"{d['req_per_s']:.2f}"]
            out += [_fmt(d["prompt_tokens_per_req"], 0), _fmt(d["prompt_tok_per_s"])]
            out += [_fmt(d[k]) for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")]
            errors = cell.errors
            if workload == "mixed":
                long = cell.long.to_dict() if cell.long is not None else {}
                out += [str(long.get("completed", 0)), _fmt(long.get("prompt_tokens_per_req"), 0)]
                out += [_fmt(long.get("ttft_p50_ms")), _fmt(long.get("ttft_p99_ms"))]
                errors += cell.long.errors if cell.long is not None else 0
            out += [str(errors), _fmt(cell.cpu_percent, 0), ratio]
            lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class RooflineFractions:
    """Our figures as fractions of the issue's ceilings and, when measured, of this machine's."""

    tok_per_s_at_32: float | None = None
    decode: float | None = None  # tok/s at 32 streams / the decode roofline
    decode_machine: float | None = None
    itl_p50_ms: float | None = None
    single_stream: float | None = None  # the single-stream floor / ITL p50 at 1 stream
    single_stream_machine: float | None = None


def roofline_fractions(ours: dict[int, Cell], machine: Ceilings | None = None) -> RooflineFractions:
    at32, at1 = ours.get(32), ours.get(1)
    tok = at32.tok_per_s if isinstance(at32, LoadResult) else None
    itl = percentile(at1.itl_ms, 50) if isinstance(at1, LoadResult) else None
    itl = itl or None  # no inter-token gaps measured
    return RooflineFractions(
        tok_per_s_at_32=tok,
        decode=None if tok is None else tok / DECODE_ROOFLINE_TOK_S_AT_32,
        decode_machine=None if tok is None or machine is None else tok / machine.decode_tok_s_at_32,
        itl_p50_ms=itl,
        single_stream=None if itl is None else SINGLE_STREAM_FLOOR_MS / itl,
        single_stream_machine=None
        if itl is None or machine is None
        else machine.single_stream_floor_ms / itl,
    )


def roofline_lines(ours: dict[int, Cell], machine: Ceilings | None = None, on_gpu: bool = False) -> list[str]:
    """roofline_fractions as report lines. The issue's figures are this project's CPU's: a server on a GPU
    gets a line saying so instead."""
    if on_gpu:
        return ["the decode roofline and single-stream floor are the CPU's: they do not apply to a GPU run"]
    f = roofline_fractions(ours, machine)
    out = []
    if f.tok_per_s_at_32 is not None and f.decode is not None:
        mine = f", {f.decode_machine:.0%} of this machine's" if f.decode_machine is not None else ""
        out.append(
            f"ours at 32 streams: {f.tok_per_s_at_32:.0f} tok/s = {f.decode:.0%} of the decode roofline "
            f"({DECODE_ROOFLINE_TOK_S_AT_32:.0f} tok/s){mine}"
        )
    if f.itl_p50_ms is not None and f.single_stream is not None:
        mine = (
            f", {f.single_stream_machine:.0%} of this machine's"
            if f.single_stream_machine is not None
            else ""
        )
        out.append(
            f"ours at 1 stream: ITL p50 {f.itl_p50_ms:.1f} ms = {f.single_stream:.0%} of the single-stream "
            f"floor ({SINGLE_STREAM_FLOOR_MS:.0f} ms/token){mine}"
        )
    if machine:
        out.append(machine.describe())
    return out


def _sampling_text(plan: BenchPlan) -> str:
    return ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in plan.sampling.items())


def workload_text(plan: BenchPlan) -> str:
    """The report's description of the prompts and outputs of ``plan.workload``."""
    short = "~64-token prompts, 128 tokens out"
    return {
        "short": short,
        "long": f"~{LONG_PROMPT_TOKENS:,}-token prompts, each a different ordering of the text (no shared "
        "prefix), 128 tokens out",
        "shared-prefix": f"streamed chat completions sharing one ~{SYSTEM_PROMPT_TOKENS:,}-token system prompt, "
        "a short distinct user message each, 128 tokens out",
        "mixed": f"short-prompt streams ({short}) at concurrency c while {plan.long_requests} "
        f"~{LONG_PROMPT_TOKENS:,}-token prompts ({LONG_MAX_TOKENS_IN_MIXED} tokens out) arrive at "
        f"{plan.long_rate:g}/s; tok/s, TTFT and ITL are the short streams', the long columns the long prompts'",
    }[plan.workload]


def prefill_figures(cell: LoadResult) -> tuple[float | None, float | None]:
    """(TTFT p50 ms, prompt tokens/s) of the single-prompt probe: the mean prompt over the median TTFT."""
    ttft = percentile(cell.ttft_ms, 50)
    per_req = cell.prompt_tokens_per_req
    return ttft, (per_req * 1000 / ttft if ttft and per_req else None)


def prefill_lines(prefill: dict[str, Cell], runs: int) -> list[str]:
    out = []
    for peer, cell in prefill.items():
        if isinstance(cell, str):
            out.append(f"{peer} prefill probe: {cell}")
            continue
        ttft, tok_s = prefill_figures(cell)
        out.append(
            f"{peer} prefill, one ~{LONG_PROMPT_TOKENS:,}-token prompt at a time, max_tokens 1 "
            f"({cell.completed} of {runs} ok, mean prompt {_fmt(cell.prompt_tokens_per_req, 0)} tokens): "
            f"TTFT p50 {_fmt(ttft)} ms, {_fmt(tok_s, 0)} prompt tok/s (the issue: <= "
            f"{PREFILL_TARGET_TTFT_MS:.0f} ms, >= {PREFILL_TARGET_TOK_S:,.0f} tok/s)"
        )
    return out


def write_report(
    table: dict[str, dict[int, Cell]],
    plan: BenchPlan,
    out_dir: Path,
    notes: list[str],
    label: str = "",
    machine: Ceilings | None = None,
    on_gpu: bool = False,
    prefill: dict[str, Cell] | None = None,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = (f"{label}-" if label else "") + dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    md = out_dir / f"{stamp}.md"
    title = "" if plan.workload == "short" or plan.workload in label else f", workload {plan.workload}"
    requests = (
        "the short clients loop until the long prompts are done"
        if plan.workload == "mixed"
        else f"requests = max({plan.min_requests}, {plan.requests_per_client} x c)"
    )
    roofline = roofline_lines(table.get("ours", {}), machine, on_gpu) if plan.workload == "short" else []
    body = [
        f"# Serving benchmark{title} {stamp}",
        "",
        f"Command: `{' '.join(['python -m bench.serve_bench', *sys.argv[1:]])}`",
        f"Load: {workload_text(plan)}, {_sampling_text(plan)}, ignore_eos; "
        f"{requests}; deadline {plan.deadline_s:.0f} s "
        f"per run; times in ms; CPU % of one core for the server process tree.",
        "",
        results_table(table, plan.concurrencies, plan.workload),
        "",
        *[f"- {line}" for line in prefill_lines(prefill or {}, plan.prefill_runs) + roofline + notes],
    ]
    md.write_text("\n".join(body) + "\n")
    raw: dict[str, dict[Any, Any]] = {
        p: {c: (v.to_dict() if isinstance(v, LoadResult) else v) for c, v in r.items()}
        for p, r in table.items()
    }
    for p, v in (prefill or {}).items():  # next to the peer's cells; the plot reads only the numeric keys
        raw.setdefault(p, {})["prefill"] = v.to_dict() if isinstance(v, LoadResult) else v
    (out_dir / f"{stamp}.json").write_text(json.dumps(raw, indent=1))
    try:
        from bench.plot import plot_results

        plot_results(table, out_dir / f"{stamp}.png")
    except Exception as exc:  # noqa: BLE001 - a missing plot must not lose the table
        print(f"plot skipped: {type(exc).__name__}: {exc}")
    return md


SERVER_SIDE = ("time_to_first_token_seconds", "request_queue_time_seconds", "inter_token_latency_seconds")


def scrape_latency_sums(base_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the server's own latency histograms (ours: `smollm2:`, vLLM: `vllm:` prefix), or {}
    when it exposes none. Two scrapes around a run give the server-side means over that run."""
    try:
        return parse_latency_sums(httpx.get(f"{base_url}/metrics", timeout=5.0, trust_env=False).text)
    except (httpx.HTTPError, ValueError):
        return {}


def parse_latency_sums(text: str) -> dict[str, tuple[float, float]]:
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, _, value = line.rpartition(" ")
        metric = key.split("{")[0].split(":")[-1]
        for name in SERVER_SIDE:
            for part, i in (("_sum", 0), ("_count", 1)):
                if metric == name + part:
                    out.setdefault(name, [0.0, 0.0])[i] += float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def server_side_line(
    name: str,
    c: int,
    before: dict[str, tuple[float, float]],
    after: dict[str, tuple[float, float]],
    result: Cell,
) -> str | None:
    """Server-side mean TTFT / queue time / ITL over one run next to the client's mean TTFT: a gap between
    the two is time spent outside the engine's view (HTTP, SSE, the load client)."""
    means = {}
    for key in SERVER_SIDE:
        if key in before and key in after and after[key][1] > before[key][1]:
            means[key] = 1000 * (after[key][0] - before[key][0]) / (after[key][1] - before[key][1])
    if not means or not isinstance(result, LoadResult) or not result.ttft_ms:
        return None
    parts = [
        f"{label} {means[k]:.1f} ms"
        for k, label in zip(SERVER_SIDE, ("TTFT", "queue", "ITL"), strict=True)
        if k in means
    ]
    client = sum(result.ttft_ms) / len(result.ttft_ms)
    return f"{name} c={c}: server-side means {', '.join(parts)}; the client's mean TTFT {client:.1f} ms"


def workload_configs(
    plan: BenchPlan, c: int, base_url: str, model_id: str, peer: Any, first: int
) -> tuple[LoadConfig, LoadConfig | None]:
    """The load of one run of ``plan.workload`` at ``c`` streams (and the mixed load's long arrivals).
    Long prompts and user messages are numbered from ``first``: each run gets prompts no earlier run sent,
    so the server's prefix cache holds none of them."""
    n = plan.num_requests(c)
    common = {
        "base_url": base_url,
        "model": model_id,
        "deadline_s": plan.deadline_s,
        "sampling": plan.sampling,
    }
    cfg = LoadConfig(concurrency=c, num_requests=n, extra_body=peer.extra_body(128), **common)  # type: ignore[arg-type]
    if plan.workload == "long":
        cfg.prompts = make_long_prompts(n, first)
    elif plan.workload == "shared-prefix":
        cfg.prompts, cfg.system_prompt = make_user_messages(n, first), make_system_prompt()
    elif plan.workload == "mixed":
        long = LoadConfig(
            concurrency=1,
            num_requests=plan.long_requests,
            max_tokens=LONG_MAX_TOKENS_IN_MIXED,
            extra_body=peer.extra_body(LONG_MAX_TOKENS_IN_MIXED),
            prompts=make_long_prompts(plan.long_requests, first),
            **common,  # type: ignore[arg-type]
        )
        return cfg, long
    return cfg, None


def prompts_used(plan: BenchPlan, c: int) -> int:
    """How many numbered prompts ``workload_configs`` takes for one run."""
    return plan.long_requests if plan.workload == "mixed" else plan.num_requests(c)


def _warm_config(cfg: LoadConfig, peer: Any, num: int, prompts: list[str] | None) -> LoadConfig:
    warm: dict[str, Any] = {"num_requests": num, "max_tokens": 16, "extra_body": peer.extra_body(16)}
    warm["deadline_s"] = 60.0 if prompts is None else 120.0  # long prompts take longer
    if prompts is not None:
        warm["prompts"] = prompts
    return LoadConfig(**{**cfg.__dict__, **warm})


def prefill_config(plan: BenchPlan, server: Any, peer: Any, first: int) -> LoadConfig:
    """The prefill probe: ``plan.prefill_runs`` long prompts, one at a time, ``max_tokens`` 1."""
    return LoadConfig(
        base_url=server.base_url,
        model=server.model_id,
        concurrency=1,
        num_requests=plan.prefill_runs,
        max_tokens=1,
        deadline_s=plan.deadline_s,
        extra_body=peer.extra_body(1),
        sampling=plan.sampling,
        prompts=make_long_prompts(plan.prefill_runs, first),
    )


async def bench_peer(
    name: str,
    plan: BenchPlan,
    log: Any,
    notes: list[str] | None = None,
    prefill: dict[str, Cell] | None = None,
) -> dict[int, Cell]:
    """Start one peer per concurrency (or once when its config does not depend on it) and measure.
    For the long workload, ``prefill`` gets the peer's single-prompt prefill probe."""
    from bench.peers import PeerUnavailable, get_peer

    row: dict[int, Cell] = {}
    peer = get_peer(name)
    peer.context_per_slot, peer.extra_slots = plan.context_per_slot, plan.extra_slots
    probe = prefill is not None and plan.workload == "long" and plan.prefill_runs > 0
    try:
        peer.ensure_installed(log)
    except PeerUnavailable as exc:
        if probe:
            prefill[name] = f"unavailable: {exc}"  # type: ignore[index]
        return dict.fromkeys(plan.concurrencies, f"unavailable: {exc}")
    # Every peer gets the same numbered prompts in the same order; warm-ups draw from far above.
    next_prompt = {"run": 0, "warm": 1_000_000}

    def take(kind: str, k: int) -> int:
        """The first of ``k`` prompt numbers no earlier request of this peer's server used."""
        first = next_prompt[kind]
        next_prompt[kind] += k
        return first

    server = None
    try:
        for c in plan.concurrencies:
            if server is None or peer.restart_per_concurrency:
                if server is not None:
                    server.stop()
                server = peer.start(c, log)
            if probe and name not in prefill:  # type: ignore[operator]
                probe_cfg = prefill_config(plan, server, peer, take("run", plan.prefill_runs))
                if plan.warmup:
                    await run_load(_warm_config(probe_cfg, peer, 2, make_long_prompts(2, take("warm", 2))))
                cell = await run_load_measured(probe_cfg, server.pid)
                prefill[name] = cell  # type: ignore[index]
                log(f"[{name}] {prefill_lines({name: cell}, plan.prefill_runs)[0]}")
            cfg, long = workload_configs(
                plan, c, server.base_url, server.model_id, peer, take("run", prompts_used(plan, c))
            )
            if plan.warmup:
                w = min(c, 8)
                fresh = None
                if plan.workload == "long":
                    fresh = make_long_prompts(w, take("warm", w))
                elif plan.workload == "shared-prefix":
                    fresh = make_user_messages(w, take("warm", w))
                await run_load(_warm_config(cfg, peer, w, fresh))
                if long is not None:  # one long prompt too, so the first measured one finds the server warm
                    await run_load(_warm_config(long, peer, 1, make_long_prompts(1, take("warm", 1))))
            what = (
                f"{cfg.num_requests} requests"
                if long is None
                else f"short streams while {long.num_requests} long prompts arrive at {plan.long_rate:g}/s"
            )
            log(f"[{name}] c={c}: {what}, deadline {cfg.deadline_s:.0f} s")
            before = scrape_latency_sums(server.base_url)
            if long is None:
                row[c] = await run_load_measured(cfg, server.pid)
            else:
                row[c] = await run_load_measured(cfg, server.pid, long=long, long_rate=plan.long_rate)
            d = row[c].to_dict()  # type: ignore[union-attr]
            log(
                f"[{name}] c={c}: {d['tok_per_s']} tok/s, prompt {_fmt(d['prompt_tok_per_s'])} tok/s, "
                f"TTFT p50 {_fmt(d['ttft_p50_ms'])} ms, ITL p50 {_fmt(d['itl_p50_ms'])} ms, "
                f"p99 {_fmt(d['itl_p99_ms'])} ms, errors {d['errors']}, CPU % server {_fmt(d['cpu_percent'])} "
                f"client {_fmt(d['client_cpu_percent'])}"
            )
            if "long" in d:
                lg = d["long"]
                log(
                    f"[{name}] c={c}: long prompts {lg['completed']} done, TTFT p50 {_fmt(lg['ttft_p50_ms'])} ms, "
                    f"p99 {_fmt(lg['ttft_p99_ms'])} ms, errors {lg['errors']}"
                )
            after = scrape_latency_sums(server.base_url)
            # The server's histograms pool the mixed load's long prompts with the short streams, so they
            # are no yardstick for the short streams' client-side TTFT.
            if long is None and (line := server_side_line(name, c, before, after, row[c])):
                log(f"[{name}] {line}")
                if notes is not None:
                    notes.append(line)
    except PeerUnavailable as exc:
        for c in plan.concurrencies:
            row.setdefault(c, f"unavailable: {exc}")
        if probe:
            prefill.setdefault(name, f"unavailable: {exc}")  # type: ignore[union-attr]
    finally:
        if server is not None:
            server.stop()
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--quick", action="store_true", help="ours + one peer, c=1,32, fewer requests (<10 min)")
    ap.add_argument(
        "--peers",
        default=None,
        help="comma list of ours,ours-json (a JSON schema on every request),ours-invariant "
        "(--batch-invariant),vllm,llamacpp,transformers",
    )
    ap.add_argument("--concurrency", default=None, help="comma list, default 1,8,32,64")
    ap.add_argument("--requests-per-client", type=int, default=None)
    ap.add_argument(
        "--min-requests", type=int, default=None, help="requests per run at least (default 8, quick 4)"
    )
    ap.add_argument("--deadline", type=float, default=None, help="hard limit per run, seconds")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--label", default="", help="file name prefix of the report, e.g. gpu -> gpu-<date>.md")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0, greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, e.g. 0.95 (default 1, off)")
    ap.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="short",
        help="short: ~64-token prompts (default); long: ~1,500-token distinct prompts, after a prefill "
        "probe; shared-prefix: chat with one ~1,000-token system prompt; mixed: short streams while long "
        "prompts arrive",
    )
    ap.add_argument("--long-rate", type=float, default=0.5, help="mixed: long prompts arriving per second")
    ap.add_argument("--long-requests", type=int, default=None, help="mixed: long prompts sent (default 8)")
    ap.add_argument(
        "--prefill-runs",
        type=int,
        default=5,
        help="long: single-prompt prefill probes, max_tokens 1 (0: none)",
    )
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace) -> BenchPlan:
    from bench.peers import quick_peer

    peers = args.peers.split(",") if args.peers else (["ours", quick_peer()] if args.quick else None)
    conc = [int(c) for c in args.concurrency.split(",")] if args.concurrency else None
    return BenchPlan(
        peers=peers or ["ours", "ours-json", "vllm", "llamacpp", "transformers"],
        concurrencies=conc or ([1, 32] if args.quick else [1, 8, 32, 64]),
        requests_per_client=args.requests_per_client or (1 if args.quick else 2),
        min_requests=args.min_requests or (4 if args.quick else 8),
        # Long prompts take longer to serve: more time before a run counts as stuck.
        deadline_s=args.deadline or (60.0 if args.quick else 150.0) * (1 if args.workload == "short" else 2),
        warmup=not args.no_warmup,
        temperature=args.temperature,
        top_p=args.top_p,
        workload=args.workload,
        long_rate=args.long_rate,
        long_requests=args.long_requests or (4 if args.quick else 8),
        prefill_runs=args.prefill_runs,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    log(
        f"plan: workload {plan.workload}, peers {plan.peers}, concurrency {plan.concurrencies}, "
        f"deadline {plan.deadline_s:.0f} s per run"
    )
    # This machine's GEMM rate and memory bandwidth, measured now while no server runs (a few seconds);
    # the CPU's, so not when our server runs on a GPU (SMOLLM2_DEVICE cuda, or auto with one present).
    device = os.environ.get("SMOLLM2_DEVICE", "auto")
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    machine = None if on_gpu else measure_ceilings()
    if machine:
        log(machine.describe())
    table: dict[str, dict[int, Cell]] = {}
    notes: list[str] = []
    prefill: dict[str, Cell] = {}
    for name in plan.peers:  # one server up at a time
        table[name] = asyncio.run(bench_peer(name, plan, log, notes, prefill))
    label = "-".join(
        part
        for part in (
            args.label or ("quick" if args.quick else ""),
            plan.workload if plan.workload != "short" else "",
        )
        if part
    )
    md = write_report(
        table, plan, args.out, notes=notes, label=label, machine=machine, on_gpu=on_gpu, prefill=prefill
    )
    print()
    print(results_table(table, plan.concurrencies, plan.workload))
    for line in prefill_lines(prefill, plan.prefill_runs):
        print(line)
    if plan.workload == "short":
        for line in roofline_lines(table.get("ours", {}), machine, on_gpu):
            print(line)
    print(f"\nwrote {md} (+ .json, .png)")
    # Peers may be unavailable; our own server failing to run or erroring fails the command.
    ours = [*table.get("ours", {}).values(), *([prefill["ours"]] if "ours" in prefill else [])]
    return 1 if any(isinstance(v, str) or v.errors or (v.long and v.long.errors) for v in ours) else 0


if __name__ == "__main__":
    raise SystemExit(main())
