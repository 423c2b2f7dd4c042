"""The FastAPI application: lifespan (load model, start and drain the engine), error handlers, body limit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.tokenizer import Tokenizer
from server.budget import PrepareBudgetMiddleware
from server.core_setup import DEFAULT_MAX_MODEL_LEN, load_core, make_core, model_source
from server.dashboard import dashboard
from server.engine.client import SpawnedCore
from server.engine.engine import AsyncEngine, SupervisorConfig
from server.engine.messages import CoreInfo
from server.guided import GrammarChecker
from server.logs import RequestIdMiddleware, failure_reason, stats_logging
from server.metrics import HttpMetricsMiddleware, ServerMetrics
from server.protocol import APIError
from server.routes import (
    BodyError,
    check_api_key,
    check_api_key_if_protected,
    declared_length,
    error_response,
    misc,
    v1,
)
from server.serving import RequestLimits, ServingChat, ServingCompletion
from server.settings import Settings

log = logging.getLogger("server")


# ---- body size limit ------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """413 for a body over `limit` bytes: at once from Content-Length, else while the body is read; 408
    (and the connection closed) for a body not whole within `timeout` seconds of its headers; 400 (and
    the connection closed) for a request with both Content-Length and Transfer-Encoding."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float = 0.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in scope["headers"]}
        if b"content-length" in names and b"transfer-encoding" in names:
            # RFC 9112 6.1: the two may disagree on where the body ends, and a proxy in front may read it the
            # other way (request smuggling); refused before the app runs, and the connection closed
            error = APIError(400, "The request has both Content-Length and Transfer-Encoding; send one.")
            response = error_response(error)
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.limit:
            await error_response(self._error(declared))(scope, receive, send)
            return
        received = 0
        deadline = time.monotonic() + self.timeout if self.timeout else None

        async def limited_receive() -> Message:
            nonlocal received, deadline
            if deadline is None:  # no timeout, or the body is whole: later receives wait for a disconnect
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    # FastAPI re-raises HTTPExceptions from body reading; our handler shapes it. The
                    # rest of the body would still be on its way: the connection cannot be reused.
                    raise BodyError(
                        408,
                        f"The request body did not arrive within {self.timeout:g} s ({received} bytes did).",
                        headers={"connection": "close"},
                    ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyError(413, self._error(received).message)
                if not message.get("more_body", False):
                    deadline = None
            return message

        await self.app(scope, limited_receive, send)

    def _error(self, size: int) -> APIError:
        return APIError(413, f"The request body has {size} bytes or more; the limit is {self.limit} bytes.")


# ---- error handlers -------------------------------------------------------------------------------


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return f"The body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")  # pydantic's wrapping
    return f"{param or 'body'}: {message}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code in (404, 405):  # what the key guards is not mapped without it, as vLLM's
            guarded = request.url.path == "/v1" or request.url.path.startswith("/v1/")
            try:
                await (check_api_key if guarded else check_api_key_if_protected)(request)
            except APIError as e:
                return error_response(e)
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        if exc.status_code == 429:  # the preparing budget, overflowed by a body as it arrived
            kind = "rate_limit_error"
        response = error_response(APIError(exc.status_code, str(exc.detail), kind))
        response.headers.update(exc.headers or {})
        return response

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            APIError(500, f"Internal server error ({type(exc).__name__}).", "internal_error")
        )

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_bug)


# ---- engine construction --------------------------------------------------------------------------


def supervisor_config(settings: Settings) -> SupervisorConfig:
    return SupervisorConfig(
        max_restarts=settings.max_engine_restarts,
        restart_window=settings.engine_restart_window,
        step_timeout=settings.step_timeout or None,
    )


def make_engine(
    model: Any, tokenizer: Tokenizer, settings: Settings, on_fatal: Callable[[str], None] | None = None
) -> AsyncEngine:
    """An AsyncEngine (not started) whose core runs on a thread over `model`: for tests and
    `--engine-process false`. A restart builds a new runner and scheduler around the same model."""
    build = functools.partial(make_core, model, tokenizer.eos_token_id, settings, tokenizer)
    return AsyncEngine.in_thread(build, config=supervisor_config(settings), on_fatal=on_fatal)


def build_engine(
    settings: Settings, on_fatal: Callable[[str], None] | None = None, first_core: SpawnedCore | None = None
) -> AsyncEngine:
    """An AsyncEngine (not started) whose core loads the model of `settings`: in a child process
    (`--engine-process`, the default; `first_core`: its first process, already spawned) or on a thread."""
    config = supervisor_config(settings)
    if settings.engine_process:
        return AsyncEngine.in_process(
            load_core, settings, log_level=settings.log_level, log_format=settings.log_format, config=config,
            on_fatal=on_fatal, first=first_core,
        )  # fmt: skip
    return AsyncEngine.in_thread(functools.partial(load_core, settings), config=config, on_fatal=on_fatal)


