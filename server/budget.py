"""A bound on the memory of requests not yet in the engine.

A request's body is parsed into Python objects (JSON, then pydantic) and held while its prompt is
rendered and tokenized on worker threads; a body of many small values (a list of token ids, thousands
of tiny messages) takes many times its size that way. With many such bodies arriving at once, each waiting
its turn for a worker thread, that alone could exhaust the server's memory. So the bodies of requests
between their arrival and their admission to the engine share a budget in bytes: a request that does
not fit is answered 429 before its body is read. One request always fits when none is being prepared.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

from server.protocol import APIError
from server.routes import declared_length, error_response

_release: ContextVar[Callable[[], None] | None] = ContextVar("budget_release", default=None)


def admitted() -> None:
    """The current request is in the engine (or refused): its body stops counting against the budget."""
    release = _release.get()
    if release is not None:
        release()


class PrepareBudgetMiddleware:
    """429 for a POST whose body does not fit in what is left of `budget` bytes; a body without a
    Content-Length counts as `max_body` (it may be that long)."""

    def __init__(self, app: ASGIApp, budget: int, max_body: int) -> None:
        self.app = app
        self.budget = budget
        self.max_body = max_body
        self.used = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        cost = self.max_body if declared is None else min(declared, self.max_body)
        if self.used and self.used + cost > self.budget:
            error = APIError(
                429,
                f"The server is preparing {self.used} bytes of requests, its limit for bodies not yet "
                "in the engine; retry shortly.",
                "rate_limit_error",
            )
            await error_response(error)(scope, receive, send)  # with Retry-After, as every 429
            return
        self.used += cost
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.used -= cost

        token = _release.set(release)
        try:
            await self.app(scope, receive, send)
        finally:
            release()
            _release.reset(token)
