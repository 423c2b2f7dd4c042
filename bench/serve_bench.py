"""Serving benchmark: our server against peer servers, on the same model and the same load.

The load client works in the manner of vLLM's ``benchmark_serving``: N concurrent clients stream
``/v1/completions`` (fixed ~64-token prompts, 128 tokens out, temperature 0, ``ignore_eos``) and we
record, per request, the arrival time of every SSE chunk. From those come output tok/s, requests/s,
time to first token (TTFT) and inter-token latency (ITL, the gaps between chunks).

    python -m bench.serve_bench --out bench/results                 # ours + every peer, c=1,8,32,64
    python -m bench.serve_bench --quick --out bench/results         # ours + one peer, c=1,32
    python -m bench.serve_bench --peers ours --concurrency 1,8      # any subset

Only loopback URLs are accepted, and every run is bounded in requests and in time (a hard deadline).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import math
import os
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


@dataclass
class RequestResult:
    ok: bool
    start: float
    end: float
    ttft: float | None = None
    chunk_gaps: list[float] = field(default_factory=list)
    output_tokens: int = 0
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

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

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
            "cpu_percent": self.cpu_percent,
            "first_error": self.first_error,
        }


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _chunk_text_and_usage(event: dict[str, Any]) -> tuple[str, int | None]:
    if "error" in event:
        raise RuntimeError(f"error event: {json.dumps(event['error'])[:200]}")
    text = "".join(c.get("text") or "" for c in event.get("choices") or [])
    usage = event.get("usage") or {}
    return text, usage.get("completion_tokens")


async def stream_one(client: httpx.AsyncClient, cfg: LoadConfig, prompt: str) -> RequestResult:
    """One streaming completion; chunk arrival times give TTFT and the inter-token gaps."""
    body = {
        "model": cfg.model,
        "prompt": prompt,
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
        async with client.stream("POST", f"{cfg.base_url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:200]
                raise RuntimeError(f"HTTP {resp.status_code}: {detail}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                text, n = _chunk_text_and_usage(json.loads(data))
                usage_tokens = n if n is not None else usage_tokens
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
    limits = httpx.Limits(max_connections=cfg.concurrency + 4, max_keepalive_connections=cfg.concurrency)
    timeout = httpx.Timeout(cfg.deadline_s, connect=10.0)

    async def worker(wid: int, client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            in_flight[wid] = time.perf_counter()
            results.append(await stream_one(client, cfg, cfg.prompts[i % len(cfg.prompts)]))
            del in_flight[wid]

    t0 = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        tasks = [asyncio.create_task(worker(w, client)) for w in range(cfg.concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=cfg.deadline_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    end = time.perf_counter()
    for started in in_flight.values():
        results.append(RequestResult(ok=False, start=started, end=end, error="deadline reached"))
    return summarize(cfg.concurrency, results, t0)


def summarize(concurrency: int, results: list[RequestResult], t0: float) -> LoadResult:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
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


async def run_load_measured(cfg: LoadConfig, server_pid: int | None) -> LoadResult:
    """``run_load`` plus the server's CPU use over the run (percent of one core)."""
    cpu0 = _proc_tree_cpu_seconds(server_pid) if server_pid else None
    t0 = time.perf_counter()
    result = await run_load(cfg)
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

    @property
    def sampling(self) -> dict[str, float]:
        """The request's sampling fields: greedy by default, as vLLM's and SGLang's published runs."""
        return {"temperature": self.temperature} | ({"top_p": self.top_p} if self.top_p < 1.0 else {})

    def num_requests(self, concurrency: int) -> int:
        return max(self.min_requests, concurrency * self.requests_per_client)


Cell = LoadResult | str  # a measurement, or the reason a peer could not be measured