async def start_engine(
    settings: Settings, on_fatal: Callable[[str], None], first_core: SpawnedCore | None = None
) -> tuple[AsyncEngine, Tokenizer]:
    """Start the engine and read the tokenizer meanwhile: the engine process imports torch and loads the
    model while this process parses the tokenizer, so start-up waits for the longer of the two only."""
    source = await asyncio.to_thread(model_source, settings)  # a missing default model fails here
    engine = build_engine(settings, on_fatal, first_core)
    starting = asyncio.ensure_future(engine.start())
    try:
        tokenizer = await asyncio.to_thread(Tokenizer.from_file, source)
    except BaseException:
        with contextlib.suppress(Exception):
            await starting
        await engine.shutdown(graceful=False)
        raise
    await starting
    return engine, tokenizer


def request_limits(settings: Settings) -> RequestLimits:
    return RequestLimits(
        max_prompts=settings.max_prompts_per_request,
        max_stop_strings=settings.max_stop_strings,
        max_stop_string_length=settings.max_stop_string_length,
        max_logit_bias=settings.max_logit_bias,
        max_stop_token_ids=settings.max_stop_token_ids,
        max_logprob_entries=settings.max_logprob_entries,
    )


def _attach(app: FastAPI, engine: Any, tokenizer: Tokenizer, max_model_len: int) -> None:
    state = app.state
    settings = state.settings
    args = (
        engine,
        tokenizer,
        settings.served_model_name,
        max_model_len,
        state.metrics,
        request_limits(settings),
        GrammarChecker(tokenizer),
    )
    state.completion = ServingCompletion(*args)
    state.chat = ServingChat(*args)
    state.max_model_len = max_model_len
    _publish_cache_config(state.metrics, state.settings, engine, max_model_len)
    state.engine = engine  # last: /health turns 200 once everything above is ready


def shutdown_signal(app: FastAPI, sig: int) -> bool:
    """A SIGTERM or SIGINT, from uvicorn's handler; returns whether uvicorn should act on it. The first
    drains: uvicorn stops accepting and waits for the open requests, and those still running after
    --shutdown-timeout end with a 503 (uvicorn's own timeout, later, would cancel them mid-response). A
    second ends them now (the exit code then says the stop was forced); a third is uvicorn's force exit."""
    state = app.state
    state.shutdown_signals += 1
    engine, loop = state.engine, state.loop
    if engine is None and state.exit_on_start_failure:
        # Still starting (loading the model, building kernels): nothing was accepted, so nothing is drained;
        # waiting for the start to finish made a stop take as long as the start. The engine being built
        # ends with this process (its watch on its parent).
        if loop is None:
            os._exit(0)
        loop.call_soon_threadsafe(_stop_starting)
        return False
    if isinstance(engine, AsyncEngine) and loop is not None and state.shutdown_signals <= 2:
        # on the loop, not here: the signal may land inside a write to the log's stream
        loop.call_soon_threadsafe(_drain, engine, state.shutdown_signals, state.settings.shutdown_timeout)
    if state.shutdown_signals == 2:
        state.forced_stop = sig
        return False
    return True


def _stop_starting() -> None:
    log.info("stop signal during start-up: exiting")
    logging.shutdown()
    os._exit(0)


def _drain(engine: AsyncEngine, signals: int, timeout: float) -> None:
    if signals == 1:
        log.info("stopping: no new requests; those running have %gs to finish", timeout)
        engine.drain(timeout)
    else:
        log.warning("second stop signal: ending the requests still running now")
        engine.drain(0.0)


def _fatal(app: FastAPI, reason: str) -> None:
    """The engine gave up: stop serving and exit non-zero, so that the orchestrator restarts us."""
    app.state.fatal_error = reason
    log.critical("the engine cannot be recovered (%s): shutting the server down", reason)
    os.kill(os.getpid(), signal.SIGTERM)


TEMPLATE_CHECK_SECONDS = 10.0


async def check_chat_template(tokenizer: Tokenizer, timeout: float = TEMPLATE_CHECK_SECONDS) -> None:
    """The model's chat template compiles, and renders a one-message conversation within `timeout`: an
    operator learns of a broken or runaway one at start, not from every chat request (jinja cannot be
    stopped, so the check runs on a thread of its own, which a failed start leaves behind). A template
    that refuses that conversation (one that wants a system message first, say) is only warned of."""
    done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def render() -> None:
        if not done.set_running_or_notify_cancel():  # running, the wait's timeout cannot cancel it
            return
        try:
            tokenizer.compile_chat_template()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting loop
            done.set_exception(e)
            return
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
        except ValueError as e:
            log.warning("the chat template cannot render a one-message conversation: %s", e)
        done.set_result(None)

    threading.Thread(target=render, name="chat-template-check", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.wrap_future(done), timeout)
    except TimeoutError:
        raise ValueError(
            f"the chat template did not render a one-message conversation within {timeout:g} s"
        ) from None


