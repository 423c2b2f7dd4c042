"""A lean HTTP/1.1 client for the load generator's streamed POSTs.

The load generator runs on the same cores as the server it measures, and every microsecond it spends
per streamed event is taken from that server (at one stream, from the gap between two tokens). So an
event costs here one buffered read and a line split: no per-event header objects, decoders or
transport layers. Only what the benchmark's own servers speak is handled: HTTP/1.1 over TCP to a
loopback address, responses framed by chunked encoding, Content-Length or the connection's end, and
server-sent events whose ``data:`` lines each fit on one line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

# A response head or one chunk-size line longer than this is not a server the benchmark loads.
_LINE_LIMIT = 1 << 20
_ERROR_DETAIL = 200  # characters of a non-200 body kept in the error


class HTTPStatusError(RuntimeError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


class _Body:
    """The body of one response, read as it arrives: chunked, of a known length, or to the end."""

    def __init__(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
        self._reader = reader
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._left = int(length) if length is not None and not self.chunked else None
        self.done = False

    async def read(self) -> bytes:
        """The next piece of the body; b"" once it has ended."""
        if self.done:
            return b""
        reader = self._reader
        if self.chunked:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the blank line
                    pass
                self.done = True
                return b""
            return (await reader.readexactly(size + 2))[:-2]
        if self._left is not None:
            if self._left == 0:
                self.done = True
                return b""
            piece = await reader.read(min(self._left, 1 << 16))
            if not piece:
                raise ConnectionError("the connection closed inside a response body")
            self._left -= len(piece)
            return piece
        piece = await reader.read(1 << 16)
        if not piece:
            self.done = True
        return piece

    async def read_all(self, limit: int) -> bytes:
        out = bytearray()
        while piece := await self.read():
            out += piece[: max(0, limit - len(out))]
        return bytes(out)


class StreamingClient:
    """POSTs JSON and yields the ``data:`` payloads of the server-sent events that come back, over
    keep-alive connections kept for the next request (one request per connection at a time)."""

    def __init__(self, base_url: str, connect_timeout_s: float = 10.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"only http:// URLs are loaded: {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self._authority = f"{self.host}:{self.port}"
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def __aenter__(self) -> StreamingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=_LINE_LIMIT), self._connect_timeout_s
        )

    async def events(self, path: str, payload: dict[str, Any]) -> AsyncIterator[str]:
        """The ``data:`` payloads of the response to ``POST path`` with ``payload`` as JSON, in order.

        Raises ``HTTPStatusError`` for a status other than 200 (with the start of its body). The
        connection goes back to the pool only when the whole response was read; a consumer that stops
        early or is cancelled closes it.
        """
        body = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._authority}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("ascii")
        reader, writer = await self._connection()
        reusable = False
        try:
            writer.write(head + body)
            status_line = await reader.readuntil(b"\r\n")
            status = int(status_line.split(b" ", 2)[1])
            headers = {}
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            response = _Body(reader, headers)
            keep_alive = headers.get("connection", "").lower() != "close" and (
                response.chunked or "content-length" in headers
            )
            if status != 200:
                detail = await response.read_all(_ERROR_DETAIL)
                reusable = keep_alive
                raise HTTPStatusError(status, detail.decode(errors="replace"))
            pending = b""
            while piece := await response.read():
                pending += piece
                if b"\n" not in piece:
                    continue
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.startswith(b"data:"):
                        yield line[5:].strip().decode()
            if pending.startswith(b"data:"):
                yield pending[5:].strip().decode()
            reusable = keep_alive
        finally:
            if reusable:
                self._idle.append((reader, writer))
            else:
                writer.close()
