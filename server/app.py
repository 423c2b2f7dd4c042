"""The FastAPI application: lifespan (load model, start and drain the engine), error handlers, body limit."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.tokenizer import Tokenizer
from server.dashboard import dashboard
from server.engine.core import EngineCore
from server.engine.engine import AsyncEngine, SupervisorConfig
from server.logs import RequestIdMiddleware, stats_logging
from server.metrics import HttpMetricsMiddleware, ServerMetrics
from server.protocol import APIError
from server.routes import error_response, misc, v1
from server.serving import RequestLimits, ServingChat, ServingCompletion
from server.settings import Settings

log = logging.getLogger("server")
DEFAULT_MAX_MODEL_LEN = 8192


# ---- body size limit ------------------------------------------------------------------------------


class _BodyTooLarge(StarletteHTTPException):
    pass


class BodyLimitMiddleware:
    """413 for a body over `limit` bytes: at once from Content-Length, else while the body is read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await error_response(self._error(int(declared)))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI re-raises HTTPExceptions from body reading; our handler shapes it.
                    raise _BodyTooLarge(413, self._error(received).message)
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
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}{more}", param


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
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind))

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


def resolve_device_dtype(settings: Settings) -> tuple[str, str]:
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and torch.version.cuda is not None:  # a CUDA build of torch, no usable GPU
            log.warning(
                "no CUDA device available (torch %s, CUDA %s): falling back to CPU",
                torch.__version__,
                torch.version.cuda,
            )
    # bf16 on both: on this project's CPUs bf16 GEMMs run 3-4x faster than fp32 (bench notes).
    dtype = "bfloat16" if settings.dtype == "auto" else settings.dtype
    return device, dtype


def make_core(
    model: Any, eos_token_id: int | None, settings: Settings, tokenizer: Tokenizer | None = None
) -> EngineCore:
    """Size the KV cache from `kv_cache_memory`; build runner + scheduler + EngineCore. With `tokenizer`,
    the runner can constrain outputs (structured output needs the vocabulary's text)."""
    from server.engine.core import EngineConfig, EngineCore
    from server.engine.runner import ModelRunner, num_blocks_for_memory
    from server.engine.scheduler import Scheduler, SchedulerConfig
    from server.engine.spec_decode import SpecConfig
    from server.engine.structured import StructuredOutputs

    max_model_len = settings.max_model_len or min(model.config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    num_blocks = num_blocks_for_memory(model, settings.kv_cache_memory, settings.block_size, model.dtype)
    scheduler = SchedulerConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=max_model_len,
        block_size=settings.block_size,
        num_blocks=num_blocks,
        enable_prefix_caching=settings.enable_prefix_caching,
        eos_token_id=eos,
        max_seqs_per_request=settings.seqs_per_request,
        speculative=SpecConfig(
            settings.speculative_ngram,
            settings.speculative_ngram_min,
            settings.speculative_ngram_max,
            settings.speculative_max_num_seqs,
        ),
    )
    try:
        scheduler.validate()
    except ValueError as e:
        raise ValueError(
            f"{e}: raise --kv-cache-memory (now {settings.kv_cache_memory} bytes) or lower --max-model-len"
        ) from e
    runner = ModelRunner(
        model, num_blocks, settings.block_size, eos, cuda_graphs=settings.cuda_graphs,
        max_num_seqs=settings.max_num_seqs, max_model_len=max_model_len, capture_graphs_now=True,
        structured=None if tokenizer is None else StructuredOutputs(tokenizer, model.config.vocab_size),
    )  # fmt: skip
    core = EngineCore(
        runner, Scheduler(scheduler), EngineConfig(scheduler=scheduler, max_waiting=settings.max_waiting)
    )
    log.info(
        "KV cache: %d blocks x %d tokens = %d tokens (%s bytes); max_model_len %d, max_num_seqs %d",
        num_blocks, settings.block_size, num_blocks * settings.block_size, settings.kv_cache_memory,
        max_model_len, settings.max_num_seqs,
    )  # fmt: skip
    return core


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


def model_source(settings: Settings) -> str:
    from model.defaults import require_default_model

    return settings.model or str(require_default_model())


