"""Soak test: many clients for many minutes against one server, as real traffic is (not in CI).

Each client loops until the deadline: a completion or chat request, streamed or not, with a random
prompt (a window of a fixed text) and a random output length; ~20% of the streams hang up mid-way,
~5% of the requests are malformed on purpose. At the end it waits for the server to go idle and
reports what came back (ok / disconnected / 4xx / 5xx / transport errors), whether every usage block
was exact, the running sequences and KV blocks left, and the RSS growth of the server's whole process
tree from after warm-up to the end.

    python -m bench.soak --clients 64 --minutes 10 --out bench/results
    python -m bench.soak --clients 8 --minutes 1 -- --max-num-seqs 32      # args after -- go to the server

Only a server it starts itself on 127.0.0.1 is soaked; every loop is bounded by the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.peers import SERVED_NAME, RunningServer, free_port, wait_ready
from bench.report import print_report
from bench.serve_bench import _SOURCE_TEXT

WORDS = _SOURCE_TEXT.split()
MALFORMED = [
    b'{"model": "SmolLM2-135M-Instruct", "prompt": ',  # cut off
    b'{"model": "SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": -5}',
    b'{"model": "SmolLM2-135M-Instruct", "prompt": "x", "temperature": "hot"}',
    b'{"model": "no-such-model", "prompt": "x"}',
    b'{"model": "SmolLM2-135M-Instruct", "prompt": "\\ud800"}',
    b'{"model": "SmolLM2-135M-Instruct", "prompt": [[1]], "n": 100000}',
    b'{"model": "SmolLM2-135M-Instruct", "messages": []}',
    b"[1, 2, 3]",
]


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    usage_checked: int = 0
    usage_wrong: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def note(self, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if detail and outcome not in ("ok", "disconnected") and self.outcomes[outcome] <= 3:
            self.errors.append(f"{outcome}: {detail[:300]}")  # the first few of each kind


def tree_rss(pid: int) -> dict[int, float]:
    """RSS in MB of a process and each of its descendants, by pid."""
    sizes: dict[int, float] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        base = Path(f"/proc/{p}")
        try:
            for line in (base / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes[p] = int(line.split()[1]) / 1024
            for task in (base / "task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sizes


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants, in MB."""
    return sum(tree_rss(pid).values())


