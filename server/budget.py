"""A bound on the memory of requests not yet in the engine.

A request's body is parsed into Python objects (JSON, then pydantic) and held while its prompt is
rendered and tokenized on worker threads; a body of many small values (a list of token ids, thousands
of tiny messages) takes many times its size that way. With many such bodies arriving at once, each waiting
its turn for a worker thread, that alone could exhaust the server's memory. So the bodies of requests
between their arrival and their admission to the engine share a budget in bytes, counted as they arrive:
a connection that declares a large body (or a chunked one) and sends nothing holds none of it, so idle
connections cannot lock the others out. A request whose declared length does not fit beside what the
others hold is answered 429 before its body is read; one whose arriving bytes overflow it while others
hold some is answered 429 then, and its connection closed. One request alone always fits.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.protocol import APIError
from server.routes import BodyError, declared_length, error_response

_release: ContextVar[Callable[[], None] | None] = ContextVar("budget_release", default=None)


def admitted() -> None:
    """The current request is in the engine (or refused): its body stops counting against the budget."""
    release = _release.get()
    if release is not None:
        release()


class PrepareBudgetMiddleware:
    """429 for a POST whose body does not fit in what is left of `budget` bytes: at once for a declared
    Content-Length, else as its bytes arrive; only the bytes received count."""

    def __init__(self, app: ASGIApp, budget: int, max_body: int) -> None:
        self.app = app
        self.budget = budget
        self.max_body = max_body
        self.used = 0

    def _message(self) -> str:
        return (
            f"The server is preparing {self.used} bytes of requests, its limit for bodies not yet "
            "in the engine; retry shortly."
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        # a refusal that costs no read, for a body that will not fit beside the others' (none held yet)
        if declared is not None and self.used and self.used + min(declared, self.max_body) > self.budget:
            error = APIError(429, self._message(), "rate_limit_error")
            await error_response(error)(scope, receive, send)  # with Retry-After, as every 429
            return
        held = 0
        released = False

        async def counted_receive() -> Message:
            nonlocal held
            message = await receive()
            size = len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if size and not released:
                if self.used > held and self.used + size > self.budget:
                    # FastAPI re-raises HTTPExceptions from body reading and our handler shapes it; the
                    # rest of the body is still on its way, so the connection cannot be reused
                    raise BodyError(429, self._message(), headers={"connection": "close"})
                held += size
                self.used += size
            return message

        def release() -> None:
            nonlocal released, held
            if not released:
                released = True
                self.used -= held
                held = 0

        token = _release.set(release)
        try:
            await self.app(scope, counted_receive, send)
        finally:
            release()
            _release.reset(token)
