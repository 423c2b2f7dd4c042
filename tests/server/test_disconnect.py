"""Clients that hang up mid-request must not leave work behind: real uvicorn, real engine, tiny model."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import uvicorn

from model.tokenizer import Tokenizer
from server.app import create_app
from tests.server.conftest import free_port, tiny_engine, tiny_settings
from tests.server.test_api import MODEL
from tests.server.test_real_engine import wait_idle


async def post_and_hang_up(port: int, path: str, body: dict, wait_for: bytes | None, after: float) -> bytes:
    """Send a request on a raw socket, read until `wait_for` appears (or `after` seconds), then close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    writer.write(head.encode() + payload)
    await writer.drain()
    seen = b""
    try:
        async with asyncio.timeout(after):
            while wait_for is None or wait_for not in seen:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                seen += chunk
    except TimeoutError:
        pass
    writer.close()  # the client goes away with the request still running
    return seen


@pytest.mark.slow
async def test_burst_of_disconnects_frees_running_slots_and_kv(tokenizer: Tokenizer) -> None:
    port = free_port()
    settings = tiny_settings(port=port)
    engine = tiny_engine(tokenizer, settings)
    await engine.start()
    app = create_app(settings, engine=engine, tokenizer=tokenizer)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        long = {"model": MODEL, "max_tokens": 900, "ignore_eos": True}
        streams = [
            post_and_hang_up(
                port, "/v1/completions", {**long, "prompt": f"story {i}", "stream": True}, b"data:", 10
            )
            for i in range(6)
        ]
        chats = [
            post_and_hang_up(port, "/v1/chat/completions",
                             {**long, "messages": [{"role": "user", "content": f"hi {i}"}], "stream": True}, b"data:", 10)
            for i in range(3)
        ]  # fmt: skip
        plain = [
            post_and_hang_up(port, "/v1/completions", {**long, "prompt": f"p {i}"}, None, 0.6)
            for i in range(5)
        ]
        results = await asyncio.gather(*streams, *chats, *plain)
        assert all(b"data:" in r for r in results[:9]), [r[-300:] for r in results if b"data:" not in r]
        assert all(r == b"" for r in results[9:])  # the non-streamed ones had not finished

        stats = await wait_idle(engine)
        assert stats.num_finished.get("abort", 0) == 14, stats.num_finished
        assert stats.num_finished.get("length", 0) == 0
        async with httpx.AsyncClient() as c:
            metrics = (await c.get(f"http://127.0.0.1:{port}/metrics")).text
        model = 'model_name="SmolLM2-135M-Instruct"'
        assert f"smollm2:num_requests_running{{{model}}} 0.0" in metrics
        assert f"smollm2:kv_cache_usage_perc{{{model}}} 0.0" in metrics
        assert f'smollm2:request_success_total{{finished_reason="abort",{model}}} 14.0' in metrics
    finally:
        server.should_exit = True
        await serving
        await engine.shutdown(graceful=False)


@pytest.mark.slow
async def test_shutdown_lets_in_flight_requests_finish(tokenizer: Tokenizer) -> None:
    port = free_port()
    settings = tiny_settings(port=port)
    engine = tiny_engine(tokenizer, settings)
    await engine.start()
    app = create_app(settings, engine=engine, tokenizer=tokenizer)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=30)
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"model": MODEL, "prompt": "go", "max_tokens": 300, "ignore_eos": True}
            pending = asyncio.create_task(c.post(f"http://127.0.0.1:{port}/v1/completions", json=body))
            while engine.stats().num_running == 0:
                await asyncio.sleep(0.01)
            server.should_exit = True  # what SIGTERM does
            r = await pending
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 300
    finally:
        server.should_exit = True
        await serving
        await engine.shutdown(graceful=False)