def _fmt(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def results_table(table: dict[str, dict[int, Cell]], concurrencies: list[int]) -> str:
    """Markdown: one row per peer and concurrency, with our throughput ratio to each peer."""
    head = "| server | c | tok/s | req/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | errors | CPU % | ours / this |"
    lines = [head, "|" + "---|" * 11]
    ours = table.get("ours", {})
    for peer, row in table.items():
        for c in concurrencies:
            cell = row.get(c)
            if cell is None:
                continue
            if isinstance(cell, str):  # the full reason is in the .json; keep the table a table
                reason = cell.replace("|", "/").replace("\n", " ")[:160]
                lines.append(f"| {peer} | {c} | {reason} |" + " |" * 8)
                continue
            d = cell.to_dict()
            mine = ours.get(c)
            ratio = (
                f"{mine.tok_per_s / cell.tok_per_s:.2f}x"
                if isinstance(mine, LoadResult) and cell.tok_per_s > 0 and peer != "ours"
                else "-"
            )
            lines.append(
                f"| {peer} | {c} | {d['tok_per_s']:.1f} | {d['req_per_s']:.2f} | {_fmt(d['ttft_p50_ms'])} | "
                f"{_fmt(d['ttft_p99_ms'])} | {_fmt(d['itl_p50_ms'])} | {_fmt(d['itl_p99_ms'])} | "
                f"{cell.errors} | {_fmt(cell.cpu_percent, 0)} | {ratio} |"
            )
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


def write_report(
    table: dict[str, dict[int, Cell]],
    plan: BenchPlan,
    out_dir: Path,
    notes: list[str],
    label: str = "",
    machine: Ceilings | None = None,
    on_gpu: bool = False,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = (f"{label}-" if label else "") + dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    md = out_dir / f"{stamp}.md"
    body = [
        f"# Serving benchmark {stamp}",
        "",
        f"Command: `{' '.join(['python -m bench.serve_bench', *sys.argv[1:]])}`",
        f"Load: ~64-token prompts, 128 tokens out, {_sampling_text(plan)}, ignore_eos; "
        f"requests = max({plan.min_requests}, {plan.requests_per_client} x c); deadline {plan.deadline_s:.0f} s "
        f"per run; times in ms; CPU % of one core for the server process tree.",
        "",
        results_table(table, plan.concurrencies),
        "",
        *[f"- {line}" for line in roofline_lines(table.get("ours", {}), machine, on_gpu) + notes],
    ]
    md.write_text("\n".join(body) + "\n")
    raw = {
        p: {c: (v.to_dict() if isinstance(v, LoadResult) else v) for c, v in r.items()}
        for p, r in table.items()
    }
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


async def bench_peer(name: str, plan: BenchPlan, log: Any, notes: list[str] | None = None) -> dict[int, Cell]:
    """Start one peer per concurrency (or once when its config does not depend on it) and measure."""
    from bench.peers import PeerUnavailable, get_peer

    row: dict[int, Cell] = {}
    peer = get_peer(name)
    try:
        peer.ensure_installed(log)
    except PeerUnavailable as exc:
        return dict.fromkeys(plan.concurrencies, f"unavailable: {exc}")
    server = None
    try:
        for c in plan.concurrencies:
            if server is None or peer.restart_per_concurrency:
                if server is not None:
                    server.stop()
                server = peer.start(c, log)
            cfg = LoadConfig(
                base_url=server.base_url,
                model=server.model_id,
                concurrency=c,
                num_requests=plan.num_requests(c),
                deadline_s=plan.deadline_s,
                extra_body=peer.extra_body(128),
                sampling=plan.sampling,
            )
            if plan.warmup:
                warm = {"num_requests": min(c, 8), "max_tokens": 16, "deadline_s": 60.0}
                await run_load(LoadConfig(**{**cfg.__dict__, **warm, "extra_body": peer.extra_body(16)}))
            log(f"[{name}] c={c}: {cfg.num_requests} requests, deadline {cfg.deadline_s:.0f} s")
            before = scrape_latency_sums(server.base_url)
            row[c] = await run_load_measured(cfg, server.pid)
            d = row[c].to_dict()  # type: ignore[union-attr]
            log(
                f"[{name}] c={c}: {d['tok_per_s']} tok/s, ITL p50 {_fmt(d['itl_p50_ms'])} ms, errors {d['errors']}"
            )
            if line := server_side_line(name, c, before, scrape_latency_sums(server.base_url), row[c]):
                log(f"[{name}] {line}")
                if notes is not None:
                    notes.append(line)
    except PeerUnavailable as exc:
        for c in plan.concurrencies:
            row.setdefault(c, f"unavailable: {exc}")
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
    ap.add_argument("--deadline", type=float, default=None, help="hard limit per run, seconds")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--label", default="", help="file name prefix of the report, e.g. gpu -> gpu-<date>.md")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0, greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, e.g. 0.95 (default 1, off)")
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace) -> BenchPlan:
    from bench.peers import quick_peer

    peers = args.peers.split(",") if args.peers else (["ours", quick_peer()] if args.quick else None)
    conc = [int(c) for c in args.concurrency.split(",")] if args.concurrency else None
    return BenchPlan(
        peers=peers or ["ours", "ours-json", "vllm", "llamacpp", "transformers"],
        concurrencies=conc or ([1, 32] if args.quick else [1, 8, 32, 64]),
        requests_per_client=args.requests_per_client or (1 if args.quick else 2),
        min_requests=4 if args.quick else 8,
        deadline_s=args.deadline or (60.0 if args.quick else 150.0),
        warmup=not args.no_warmup,
        temperature=args.temperature,
        top_p=args.top_p,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    log(
        f"plan: peers {plan.peers}, concurrency {plan.concurrencies}, deadline {plan.deadline_s:.0f} s per run"
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
    for name in plan.peers:  # one server up at a time
        table[name] = asyncio.run(bench_peer(name, plan, log, notes))
    label = args.label or ("quick" if args.quick else "")
    md = write_report(table, plan, args.out, notes=notes, label=label, machine=machine, on_gpu=on_gpu)
    print()
    print(results_table(table, plan.concurrencies))
    for line in roofline_lines(table.get("ours", {}), machine, on_gpu):
        print(line)
    print(f"\nwrote {md} (+ .json, .png)")
    # Peers may be unavailable; our own server failing to run or erroring fails the command.
    ours = table.get("ours", {}).values()
    return 1 if any(isinstance(v, str) or v.errors for v in ours) else 0


if __name__ == "__main__":
    raise SystemExit(main())
