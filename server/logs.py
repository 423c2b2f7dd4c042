"""Request ids and logging: an id per HTTP request (``X-Request-Id``) in a contextvar, so every log line
emitted while serving it carries the id without a parameter threaded through the layers; text or JSON
log lines; the periodic engine stats line."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-Id"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
# A client's id is echoed into headers and logs: bound it to a safe charset so it cannot forge log
# lines or inject header bytes; anything else gets a fresh id.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

stats_log = logging.getLogger("server.stats")


def current_request_id() -> str | None:
    """The id of the HTTP request being served in this context, or None outside one."""
    return _request_id.get()


def accept_request_id(header: str | None) -> str:
    return header if header is not None and _SAFE_ID.fullmatch(header) else uuid.uuid4().hex


class RequestIdMiddleware:
    """Takes the client's ``X-Request-Id`` (or makes one), exposes it through `current_request_id()`
    for the whole request, and echoes it in the response headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode())
        request_id = accept_request_id(raw.decode("latin-1") if raw is not None else None)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        token = _request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)


# ---- log lines -----------------------------------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id when known."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger's one handler (uvicorn's loggers propagate to it: run uvicorn with log_config=None)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# ---- the periodic engine stats line --------------------------------------------------------------


@dataclass(slots=True)
class _Totals:
    when: float
    prompt_tokens: int
    generation_tokens: int
    prefix_queries: int
    prefix_hits: int
    draft_tokens: int = 0
    accepted_tokens: int = 0


def _field(stats: Any, name: str) -> float:
    """A field of EngineStats, or of the plain dict a test engine returns."""
    value = stats.get(name, 0) if isinstance(stats, Mapping) else getattr(stats, name, 0)
    return float(value)


def _totals(stats: Any) -> _Totals:
    return _Totals(
        time.monotonic(),
        int(_field(stats, "num_prompt_tokens")),
        int(_field(stats, "num_generation_tokens")),
        int(_field(stats, "prefix_cache_queries")),
        int(_field(stats, "prefix_cache_hits")),
        int(_field(stats, "spec_decode_num_draft_tokens")),
        int(_field(stats, "spec_decode_num_accepted_tokens")),
    )


def stats_line(stats: Any, before: _Totals, now: _Totals) -> str | None:
    """vLLM's periodic line, or None when the engine was idle over the whole interval. Prompt tokens
    are counted by the engine once their prompt is done (its first token), a long one at once."""
    if now.prompt_tokens < before.prompt_tokens or now.generation_tokens < before.generation_tokens:
        before = _Totals(before.when, 0, 0, 0, 0)  # a new engine core counts from zero
    running, waiting = int(_field(stats, "num_running")), int(_field(stats, "num_waiting"))
    prompt = now.prompt_tokens - before.prompt_tokens
    generation = now.generation_tokens - before.generation_tokens
    if not (running or waiting or prompt or generation):
        return None
    seconds = max(now.when - before.when, 1e-9)
    queries = now.prefix_queries - before.prefix_queries
    hit_rate = (now.prefix_hits - before.prefix_hits) / queries if queries else 0.0
    line = (
        f"engine: prompt {prompt / seconds:.1f} tokens/s, generation {generation / seconds:.1f} tokens/s, "
        f"running {running}, waiting {waiting}, KV cache {100 * _field(stats, 'kv_cache_usage'):.1f}%, "
        f"prefix cache hit rate {100 * hit_rate:.1f}%"
    )
    drafted = now.draft_tokens - before.draft_tokens
    if drafted:  # speculative decoding is on and drafted in this interval
        accepted = now.accepted_tokens - before.accepted_tokens
        line += f", draft acceptance {100 * accepted / drafted:.1f}% of {drafted} tokens"
    return line


async def log_engine_stats(stats: Callable[[], Any], interval: float) -> None:
    """Every `interval` seconds while the engine is busy, one stats line."""
    before: _Totals | None = None
    while True:
        try:
            snapshot = stats()
        except Exception:  # engine loading or dead: /health reports that
            snapshot = None
        if snapshot is not None:
            now = _totals(snapshot)
            if before is not None and (line := stats_line(snapshot, before, now)) is not None:
                stats_log.info("%s", line)
            before = now
        await asyncio.sleep(interval)


@asynccontextmanager
async def stats_logging(stats: Callable[[], Any], interval: float) -> AsyncIterator[None]:
    """Runs `log_engine_stats` for the app's lifetime (interval 0: not at all)."""
    if interval <= 0:
        yield
        return
    task = asyncio.create_task(log_engine_stats(stats, interval))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def failure_reason(exc: BaseException) -> str:
    """An exception as one line for an operator: its message, led by its type where the message alone
    would not say what went wrong (a KeyError's is just the key)."""
    text = str(exc)
    if text and isinstance(exc, ValueError | OSError | RuntimeError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