def load_core(settings: Settings) -> EngineCore:
    """Load the model named by `settings` and build its EngineCore (in whichever process runs the steps)."""
    from model.prepared import load_prepared
    from model.quant import INT4_MAX_ROWS

    source = model_source(settings)
    device, dtype = resolve_device_dtype(settings)
    if device == "cpu":
        import torch

        from model.threads import set_compute_threads

        threads = settings.torch_threads or default_torch_threads(settings)
        torch.set_num_threads(threads)
        set_compute_threads(os.cpu_count() or 1)
        log.info("CPU: %d thread(s) for element-wise ops, GEMMs on all %d cores", threads, os.cpu_count())
    model = load_prepared(
        source, dtype, device, settings.int4_small_batch, settings.int8_lm_head, settings.prepared_cache
    )
    cfg = model.config
    log.info(
        "loaded %s: %d layers, hidden %d, vocab %d, context %d, %s on %s",
        source, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.max_position_embeddings, dtype, device,
    )  # fmt: skip
    if model.int4_active:
        log.info(
            "int4 weights for steps of <= %d tokens (reconstruction error %.4f)",
            INT4_MAX_ROWS,
            model.int4_error,
        )
    elif settings.int4_small_batch != "off" and model.int4_error is not None:
        log.info("int4 weights off: they would change the model (error %.4f > lossless)", model.int4_error)
    if model.int8_head_active:
        log.info(
            "int8 LM head for steps sampling <= 4 tokens (reconstruction error %.4f)", model.int8_head_error
        )
    elif settings.int8_lm_head != "off" and model.int8_head_error is not None:
        log.info("int8 LM head off: it would change the model (error %.4f > lossless)", model.int8_head_error)
    tokenizer = Tokenizer.from_file(source)
    return make_core(model, tokenizer.eos_token_id, settings, tokenizer)


def default_torch_threads(settings: Settings) -> int:
    """All cores but one for ATen's element-wise loops (our GEMMs switch to every core around each
    call): on 2 cores, two OpenMP threads on each of a step's ~3,000 small ops cost more than they
    gave (bench/NOTES.md)."""
    return max(1, (os.cpu_count() or 1) - 1)


def build_engine(
    settings: Settings, on_fatal: Callable[[str], None] | None = None
) -> tuple[AsyncEngine, Tokenizer]:
    """The tokenizer of `settings.model` (default: the default GGUF) and an AsyncEngine (not started)
    whose core loads the model: in a child process (`--engine-process`, the default) or on a thread."""
    source = model_source(settings)
    tokenizer = Tokenizer.from_file(source)
    config = supervisor_config(settings)
    if settings.engine_process:
        engine = AsyncEngine.in_process(
            load_core, settings, log_level=settings.log_level, log_format=settings.log_format, config=config,
            on_fatal=on_fatal,
        )  # fmt: skip
    else:
        engine = AsyncEngine.in_thread(
            functools.partial(load_core, settings), config=config, on_fatal=on_fatal
        )
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
    )
    state.completion = ServingCompletion(*args)
    state.chat = ServingChat(*args)
    state.max_model_len = max_model_len
    _publish_cache_config(state.metrics, state.settings, engine, max_model_len)
    state.engine = engine  # last: /health turns 200 once everything above is ready


def _fatal(app: FastAPI, reason: str) -> None:
    """The engine gave up: stop serving and exit non-zero, so that the orchestrator restarts us."""
    app.state.fatal_error = reason
    log.critical("the engine cannot be recovered (%s): shutting the server down", reason)
    os.kill(os.getpid(), signal.SIGTERM)


def _num_blocks(engine: Any) -> int | None:
    """KV cache blocks of a started AsyncEngine's core; None for other engines (tests' fakes)."""
    info = getattr(engine, "info", None)
    return None if info is None else int(info.num_blocks)


def _publish_cache_config(
    metrics: ServerMetrics, settings: Settings, engine: Any, max_model_len: int
) -> None:
    metrics.set_cache_config(
        block_size=settings.block_size, num_blocks=_num_blocks(engine), max_model_len=max_model_len,
        max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
        kv_cache_memory_bytes=settings.kv_cache_memory, enable_prefix_caching=settings.enable_prefix_caching,
    )  # fmt: skip


def create_app(settings: Settings, engine: Any = None, tokenizer: Tokenizer | None = None) -> FastAPI:
    """The app. With `engine` and `tokenizer` given (tests), they are used as they are and not shut down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
        built, tok = await asyncio.to_thread(build_engine, settings, functools.partial(_fatal, app))
        app.state.model_source = settings.model or "default"
        await built.start()
        assert built.max_model_len is not None
        _attach(app, built, tok, built.max_model_len)
        log.info("serving %s on http://%s:%d", settings.served_model_name, settings.host, settings.port)
        try:
            async with stats_logging(built.stats, settings.stats_log_interval):
                yield
        finally:
            log.info(
                "shutting down: letting in-flight requests finish (up to %ss)", settings.shutdown_timeout
            )
            await built.shutdown(graceful=True, timeout=settings.shutdown_timeout)

    app = FastAPI(title="smollm2-server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.fatal_error = None
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
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.metrics)  # 413s counted too
    app.add_middleware(RequestIdMiddleware)  # last added, outermost: even a 413 carries the id
    return app