def metric_sum(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sum(s.value for s in family.samples if s.name == name)
    return float("nan")


async def one_request(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    if rng.random() < 0.05:
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        r = await client.post(
            path, content=rng.choice(MALFORMED), headers={"content-type": "application/json"}
        )
        tally.note("4xx" if 400 <= r.status_code < 500 else f"malformed-{r.status_code}", r.text)
        return
    start = rng.randrange(len(WORDS) - 200)
    text = " ".join(WORDS[start : start + rng.randint(3, 200)])
    max_tokens = rng.randint(1, 160)
    chat = rng.random() < 0.4
    n = rng.choice([1, 1, 1, 2])
    body: dict[str, Any] = {"model": SERVED_NAME, "max_tokens": max_tokens, "ignore_eos": True, "n": n,
                            "temperature": rng.choice([0.0, 0.7, 1.0])}  # fmt: skip
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = text
        path = "/v1/completions"
    if rng.random() < 0.6:
        await streamed(client, path, body, rng.random() < 0.2, rng, tally)
    else:
        r = await client.post(path, json=body)
        if r.status_code != 200:
            tally.note(classify(r.status_code), r.text)
            return
        tally.note("ok")
        check_usage(r.json()["usage"], n * max_tokens, tally)


async def streamed(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    hang_up: bool,
    rng: random.Random,
    tally: Tally,
) -> None:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    leave_after = rng.randint(1, 20)
    events = 0
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            tally.note(classify(r.status_code), (await r.aread()).decode(errors="replace"))
            return
        usage = None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events += 1
            chunk = json.loads(line[6:])
            if "error" in chunk:
                tally.note("stream-error", line)
                return
            usage = chunk.get("usage") or usage
            if hang_up and events >= leave_after:
                tally.note("disconnected")
                return  # leaving the block closes the connection mid-stream
    if usage is None:
        tally.note("no-usage", path)
        return
    tally.note("ok")
    check_usage(usage, body["n"] * body["max_tokens"], tally)


def check_usage(usage: dict[str, int], expected: int, tally: Tally) -> None:
    """ignore_eos and no stop strings: every choice runs to max_tokens, and the totals must add up."""
    tally.usage_checked += 1
    ok = usage["completion_tokens"] == expected and usage["total_tokens"] == (
        usage["prompt_tokens"] + usage["completion_tokens"]
    )
    if not ok:
        tally.usage_wrong.append(f"{usage}, expected {expected} completion tokens")


def classify(status: int) -> str:
    return "4xx" if 400 <= status < 500 else "5xx" if status >= 500 else str(status)


async def client_loop(base: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    # Patient clients: on a loaded machine a request may wait minutes, which is slow, not lost.
    async with httpx.AsyncClient(base_url=base, timeout=600, trust_env=False) as client:
        while time.monotonic() < deadline:
            try:
                await one_request(client, rng, tally)
            except httpx.HTTPError as exc:
                left = deadline - time.monotonic()
                tally.note(
                    "transport-error",
                    f"{exc!r} ({exc.request.method} {exc.request.url.path}, {left:.0f} s left)",
                )


async def wait_idle(base: str, timeout: float = 60.0) -> tuple[float, float]:
    """(running sequences, KV cache usage) once both are 0, or as they are after `timeout`."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=10, trust_env=False) as client:
        while True:
            text = (await client.get("/metrics")).text
            running = metric_sum(text, "smollm2:num_requests_running")
            usage = metric_sum(text, "smollm2:kv_cache_usage_perc")
            if (running == 0 and usage == 0) or time.monotonic() > deadline:
                return running, usage
            await asyncio.sleep(0.5)


async def warm_up(base: str, clients: int) -> None:
    """One round at full concurrency with the longest prompts and outputs the soak sends, on both
    endpoints and with n = 1 and 2, each prompt a different window of the text (the same prompt would
    hit the prefix cache and leave the large prefill shapes unseen), so the engine's largest step
    shapes are reached before the baseline RSS."""
    async with httpx.AsyncClient(base_url=base, timeout=600, trust_env=False) as client:

        def request(i: int) -> Any:
            start = (i * 97) % (len(WORDS) - 200)
            text = " ".join(WORDS[start : start + 200])
            body = {"model": SERVED_NAME, "max_tokens": 160, "ignore_eos": True, "n": 1 + i % 2}
            if i % 3 == 0:
                return client.post("/v1/chat/completions",
                                   json={**body, "messages": [{"role": "user", "content": text}]})  # fmt: skip
            return client.post("/v1/completions", json={**body, "prompt": text})

        await asyncio.gather(*(request(i) for i in range(clients)))


SETTLE_S = 3.0  # the engine returns freed heap to the OS after a second idle: measure after that


def start_server(server_args: list[str]) -> RunningServer:
    import os
    import subprocess

    port = free_port()
    argv = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *server_args]
    log_path = Path("/tmp") / f"smollm2-soak-{port}.log"
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ.copy())  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    server = RunningServer("ours", proc, base, SERVED_NAME, log_path)
    wait_ready(proc, base, "/health", 600, log_path)
    return server


def report(
    args: argparse.Namespace, tally: Tally, rss: tuple[float, float], idle: tuple[float, float]
) -> str:
    total = sum(tally.outcomes.values())
    counts = {k: tally.outcomes.get(k, 0) for k in ("ok", "disconnected", "4xx", "5xx", "stream-error",
                                                     "transport-error", "no-usage")}  # fmt: skip
    others = {k: v for k, v in tally.outcomes.items() if k not in counts}
    lines = [
        f"# Soak: {args.clients} clients, {args.minutes} min ({dt.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"server args: `{' '.join(args.server_args) or '(defaults)'}`",
        "",
        "| requests | " + " | ".join(counts) + " | usage exact | running after | KV usage after | "
        "RSS after warm-up | RSS at end | growth |",
        "|---" * (len(counts) + 7) + "|",
        f"| {total} | " + " | ".join(str(v) for v in counts.values())
        + f" | {tally.usage_checked - len(tally.usage_wrong)}/{tally.usage_checked} | {idle[0]:.0f} | "
        f"{idle[1]:.3f} | {rss[0]:.0f} MB | {rss[1]:.0f} MB | {rss[1] - rss[0]:+.0f} MB |",
    ]  # fmt: skip
    if others:
        lines += ["", f"other outcomes: {dict(others)}"]
    if tally.usage_wrong:
        lines += ["", "usage mismatches (first 10):", *[f"- {u}" for u in tally.usage_wrong[:10]]]
    if tally.errors:
        lines += ["", "first errors of each kind:", *[f"- {e}" for e in tally.errors]]
    return "\n".join(lines) + "\n"


async def sample_rss(pid: int, samples: list[tuple[float, dict[int, float]]], every: float = 30.0) -> None:
    while True:
        samples.append((time.monotonic(), tree_rss(pid)))
        await asyncio.sleep(every)


def rss_curve(samples: list[tuple[float, dict[int, float]]]) -> str:
    """RSS per process over the run: a leak grows steadily, an allocator's high-water mark levels off."""
    if len(samples) < 2:
        return ""
    t0 = samples[0][0]
    pids = sorted({p for _, sizes in samples for p in sizes})
    rows = [
        "| minute | " + " | ".join(f"pid {p}" for p in pids) + " | total |",
        "|---" * (len(pids) + 2) + "|",
    ]
    for t, sizes in samples:
        cells = " | ".join(f"{sizes.get(p, 0):.0f}" for p in pids)
        rows.append(f"| {(t - t0) / 60:.1f} | {cells} | {sum(sizes.values()):.0f} |")
    title = "RSS (MB) of each process of the server's tree, every 30 s and after going idle:"
    return "\n" + title + "\n\n" + "\n".join(rows) + "\n"


async def soak(args: argparse.Namespace) -> str:
    server = start_server(args.server_args)
    try:
        await warm_up(server.base_url, args.clients)
        await wait_idle(server.base_url)
        await asyncio.sleep(SETTLE_S)
        rss_before = tree_rss_mb(server.pid)
        deadline = time.monotonic() + args.minutes * 60
        tally = Tally()
        samples: list[tuple[float, dict[int, float]]] = []
        sampler = asyncio.create_task(sample_rss(server.pid, samples))
        await asyncio.gather(*(client_loop(server.base_url, i, deadline, tally) for i in range(args.clients)))
        sampler.cancel()
        idle = await wait_idle(server.base_url)
        await asyncio.sleep(SETTLE_S)
        rss_after = tree_rss_mb(server.pid)
        samples.append((time.monotonic(), tree_rss(server.pid)))
        return report(args, tally, (rss_before, rss_after), idle) + rss_curve(samples)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None, help="folder to save the table in")
    parser.add_argument("server_args", nargs="*", help="arguments for `python -m server` (after --)")
    args = parser.parse_args()
    if not 1 <= args.clients <= 1024 or not 0 < args.minutes <= 120:
        parser.error("--clients must be in [1, 1024] and --minutes in (0, 120]")
    text = asyncio.run(soak(args))
    print_report(text, args.out, "soak")


if __name__ == "__main__":
    main()
