"""Bounds on what an HTTP client can hold by being slow or many: connections, request time, stalled reads.

uvicorn's h11 protocol waits without limit for a connection's request headers and for a client to take
the response's bytes, and accepts connections until the process runs out of file descriptors (at which
point it accepts nothing, not even /health, and logs a traceback per retry). `guarded_protocol` returns
uvicorn's protocol with three bounds, each counted in
``smollm2:http_connections_closed_total{reason}``:

- ``limit``: past `max_connections` open connections, a new one is answered 503 and closed at once;
- ``request_timeout``: a request's headers must arrive within `client_timeout` seconds of the
  connection being ready for it (opened, or its previous response sent): else 408 and close. Its body
  is timed by `server.app.BodyLimitMiddleware` (a 408 in OpenAI's shape); a body the app does not
  read (an error answered early) gets a few seconds more here, then the connection is closed;
- ``write_stall``: a client that takes none of the response for `client_timeout` seconds while the send
  buffer is full is disconnected, which aborts its request like any disconnect. The socket's send buffer
  is fixed at SEND_BUFFER_BYTES so that it does fill.

A request h11 cannot parse (a bad chunk size, two differing Content-Lengths, no Host) is answered 400 in
OpenAI's shape, and the app's own answer to it, if it is still running, is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.protocol import APIError

log = logging.getLogger("server")

FD_RESERVE = 256  # descriptors kept for the process's own files, pipes and the engine's sockets
# under a small open-file limit, a quarter of it (the idle server holds ~15), but not less than this
MIN_FD_RESERVE = 24
MIN_FDS = 64  # a lower open-file limit cannot serve: the start stops and says so
FD_TARGET = 65536  # the soft limit is raised this far, when the hard limit allows
DEFAULT_BACKLOG = 2048  # uvicorn's
BODY_GRACE_S = 5.0  # the app answers a slow body's 408 first; this backstop only closes
REFUSED_LINGER_S = 1.0  # a connection refused at the cap is closed after this, or when the client closes
REFUSED_LINGER_MAX = 64  # at most this many at once; past it, refused connections close at once
WARN_EVERY_S = 10.0
# Linux grows an autotuned send buffer up to tcp_wmem's maximum (4 MiB), more than most streams: a client
# that stops reading would never fill it, so the write-stall timer would never start. A fixed size turns
# autotuning off; the kernel doubles it for its bookkeeping. 512 KiB in flight still fills a 1 Gb/s link
# at 4 ms of round trip, or 100 Mb/s at 40 ms.
SEND_BUFFER_BYTES = 256 * 1024


def raise_fd_limit(target: int = FD_TARGET) -> int:
    """Raise the soft limit on open files toward the hard one (as vLLM does); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return FD_TARGET if soft == resource.RLIM_INFINITY else soft


