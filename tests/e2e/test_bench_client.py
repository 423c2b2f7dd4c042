"""The serving benchmark's load client against a tiny fake SSE server on 127.0.0.1 (no peers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bench.ceilings import Ceilings, measure
from bench.serve_bench import (
    LoadConfig,
    LoadResult,
    _proc_tree_cpu_seconds_procfs,
    make_plan,
    make_prompts,
    parse_args,
    parse_latency_sums,
    percentile,
    require_loopback,
    results_table,
    roofline_fractions,
    roofline_lines,
    run_load,
    run_mixed,
    server_side_line,
)
from bench.sse_client import HTTPStatusError, StreamingClient

TTFT_S = 0.3  # the fake server's delay before the first token
GAP_S = 0.05  # and between tokens
BODIES: list[dict] = []  # request bodies the fake server received


def fake_app() -> FastAPI:
    """Streams ``max_tokens`` one-token chunks; the prompt picks a behaviour (fail, hang, no-usage)."""
    app = FastAPI()

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        body = await request.json()
        BODIES.append(body)
        prompt, n = body["prompt"], int(body["max_tokens"])
        if prompt == "fail":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)

        async def events() -> AsyncIterator[str]:
            await asyncio.sleep(30 if prompt == "hang" else TTFT_S)
            for i in range(n):
                if i:
                    await asyncio.sleep(GAP_S)
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": f" t{i}"}]}) + "\n\n"
            if prompt != "no-usage":
                usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
                yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        """Chat chunks: a role-only delta first (no token), then one token per delta, then usage."""
        body = await request.json()
        BODIES.append(body)
        n = int(body["max_tokens"])

        async def events() -> AsyncIterator[str]:
            yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + "\n\n"
            await asyncio.sleep(TTFT_S)
            for i in range(n):
                if i:
                    await asyncio.sleep(GAP_S)
                yield (
                    "data: "
                    + json.dumps({"choices": [{"index": 0, "delta": {"content": f" t{i}"}}]})
                    + "\n\n"
                )
            usage = {"prompt_tokens": 1000, "completion_tokens": n, "total_tokens": n + 1000}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake_app(), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


def _cfg(url: str, prompts: list[str], **kw: object) -> LoadConfig:
    base: dict[str, object] = {"model": "fake", "concurrency": 2, "num_requests": 4, "max_tokens": 5}
    return LoadConfig(base_url=url, prompts=prompts, **{**base, **kw})  # type: ignore[arg-type]


async def test_statistics_from_chunk_arrival_times(fake_url: str) -> None:
    res = await run_load(_cfg(fake_url, ["ok"]))
    assert (res.completed, res.errors) == (4, 0)
    assert res.output_tokens == 4 * 5  # from usage
    assert len(res.ttft_ms) == 4 and len(res.itl_ms) == 4 * 4  # one gap between each pair of chunks
    # Lower bounds are exact (the server sleeps); upper bounds are loose: the machine may be busy.
    ttft, itl = percentile(res.ttft_ms, 50), percentile(res.itl_ms, 50)
    assert TTFT_S * 1000 <= ttft < TTFT_S * 1000 + 1000
    assert GAP_S * 1000 * 0.9 <= itl < GAP_S * 1000 + 250
    assert itl < ttft  # the gaps are between chunks, not from the request's start
    assert percentile(res.ttft_ms, 99) >= ttft
    # two rounds of two concurrent requests, each 0.3 + 4 * 0.05 s
    assert 2 * (TTFT_S + 4 * GAP_S) <= res.duration_s < 5.0
    assert res.tok_per_s == pytest.approx(20 / res.duration_s)


async def test_tokens_counted_from_chunks_without_usage(fake_url: str) -> None:
    res = await run_load(_cfg(fake_url, ["no-usage"], num_requests=2, max_tokens=7))
    assert (res.completed, res.output_tokens) == (2, 14)


async def test_errors_are_counted_not_raised(fake_url: str) -> None:
    res = await run_load(_cfg(fake_url, ["ok", "fail"], num_requests=6))
    assert (res.completed, res.errors) == (3, 3)
    assert "HTTP 500" in res.first_error
    assert res.output_tokens == 3 * 5


async def test_hard_deadline_cancels_in_flight_requests(fake_url: str) -> None:
    t0 = time.perf_counter()
    res = await run_load(_cfg(fake_url, ["hang"], concurrency=3, num_requests=10, deadline_s=1.0))
    assert time.perf_counter() - t0 < 3.0  # the server would have taken 30 s
    assert res.completed == 0
    assert res.errors == 3  # the three in flight; the queued seven were never sent
    assert res.first_error == "deadline reached"


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://192.168.1.5:80"])
async def test_non_loopback_targets_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="non-loopback"):
        await run_load(_cfg(url, ["ok"]))


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://127.1.2.3", "http://[::1]:9", "http://localhost:1"]
)
def test_loopback_targets_are_accepted(url: str) -> None:
    require_loopback(url)


def test_percentile_matches_numpy() -> None:
    xs = [float(v) for v in np.random.default_rng(0).exponential(10.0, size=101)]
    for q in (50, 90, 99):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None


def test_prompts_are_deterministic_and_distinct() -> None:
    a, b = make_prompts(), make_prompts()
    assert a == b and len(set(a)) == len(a) == 64
    assert all(len(p.split()) == 48 for p in a)


def test_cpu_seconds_of_a_process_tree_grow_with_work() -> None:
    before = _proc_tree_cpu_seconds_procfs(os.getpid())
    t_end = time.process_time() + 0.15
    while time.process_time() < t_end:
        pass
    assert _proc_tree_cpu_seconds_procfs(os.getpid()) - before >= 0.1


def test_table_reports_ratio_and_unavailable_peers() -> None:
    def cell(tokens: int) -> LoadResult:
        return LoadResult(1, 2.0, 4, 0, tokens, [10.0], [5.0])

    table = {
        "ours": {1: cell(200), 32: cell(800)},
        "vllm": {1: cell(100), 32: cell(200)},
        "llamacpp": {1: "unavailable: no | binary", 32: "unavailable: no | binary"},
    }
    text = results_table(table, [1, 32])
    assert "| vllm | 1 | 50.0 |" in text and "2.00x" in text
    assert "| vllm | 32 | 100.0 |" in text and "4.00x" in text
    assert "unavailable: no / binary" in text
    assert {line.count("|") for line in text.splitlines()} == {14}  # every row has the 13 columns


def test_roofline_fractions_of_the_issue_and_the_machine_ceilings() -> None:
    ours = {
        32: LoadResult(32, 2.0, 32, 0, 1500, [10.0], [50.0]),  # 750 tok/s
        1: LoadResult(1, 1.0, 1, 0, 100, [10.0], [20.0, 20.0, 20.0]),  # ITL p50 20 ms
    }
    machine = Ceilings(cpu="test cpu", threads=2, gemm_gflops_m32=405.0, read_gb_s=27.0)
    assert round(machine.decode_tok_s_at_32) == 1500 and round(machine.single_stream_floor_ms) == 10
    f = roofline_fractions(ours, machine)
    assert f.tok_per_s_at_32 == pytest.approx(750) and f.itl_p50_ms == pytest.approx(20)
    assert f.decode == pytest.approx(750 / 2300) and f.decode_machine == pytest.approx(0.5, rel=1e-2)
    assert f.single_stream == pytest.approx(0.25) and f.single_stream_machine == pytest.approx(0.5, rel=1e-2)
    bare = roofline_fractions(ours)  # no machine measured: the issue's figures only
    assert bare.decode == f.decode and bare.decode_machine is None and bare.single_stream_machine is None
    assert len(roofline_lines(ours, machine)) == 3 and len(roofline_lines(ours)) == 2
    assert len(roofline_lines(ours, on_gpu=True)) == 1  # the CPU's roofline is no yardstick for a GPU run


def test_machine_ceilings_are_measured() -> None:
    machine = measure()
    assert machine.threads >= 1 and machine.cpu
    assert machine.gemm_gflops_m32 > 1.0 and machine.read_gb_s > 0.5


def test_server_side_means_come_from_two_scrapes_of_the_latency_histograms() -> None:
    scrape = """# HELP smollm2:time_to_first_token_seconds arrival to first token
