"""HTTP framing and method handling at the edge: malformed requests, ambiguous body lengths, trailing
slashes, HEAD on GET routes, /ping. A real uvicorn with our protocol on 127.0.0.1, raw sockets as clients."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

from model.tokenizer import Tokenizer
from tests.server.test_connections import assert_openai_error, fake_app, read_all, serve, split

BAD_CHUNK = b"POST /nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"


async def exchange(port: int, request: bytes) -> bytes:
    """Send `request` and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await read_all(reader, 10.0)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        BAD_CHUNK,  # answered 404 by the app before its body is read, then the framing fails
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer no\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",  # a 401 the same way
        b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n",  # no Host
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    ],
    ids=["bad-chunk-404", "bad-chunk-401", "no-host", "two-lengths"],
)
async def test_a_malformed_request_gets_one_json_400_and_no_traceback(
    tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    caplog.set_level(logging.INFO)
    app = fake_app(tokenizer, api_key="sekrit")
    async with serve(app) as port:
        status, headers, body = split(await exchange(port, request_bytes))
        await asyncio.sleep(0.3)  # the app's own answer to the request, if any, has been tried by now
        assert status == 400 and headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        assert assert_openai_error(body, 400) == "Invalid HTTP request received."
        status, _ = await get(port, "/health")
        assert status == 200
    assert not [r for r in caplog.records if r.exc_info or "Exception in ASGI" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def get(port: int, path: str, method: str = "GET", host: str = "x") -> tuple[int, bytes]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"host": host}) as client:
        r = await client.request(method, path)
        return r.status_code, r.content


async def test_content_length_with_transfer_encoding_is_a_400_and_the_connection_closes(
    tokenizer: Tokenizer,
) -> None:
    """RFC 9112 6.1: a proxy in front may take the body's end from the other header (request
    smuggling): the request is refused, and what follows it on the connection is not answered."""
    app = fake_app(tokenizer)
    body = b'{"prompt": "hi"}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    request = (
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chunked)
        + chunked
        + b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    async with serve(app) as port:
        response = await exchange(port, request)
        status, headers, payload = split(response)
        assert status == 400 and headers["connection"] == "close"
        assert "Transfer-Encoding" in assert_openai_error(payload, 400)
        assert response.count(b"HTTP/1.1") == 1  # the pipelined GET was not answered


async def test_a_trailing_slash_is_an_unknown_path_not_a_redirect(tokenizer: Tokenizer) -> None:
    """A redirect answered before the key check, to a Location built from the client's Host."""
    protected = fake_app(tokenizer, api_key="sekrit")
    async with serve(protected) as port:
        for method, path in (("POST", "/v1/completions/"), ("GET", "/v1/models/"), ("GET", "/health/")):
            status, body = await get(port, path, method, host="evil.example")
            expected = 401 if path.startswith("/v1") else 404
            assert status == expected, (path, status, body)
            assert_openai_error(body, expected)
    async with serve(fake_app(tokenizer)) as port:
        status, body = await get(port, "/v1/completions/", "POST", host="evil.example")
        assert status == 404
        assert_openai_error(body, 404)


GET_ROUTES = ["/v1/models", "/v1/models/" + "{model}", "/metrics", "/version", "/dashboard", "/dashboard/data",
              "/health", "/ping"]  # fmt: skip


async def test_every_get_route_answers_head_with_no_body(tokenizer: Tokenizer) -> None:
    app = fake_app(tokenizer)
    model = app.state.settings.served_model_name
    async with serve(app) as port:
        for path in GET_ROUTES:
            path = path.format(model=model)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            status, headers, body = split(await read_all(reader))
            writer.close()
            assert status == 200 and body == b"", (path, status, body)
            get_status, get_body = await get(port, path)
            assert get_status == 200 and "content-length" in headers, path
            if path not in ("/metrics", "/dashboard/data"):  # those change from one request to the next
                assert headers["content-length"] == str(len(get_body)), path


async def test_ping_answers_as_health_does_without_the_key(tokenizer: Tokenizer) -> None:
    app: Any = fake_app(tokenizer, api_key="sekrit")
    async with serve(app) as port:
        for method in ("GET", "POST"):
            assert await get(port, "/ping", method) == await get(port, "/health") == (200, b"")
        app.state.engine.dead = True
        for method in ("GET", "POST"):
            status, body = await get(port, "/ping", method)
            assert (status, body) == await get(port, "/health")
            assert status == 503 and "not running" in assert_openai_error(body, 503)
