"""How fast each request limit answers, and what it costs the server's memory (not in CI).

Starts the server on the real model, then sends each hostile request a few times: the status, the
parameter the error names, the median and worst latency, and the RSS growth of the server's process
tree across all of them. Every one must be a 4xx within ~100 ms and leave memory where it was.

    python -m bench.limits_bench --out bench/results
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.peers import SERVED_NAME
from bench.report import print_report
from bench.soak import start_server, tree_rss_mb, wait_idle

M = SERVED_NAME
HOSTILE: list[tuple[str, str, Any]] = [
    ("16,384 prompts, n=128", "/v1/completions", {"model": M, "prompt": [[1]] * 16384, "n": 128, "max_tokens": 1}),
    ("2,000 prompts x n=128 (queue)", "/v1/completions", {"model": M, "prompt": [[1]] * 2000, "n": 128}),
    ("20,000 stop strings", "/v1/completions", {"model": M, "prompt": "hi", "stop": [f"s{i}" for i in range(20000)]}),
    ("49k logit_bias entries", "/v1/completions", {"model": M, "prompt": "hi", "logit_bias": {str(i): 1 for i in range(49000)}}),
    ("5,000 stop_token_ids", "/v1/completions", {"model": M, "prompt": "hi", "stop_token_ids": list(range(5000))}),
    ("echo + logprobs 20, n=128", "/v1/completions", {"model": M, "prompt": "hi " * 500, "echo": True, "logprobs": 20, "n": 128}),
    ("chat n=128 x top_logprobs 20", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "hi"}], "n": 128, "logprobs": True, "top_logprobs": 20}),
    ("1 MB prompt", "/v1/completions", {"model": M, "prompt": "word " * 190_000}),
    ("1 MB /tokenize", "/tokenize", {"model": M, "prompt": "word " * 190_000}),
    ("1 MB chat message", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "word " * 190_000}]}),
    ("repetition_penalty 1e-300", "/v1/completions", {"model": M, "prompt": "hi", "repetition_penalty": 1e-300}),
]  # fmt: skip
SURROGATE = b'{"model": "\\ud800", "prompt": "hi"}'


async def measure(base: str, repeats: int) -> list[tuple[str, int, str, float, float]]:
    rows = []
    async with httpx.AsyncClient(base_url=base, timeout=60, trust_env=False) as client:
        cases: list[tuple[str, str, dict[str, Any]]] = [(n, p, {"json": b}) for n, p, b in HOSTILE]
        cases.append(("lone surrogate in model", "/v1/completions",
                      {"content": SURROGATE, "headers": {"content-type": "application/json"}}))  # fmt: skip
        for name, path, kwargs in cases:
            times, status, param = [], 0, ""
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = await client.post(path, **kwargs)
                times.append(time.perf_counter() - t0)
                status = r.status_code
                param = str((r.json().get("error") or {}).get("param")) if status >= 400 else ""
            rows.append((name, status, param, statistics.median(times) * 1e3, max(times) * 1e3))
    return rows


async def run(args: argparse.Namespace) -> str:
    server = start_server(args.server_args)
    try:
        await wait_idle(server.base_url)
        before = tree_rss_mb(server.pid)
        rows = await measure(server.base_url, args.repeats)
        after = tree_rss_mb(server.pid)
    finally:
        server.stop()
    lines = [
        f"# Request limits ({dt.datetime.now():%Y-%m-%d %H:%M}), {args.repeats} tries each",
        "",
        "| request | status | param | median ms | worst ms |",
        "|---|---|---|---|---|",
        *[f"| {n} | {s} | {p} | {m:.1f} | {w:.1f} |" for n, s, p, m, w in rows],
        "",
        f"RSS of the server's process tree: {before:.0f} MB before, {after:.0f} MB after ({after - before:+.0f} MB)",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.limits_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("server_args", nargs="*", help="arguments for `python -m server` (after --)")
    args = parser.parse_args()
    text = asyncio.run(run(args))
    print_report(text, args.out, "limits")


if __name__ == "__main__":
    main()