def fd_reserve(fd_limit: int) -> int:
    return min(FD_RESERVE, max(MIN_FD_RESERVE, fd_limit // 4))


def connection_budget(requested: int, fd_limit: int) -> tuple[int, int]:
    """(connections held at once, listen backlog) within the process's descriptors. asyncio accepts up to
    `backlog` connections in one loop turn before any of them is refused, so those need descriptors too.
    Under a small limit (a container's `ulimit -n 64`) the reserve and the backlog shrink with it, so that
    there are still connections to serve, /health's among them."""
    reserve = fd_reserve(fd_limit)
    backlog = min(DEFAULT_BACKLOG, max(1, (fd_limit - reserve) // 4))
    return max(1, min(requested, fd_limit - reserve - backlog)), backlog


def _raw_error(error: APIError, extra_headers: str = "") -> bytes:
    """A whole HTTP/1.1 error response, written outside h11 on a connection about to close."""
    body = error.to_model().model_dump_json().encode()
    head = (
        f"HTTP/1.1 {error.status_code} {HTTPStatus(error.status_code).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"{extra_headers}"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class _RateLimitedWarning:
    """At most one log line per `every` seconds per kind, with the count of those not logged."""

    def __init__(self, every: float = WARN_EVERY_S) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def __call__(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.every) < self.every:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        skipped = self._skipped.pop(kind, 0)
        self._last[kind] = now
        suffix = f" ({skipped} more since the last such line)" if skipped else ""
        log.warning(message + suffix, *args)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the bounds above; `guarded_protocol` sets the class attributes."""

    max_connections = 4096
    client_timeout = 30.0  # 0: no request or write-stall timeouts
    closed: Any = None  # a labelled prometheus Counter (`reason`), or None
    warn = _RateLimitedWarning()
    lingering = 0  # refused connections being closed lingering, across this class's instances

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._request_timer: asyncio.TimerHandle | None = None
        self._request_phase: str | None = None  # "headers" or "body" while the timer runs
        self._bytes_in_phase = False
        self._write_timer: asyncio.TimerHandle | None = None
        self._refused = False  # answered 503 at the connection cap: its input is read and dropped
        self._linger: asyncio.TimerHandle | None = None

    # ---- connection cap ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            except OSError:
                pass  # a transport without a TCP socket: its own buffering applies
        if len(self.connections) > self.max_connections:
            self._count("limit")
            self.warn(
                "limit", "refusing connections: %d open, the limit (--max-connections)", self.max_connections
            )
            error = APIError(
                503,
                f"The server has {self.max_connections} connections open, its limit; retry shortly.",
                "service_unavailable",
            )
            self.transport.write(_raw_error(error, "retry-after: 1\r\n"))
            self._refuse()
            return
        self._follow_request()

    def _refuse(self) -> None:
        """After the 503: end our side, and read (and drop) what the client sends until it closes or
        REFUSED_LINGER_S pass. Closed with its request unread, the socket would answer that request with a
        reset, which clients that are still sending report instead of the 503 (a lingering close, as
        nginx's)."""
        self._refused = True
        cls = type(self)
        if cls.lingering >= REFUSED_LINGER_MAX:  # a flood: descriptors matter more than its clients' errors
            self.transport.close()
            return
        try:
            self.transport.write_eof()
        except (NotImplementedError, RuntimeError, OSError):
            self.transport.close()
            return
        cls.lingering += 1
        self._linger = self.loop.call_later(REFUSED_LINGER_S, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_request_timer()
        self._cancel_write_timer()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            type(self).lingering -= 1
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if self._refused:  # the client has read the 503 and closed its side
            self.transport.close()

    # ---- malformed request ----

    def send_400_response(self, msg: str) -> None:
        """h11 found the request malformed. uvicorn's own answer is text/plain, and when the app is
        answering the same request (an error sent before reading the body) either uvicorn's write or the
        app's later send fails on h11's state, each with a traceback in the log. Here one 400 in OpenAI's
        shape goes out if no response has begun (else the connection just closes), and the request ends
        for the app as a disconnect: its sends are dropped."""
        if not self.transport.is_closing() and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.write(_raw_error(APIError(400, msg)))
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    # ---- request timeout ----

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._bytes_in_phase = True
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next pipelined request
        self._follow_request()

    def _follow_request(self) -> None:
        """Keep the timer in step with h11's view of the client: waiting for headers, sending a body, done."""
        if not self.client_timeout or self.transport is None or self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._request_phase != "headers":
                self._arm_request_timer("headers", self.client_timeout)
        elif state is h11.SEND_BODY:
            if self._request_phase != "body":
                self._arm_request_timer("body", self.client_timeout + BODY_GRACE_S)
        else:
            self._cancel_request_timer()

    def _arm_request_timer(self, phase: str, delay: float) -> None:
        self._cancel_request_timer()
        self._request_phase = phase
        if phase == "headers":
            self._bytes_in_phase = bool(self.conn.trailing_data[0])  # a pipelined request's start
        self._request_timer = self.loop.call_later(delay, self._on_request_timeout)

    def _cancel_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        self._request_timer = None
        self._request_phase = None

    def _on_request_timeout(self) -> None:
        phase, self._request_timer, self._request_phase = self._request_phase, None, None
        if self.transport.is_closing():
            return
        if phase == "headers" and not self._bytes_in_phase:
            self.transport.close()  # an idle connection: closed as keep-alive closes it, not counted
            return
        self._count("request_timeout")
        self.warn("request_timeout", "closing a connection whose request took over %ss", self.client_timeout)
        if phase == "headers" and (self.cycle is None or self.cycle.response_complete):
            error = APIError(408, f"The request's headers did not arrive within {self.client_timeout:g} s.")
            self.transport.write(_raw_error(error))
        self.transport.close()

    # ---- stalled reader ----

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.client_timeout and self._write_timer is None:
            self._write_timer = self.loop.call_later(self.client_timeout, self._on_write_stall)

    def resume_writing(self) -> None:
        self._cancel_write_timer()
        super().resume_writing()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
        self._write_timer = None

    def _on_write_stall(self) -> None:
        self._write_timer = None
        self._count("write_stall")
        self.warn("write_stall", "disconnecting a client that read nothing for %ss", self.client_timeout)
        self.transport.abort()  # its buffered bytes will not be read: do not wait to flush them

    def _count(self, reason: str) -> None:
        if self.closed is not None:
            self.closed.labels(reason=reason).inc()


def guarded_protocol(
    max_connections: int, client_timeout: float, closed: Any = None
) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol subclass with these bounds (uvicorn builds one instance per connection)."""
    attrs = {
        "max_connections": max_connections,
        "client_timeout": client_timeout,
        "closed": closed,
        "warn": _RateLimitedWarning(),
    }
    return type("GuardedH11Protocol", (GuardedH11Protocol,), attrs)