def _start_failed(exc: Exception) -> NoReturn:
    """The model or the settings cannot be served: one line that says why and exit 3 (uvicorn's code for
    a failed start), instead of uvicorn's traceback of the lifespan (--log-level debug shows it)."""
    log.error("cannot start the server: %s", failure_reason(exc))
    log.debug("where it failed", exc_info=exc)
    logging.shutdown()
    os._exit(3)  # the engine is stopped already; SystemExit would be caught and logged with a traceback


def _publish_cache_config(
    metrics: ServerMetrics, settings: Settings, engine: Any, max_model_len: int
) -> None:
    # A started AsyncEngine knows its core's KV cache; the tests' fakes do not.
    info: CoreInfo | None = getattr(engine, "info", None)
    metrics.set_cache_config(
        block_size=settings.block_size, num_blocks=None if info is None else info.num_blocks,
        max_model_len=max_model_len, max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        kv_cache_memory_bytes=(info.kv_cache_bytes if info is not None else 0) or settings.kv_cache_memory,
        enable_prefix_caching=settings.enable_prefix_caching,
    )  # fmt: skip


def create_app(
    settings: Settings,
    engine: Any = None,
    tokenizer: Tokenizer | None = None,
    first_core: SpawnedCore | None = None,
    exit_on_start_failure: bool = False,
) -> FastAPI:
    """The app. With `engine` and `tokenizer` given (tests), they are used as they are and not shut down.
    Otherwise the lifespan builds the engine of `settings`; `first_core` is its process if already started
    (`server.engine.client.spawn_core(load_core, (settings,), ...)`). exit_on_start_failure: a model or
    setting that cannot be served ends the process with one line of log (the server's main)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()
        if engine is not None:
            assert tokenizer is not None, "pass the tokenizer with the engine"
            # An AsyncEngine handed over unstarted is started on this app's loop and stopped with it.
            owned = isinstance(engine, AsyncEngine) and not engine.started
            if owned:
                await engine.start()
            length = settings.max_model_len or int(
                getattr(engine, "max_model_len", None) or DEFAULT_MAX_MODEL_LEN
            )
            _attach(app, engine, tokenizer, length)
            try:
                async with stats_logging(app.state.engine.stats, settings.stats_log_interval):
                    yield
            finally:
                if owned:
                    await engine.shutdown(graceful=False)
            return
        try:
            built, tok = await start_engine(settings, functools.partial(_fatal, app), first_core)
        except Exception as e:
            if not exit_on_start_failure:
                raise
            _start_failed(e)
        app.state.model_source = settings.model or "default"
        assert built.max_model_len is not None
        try:
            await check_chat_template(tok)
            _attach(app, built, tok, built.max_model_len)
        except Exception as e:
            await built.shutdown(graceful=False)
            if not exit_on_start_failure:
                raise
            _start_failed(e)
        log.info("serving %s on http://%s:%d", settings.served_model_name, settings.host, settings.port)
        try:
            async with stats_logging(built.stats, settings.stats_log_interval):
                yield
        finally:
            log.info(
                "shutting down: letting in-flight requests finish (up to %ss)", settings.shutdown_timeout
            )
            await built.shutdown(graceful=True, timeout=settings.shutdown_timeout)

    # no redirect from `/path/` to `/path`: it answered before the key check (307 to any /v1 path), to a
    # Location built from the client's Host header; such a path is an unknown one (401 or 404)
    app = FastAPI(title="smollm2-server", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    app.state.settings = settings
    app.state.fatal_error = None
    app.state.shutdown_signals = 0
    app.state.exit_on_start_failure = exit_on_start_failure  # the server's main: a stop during start-up exits
    app.state.forced_stop = None
    app.state.loop = None
    app.state.engine = None
    app.state.max_model_len = settings.max_model_len or DEFAULT_MAX_MODEL_LEN
    app.state.model_source = settings.model
    app.state.metrics = ServerMetrics(lambda: app.state.engine.stats(), settings.served_model_name)
    install_error_handlers(app)
    app.include_router(v1)
    app.include_router(misc)
    app.include_router(dashboard)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(
        PrepareBudgetMiddleware, budget=settings.max_preparing_bytes, max_body=settings.max_body_bytes
    )  # inside the body limit: a body declared too long is a 413 before it costs any budget
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, timeout=settings.client_timeout)
    routes = (
        [r for r in app.router.routes if isinstance(r, Route)] + v1.routes + misc.routes + dashboard.routes
    )
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.metrics, routes=routes)  # 413s counted too
    app.add_middleware(RequestIdMiddleware)  # last added, outermost: even a 413 carries the id
    return app
