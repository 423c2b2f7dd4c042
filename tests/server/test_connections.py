"""What a slow or numerous client can hold: connections past the limit, a request that never finishes
arriving, a response nobody reads. A real uvicorn with our protocol on 127.0.0.1, raw sockets as clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from model.tokenizer import Tokenizer
from server import connections
from server.app import create_app
from server.connections import connection_budget, guarded_protocol
from tests.server.conftest import FakeEngine, fake_settings, free_port
from tests.server.test_api import MODEL

TIMEOUT = 0.5


@contextlib.asynccontextmanager
async def serve(app: Any, max_connections: int = 64, client_timeout: float = TIMEOUT) -> AsyncIterator[int]:
    """uvicorn as `python -m server` runs it; our app's own settings give the timeout (its body's too)."""
    port = free_port()
    settings = getattr(app.state, "settings", None)
    if settings is not None:
        client_timeout = settings.client_timeout
    closed = app.state.metrics.connections_closed if settings is not None else None
    protocol = guarded_protocol(max_connections, client_timeout, closed)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_config=None, lifespan="auto")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def fake_app(tokenizer: Tokenizer, **settings: Any) -> Any:
    settings = {"client_timeout": TIMEOUT, **settings}
    return create_app(fake_settings(**settings), engine=FakeEngine(tokenizer), tokenizer=tokenizer)


async def read_all(reader: asyncio.StreamReader, limit: float = 15.0) -> bytes:
    return await asyncio.wait_for(reader.read(), limit)  # to EOF: the server closed the connection


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def assert_openai_error(body: bytes, code: int) -> str:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return str(error["message"])


async def post(port: int, body: dict[str, Any]) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\n"
        + b"content-length: %d\r\n\r\n" % len(data)
        + data
    )
    status, _, payload = split(await read_all(reader))
    writer.close()
    return status, payload


def counted(app: Any, reason: str) -> float:
    value = app.state.metrics.registry.get_sample_value(
        "smollm2:http_connections_closed_total", {"reason": reason}
    )
    return float(value or 0.0)


COMPLETION = {"model": MODEL, "prompt": "Once", "max_tokens": 4}


async def test_connections_past_the_limit_get_a_quick_503_and_the_server_serves_again_after(
    tokenizer: Tokenizer,
) -> None:
    app = fake_app(tokenizer, client_timeout=30)
    async with serve(app, max_connections=3) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        reader, _writer = await asyncio.open_connection("127.0.0.1", port)  # kept: collected, it would close
        status, headers, body = split(await read_all(reader))
        assert status == 503 and time.monotonic() - started < 2
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
        assert "3 connections" in assert_openai_error(body, 503)
        assert counted(app, "limit") == 1
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.1)
        status, payload = await post(port, COMPLETION)
        assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] == 4


async def test_headers_that_do_not_arrive_in_time_get_a_408_and_a_silent_connection_is_just_closed(
    tokenizer: Tokenizer,
) -> None:
    app = fake_app(tokenizer)
    async with serve(app) as port:
        slow_reader, slow = await asyncio.open_connection("127.0.0.1", port)
        silent_reader, _silent = await asyncio.open_connection("127.0.0.1", port)
        slow.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")  # and never the rest
        started = time.monotonic()
        status, headers, body = split(await read_all(slow_reader))
        assert status == 408 and TIMEOUT * 0.9 <= time.monotonic() - started < TIMEOUT + 2
        assert "headers" in assert_openai_error(body, 408)
        assert await read_all(silent_reader) == b""  # closed like an idle keep-alive connection
        assert counted(app, "request_timeout") == 1
        status, _ = await post(port, COMPLETION)
        assert status == 200


async def test_a_body_that_does_not_arrive_in_time_gets_a_408_in_openai_shape_and_the_connection_closes(
    tokenizer: Tokenizer,
) -> None:
    app = fake_app(tokenizer)
    async with serve(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n")
        writer.write(b'content-length: 1000\r\n\r\n{"model": ')
        started = time.monotonic()
        status, headers, body = split(await read_all(reader))
        assert status == 408 and time.monotonic() - started < TIMEOUT + 2
        assert headers["connection"] == "close" and "x-request-id" in headers
        assert "did not arrive" in assert_openai_error(body, 408)


async def test_a_body_the_app_does_not_read_cannot_hold_the_connection(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown path is answered before its body is read; trickling that body must not keep the
    connection for ever."""
    monkeypatch.setattr(connections, "BODY_GRACE_S", 0.5)
    app = fake_app(tokenizer)
    async with serve(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /nowhere HTTP/1.1\r\nhost: x\r\ncontent-length: 60000\r\n\r\n")
        started = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(0.05)

        trickling = asyncio.create_task(trickle())
        response = await read_all(reader)
        trickling.cancel()
        assert split(response)[0] == 404
        assert time.monotonic() - started < TIMEOUT + 0.5 + 2
        assert counted(app, "request_timeout") == 1


async def test_a_client_that_stops_reading_a_stream_is_disconnected_and_its_request_ends() -> None:
    """A stream nobody reads would hold its task, its connection and what it buffered for ever."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    events: list[str] = []

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 65536
                # as a stream waiting on the engine does: sends to a gone client return without waiting
                await asyncio.sleep(0)
        finally:
            events.append("ended")

    async def route(request: Any) -> StreamingResponse:
        return StreamingResponse(endless())

    app = Starlette(routes=[Route("/", route)])
    async with serve(app) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        await asyncio.get_running_loop().sock_sendall(sock, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        started = time.monotonic()
        while "ended" not in events:  # the client reads nothing
            assert time.monotonic() - started < TIMEOUT + 5, "the stalled stream was not ended"
            await asyncio.sleep(0.05)
        sock.close()


async def test_a_reader_that_keeps_up_is_not_disconnected(tokenizer: Tokenizer) -> None:
    app = fake_app(tokenizer, client_timeout=0.2)
    async with serve(app) as port:
        body = {**COMPLETION, "max_tokens": 200, "ignore_eos": True, "stream": True, "logprobs": 5}
        status, payload = await post(port, body)
        assert status == 200 and b"data: [DONE]" in payload
        assert counted(app, "write_stall") == 0 and counted(app, "request_timeout") == 0


@pytest.mark.parametrize(
    ("fd_limit", "requested", "expected"),
    [(1024, 4096, 576), (65536, 4096, 4096), (2048, 100, 100), (64, 4096, 30), (256, 4096, 144)],
)
def test_the_connection_budget_leaves_descriptors_for_the_accept_burst_and_the_process(
    fd_limit: int, requested: int, expected: int
) -> None:
    """asyncio accepts up to `backlog` connections before refusing any: those and the process's own
    files must fit, or accept() fails with EMFILE and the server stops answering anyone."""
    limit, backlog = connection_budget(requested, fd_limit)
    assert limit == expected
    assert limit + backlog + connections.fd_reserve(fd_limit) <= fd_limit
    assert connections.fd_reserve(fd_limit) >= min(connections.FD_RESERVE, fd_limit // 4)


@pytest.mark.slow
def test_python_m_server_serves_with_these_bounds(tokenizer: Tokenizer, tmp_path: Path) -> None:
    from tests.server.test_sigterm import start_server, tiny_model_folder

    port = free_port()
    proc = start_server(
        tiny_model_folder(tokenizer, tmp_path / "tiny"), port, extra=("--client-timeout", "1")
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
            started = time.monotonic()
            response = b""
            while chunk := sock.recv(4096):
                response += chunk
        status, _, body = split(response)
        assert status == 408 and time.monotonic() - started < 5
        assert_openai_error(body, 408)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert 'smollm2:http_connections_closed_total{reason="request_timeout"} 1.0' in metrics
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
    assert "HTTP connections: at most" in output


async def test_a_client_still_sending_when_refused_at_the_cap_reads_the_503_not_a_reset(
    tokenizer: Tokenizer,
) -> None:
    """The 503 goes out as the connection opens; a client then sends its request and reads. Closed at
    once, the server's socket would answer the request with a reset, which most clients report instead
    of the 503 (httpx's async streaming requests did, 12 times in 16)."""
    app = fake_app(tokenizer, client_timeout=30)
    async with serve(app, max_connections=1) as port:
        held = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.1)  # the 503 has been written, the client has not read it yet
            data = json.dumps({**COMPLETION, "prompt": "x " * 30_000}).encode()
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                + b"content-length: %d\r\n\r\n" % len(data)
            )
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(data)  # as a client sends its body: a socket closed on it answers with a reset,
            await writer.drain()  # and this write fails (httpx then reports a ReadError, not the 503)
            status, headers, body = split(await read_all(reader, 5.0))
            assert status == 503 and "1 connections" in assert_openai_error(body, 503)
            writer.close()
        held[1].close()


async def test_a_client_that_stops_reading_a_model_stream_is_disconnected_before_it_ends(
    tokenizer: Tokenizer,
) -> None:
    """This stream (about 1.7 MB) fits in the send buffer Linux autotunes (up to 4 MiB): nothing would
    stall, and the request would run to its end for a client that reads none of it. The fixed send buffer
    fills, and the stalled client is disconnected after the client timeout."""
    engine = FakeEngine(tokenizer, max_waiting=64, delay=0.001)
    app = create_app(fake_settings(client_timeout=TIMEOUT), engine=engine, tokenizer=tokenizer)
    body = {**COMPLETION, "max_tokens": 250, "ignore_eos": True, "stream": True, "logprobs": 5, "n": 64}
    data = json.dumps(body).encode()
    async with serve(app) as port:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(
            sock,
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + b"content-length: %d\r\n\r\n" % len(data)
            + data,
        )
        started = time.monotonic()
        while not engine.submitted or engine.running:  # the client reads nothing
            assert time.monotonic() - started < 30, "the stream did not end"
            await asyncio.sleep(0.05)
        assert counted(app, "write_stall") == 1 and engine.aborted == [engine.submitted[0][0]]
        sock.close()