smollm2:time_to_first_token_seconds_bucket{le="0.1"} 3.0
smollm2:time_to_first_token_seconds_sum 0.5
smollm2:time_to_first_token_seconds_count 4.0
vllm:request_queue_time_seconds_sum{model_name="m"} 0.25
vllm:request_queue_time_seconds_count{model_name="m"} 4.0
smollm2:generation_tokens_total 400.0
"""
    before = parse_latency_sums(scrape)
    assert before == {"time_to_first_token_seconds": (0.5, 4.0), "request_queue_time_seconds": (0.25, 4.0)}
    after = {"time_to_first_token_seconds": (2.5, 14.0), "request_queue_time_seconds": (0.25, 4.0)}
    result = LoadResult(8, 2.0, 10, 0, 1280, [300.0, 500.0], [10.0])
    line = server_side_line("ours", 8, before, after, result)
    assert line == "ours c=8: server-side means TTFT 200.0 ms; the client's mean TTFT 400.0 ms"
    assert server_side_line("ours", 8, before, before, result) is None  # nothing observed in between


async def test_sampling_fields_reach_the_server_and_default_to_greedy(fake_url: str) -> None:
    assert make_plan(parse_args([])).sampling == {"temperature": 0.0}
    plan = make_plan(parse_args(["--temperature", "1", "--top-p", "0.95"]))
    assert plan.sampling == {"temperature": 1.0, "top_p": 0.95}
    BODIES.clear()
    res = await run_load(_cfg(fake_url, ["ok"], num_requests=2, sampling=plan.sampling))
    assert res.completed == 2
    assert [(b["temperature"], b["top_p"], b["stream"]) for b in BODIES] == [(1.0, 0.95, True)] * 2


async def test_chat_requests_carry_the_system_prompt(fake_url: str) -> None:
    BODIES.clear()
    res = await run_load(_cfg(fake_url, ["q1", "q2"], num_requests=2, system_prompt="SYS"))
    assert (res.completed, res.errors, res.output_tokens) == (2, 0, 10)
    assert res.ttft_ms and min(res.ttft_ms) >= TTFT_S * 1000  # the role-only chunk is not a token
    assert (res.prompt_tokens, res.prompt_counted) == (2000, 2)
    assert sorted(b["messages"][1]["content"] for b in BODIES) == ["q1", "q2"]
    assert all(b["messages"][0] == {"role": "system", "content": "SYS"} and "prompt" not in b for b in BODIES)


async def test_mixed_load_reports_short_streams_and_long_arrivals_apart(fake_url: str) -> None:
    BODIES.clear()
    short = _cfg(fake_url, ["short"], concurrency=2, num_requests=0, max_tokens=5)
    long = _cfg(fake_url, ["long-a", "long-b"], concurrency=1, num_requests=2, max_tokens=2)
    t0 = time.perf_counter()
    res = await run_mixed(short, long, rate=10.0)  # arrivals at 0.1 and 0.2 s
    assert time.perf_counter() - t0 < 5.0
    assert res.long is not None and (res.long.completed, res.long.errors) == (2, 0)
    assert res.long.output_tokens == 4 and res.long.prompt_tokens == 6
    assert res.completed >= 2 and res.errors == 0 and res.output_tokens == 5 * res.completed
    assert len(res.itl_ms) == 4 * res.completed  # only the short streams' gaps
    assert sorted(b["prompt"] for b in BODIES if b["prompt"].startswith("long")) == ["long-a", "long-b"]
    assert res.to_dict()["long"]["completed"] == 2


async def test_the_load_client_reuses_a_connection_after_a_whole_response(fake_url: str) -> None:
    body = {"model": "fake", "prompt": "ok", "max_tokens": 3, "stream": True}
    async with StreamingClient(fake_url) as client:
        for _ in range(3):  # an error body read whole leaves the connection usable too
            events = [e async for e in client.events("/v1/completions", body)]
            assert events[-1] == "[DONE]" and len(events) == 3 + 2  # 3 tokens, usage, [DONE]
            assert [json.loads(e)["choices"][0]["text"] for e in events[:3]] == [" t0", " t1", " t2"]
            with pytest.raises(HTTPStatusError, match="HTTP 500.*boom") as err:
                async for _ in client.events("/v1/completions", {**body, "prompt": "fail"}):
                    pass
            assert err.value.status == 500
        assert len(client._idle) == 1  # every request went over the one connection
        # a consumer that stops early closes its connection rather than leave a half-read response
        async with contextlib.aclosing(client.events("/v1/completions", body)) as events:
            async for _ in events:
                break
        assert len(client._idle) == 0
