"""Thin HTTP routes: parse, call the serving layer, shape the response. SSE and error bodies are built here only."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from pathlib import PurePath
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import Scope

from server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ResponsesRequest,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from server.responses import ResponseBuilder, chat_request, renamed, response_events
from server.tools import tool_plan

log = logging.getLogger("server")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
DISCONNECT_POLL_S = 0.2
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)
}


def error_response(error: APIError) -> JSONResponse:
    """The one place an error body is built: OpenAI's {"error": {message, type, param, code}}. An overload
    or a restarting engine (429, 503) says when to retry: the openai SDK waits as Retry-After says."""
    headers = {"retry-after": "1"} if error.status_code in (429, 503) else None
    return JSONResponse(
        error.to_model().model_dump(mode="json"), status_code=error.status_code, headers=headers
    )


class BodyError(HTTPException):
    """An error found while a body is read (its size, its timeout, the preparing budget), raised from a
    `receive` wrapper: FastAPI lets HTTPExceptions from body reading through to our handler, which answers
    it in OpenAI's shape."""


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, if it declares a valid one."""
    declared = dict(scope["headers"]).get(b"content-length", b"")
    return int(declared) if declared.isdigit() else None


def get_and_head(router: APIRouter, path: str, **kwargs: Any) -> Callable[[F], F]:
    """`router.get(path)` that answers HEAD too, as HTTP wants of every GET resource (load balancers and
    link checkers probe with it; FastAPI routes only the methods named). uvicorn sends HEAD's headers
    without the body. HEAD stays out of the OpenAPI schema, where it would repeat GET's operation id."""

    def register(endpoint: F) -> F:
        router.head(path, **{**kwargs, "include_in_schema": False})(endpoint)
        return router.get(path, **kwargs)(endpoint)

    return register


def _sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


async def sse_events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    """The one place SSE events are written: one event per chunk, an error event if one occurs, then [DONE].

    When the client goes away, this generator is cancelled or closed, which closes `chunks` and so
    aborts the engine requests behind it.
    """
    try:
        async with aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                yield _sse(chunk.model_dump_json())
    except APIError as e:
        yield _sse(e.to_model().model_dump_json())
    except Exception:
        log.exception("error while streaming a response")
        yield _sse(
            APIError(500, "Internal error while streaming.", "internal_error").to_model().model_dump_json()
        )
    yield _sse("[DONE]")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work` while polling for a client disconnect; on disconnect, cancel it (which aborts its engine work)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "Client closed the request.", "client_closed_request")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def check_api_key(request: Request) -> None:
    """401 unless the configured key is sent as `Authorization: Bearer <key>` (compared in constant time).
    A coroutine, though it awaits nothing: FastAPI runs a plain function dependency on a worker thread,
    a thread hop for every request and a queue behind that pool's 40 threads in a burst."""
    expected: str | None = request.app.state.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(
            401, "Missing or invalid API key: send `Authorization: Bearer <key>`.", "authentication_error"
        )


async def check_api_key_if_protected(request: Request) -> None:
    """The key guards the side routes (tokenize, metrics, dashboard) too when `--protect-all` is on."""
    if request.app.state.settings.protect_all:
        await check_api_key(request)


_KEY_CHECKS = (check_api_key, check_api_key_if_protected)


def _serving(request: Request, name: str) -> Any:
    serving = getattr(request.app.state, name, None)
    if serving is None:
        raise APIError(503, "The model is still loading; retry shortly.", "service_unavailable")
    return serving


OFF_LOOP_JSON_BYTES = 64 * 1024
DETOKENIZE_INLINE_TOKENS = 4096
_json_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="json-body")


class OffLoopJSONRoute(APIRoute):
    """A route whose large JSON body is parsed and validated on a thread of its own. FastAPI does both on
    the event loop, and requests whose bodies arrive together are handled back to back in one turn of
    it, holding every running stream's next token meanwhile. On the thread the loop runs between bodies,
    and FastAPI finds the body already validated (a model instance passes its check as it is). Only a
    JSON body longer than OFF_LOOP_JSON_BYTES takes the hop: declared so, or found so once read when it
    came chunked (no Content-Length)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        field = self.body_field
        # FastAPI reads and parses the body before it runs dependencies: the key is checked first here,
        # so a client without it costs no body read or parse (FastAPI's own check then passes)
        guards = [d.dependency for d in self.dependencies if d.dependency in _KEY_CHECKS]

        def parse(body: bytes) -> tuple[Any, list[Any]]:
            return field.validate(json.loads(body), {}, loc=("body",))  # type: ignore[union-attr]

        async def route(request: Request) -> Response:
            for guard in guards:
                await guard(request)  # type: ignore[misc]
            declared = declared_length(request.scope)
            json_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if field is not None and not (json_type == "application/json" or json_type.endswith("+json")):
                # FastAPI would not parse it either (a browser page sends other types without a CORS check)
                # and would say only that the body is not an object
                raise APIError(400, "The request body must be JSON sent with `Content-Type: application/json` "
                               f"(this request's: {json_type or 'none'}).")  # fmt: skip
            if (
                field is not None
                and (declared is None or declared > OFF_LOOP_JSON_BYTES)  # a chunked body: its size once read
                and (json_type == "application/json" or json_type.endswith("+json"))
            ):
                try:
                    body = await request.body()
                except HTTPException:
                    raise  # the body limit's 413 and 408
                except Exception as e:  # the client went away mid-body, as FastAPI words it
                    raise HTTPException(400, "There was an error parsing the body") from e
                if len(body) <= OFF_LOOP_JSON_BYTES:
                    return await handler(request)  # Starlette keeps the body read: FastAPI parses it here
                loop = asyncio.get_running_loop()
                try:
                    value, errors = await loop.run_in_executor(_json_thread, parse, body)
                except ValueError:
                    pass  # not JSON: FastAPI finds that again and words its 400
                except RecursionError as e:  # nested deeper than Python parses: worded as FastAPI does
                    raise HTTPException(400, "There was an error parsing the body") from e
                else:
                    if errors:
                        raise RequestValidationError(errors)
                    request._json = value  # Request.json() returns it from now on (Starlette caches it there)
            return await handler(request)

        return route


v1 = APIRouter(
    prefix="/v1", dependencies=[Depends(check_api_key)], responses=_ERRORS, route_class=OffLoopJSONRoute
)
misc = APIRouter(responses=_ERRORS, route_class=OffLoopJSONRoute)


@v1.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _respond(request, "completion", body)


@v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _respond(request, "chat", body)


async def _respond(request: Request, kind: str, body: CompletionRequest | ChatCompletionRequest) -> Response:
    """One path for both endpoints: an SSE stream or one JSON body, aborted if the client goes away."""
    serving = _serving(request, kind)
    if body.stream:
        chunks = await until_disconnected(request, serving.stream(body))
        return StreamingResponse(sse_events(chunks), media_type="text/event-stream")
    result = await until_disconnected(request, serving.create(body))
    return JSONResponse(result.model_dump(mode="json"))


@v1.post("/responses")
async def responses(body: ResponsesRequest, request: Request) -> Response:
    """OpenAI's Responses API, served by the chat path (server/responses.py)."""
    serving = _serving(request, "chat")
    builder = ResponseBuilder(body, serving.model_name)
    try:
        chat = chat_request(body)
        if body.stream:
            chunks = await until_disconnected(request, serving.stream(chat))
            return StreamingResponse(response_events(builder, chunks), media_type="text/event-stream")
        result = await until_disconnected(request, serving.create(chat))
    except APIError as e:
        raise renamed(e) from e
    return JSONResponse(builder.from_chat(result))


@get_and_head(v1, "/models")
async def models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(request)])


@get_and_head(v1, "/models/{model:path}")  # OpenAI's `client.models.retrieve(name)`
async def model(model: str, request: Request) -> ModelCard:
    card = _model_card(request)
    if model != card.id:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{card.id}`.",
                       "invalid_request_error", "model")  # fmt: skip
    return card


def _model_card(request: Request) -> ModelCard:
    state = request.app.state
    name = state.settings.served_model_name
    length = state.max_model_len
    root = public_root(state.settings.model, name)
    return ModelCard(id=name, root=root, max_model_len=length, context_length=length)


def public_root(source: str | None, served_name: str) -> str:
    """The model's file or folder name without its directories: a path tells clients about the host."""
    name = PurePath(source).name if source else ""
    return name or served_name


# /ping as vLLM's and SageMaker's health checks ask (POST too), open without the key as /health
@misc.api_route("/ping", methods=["GET", "HEAD", "POST"], include_in_schema=False)
@get_and_head(misc, "/health")
async def health(request: Request) -> Response:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return error_response(APIError(503, "The model is still loading.", "service_unavailable"))
    if not engine.is_healthy:
        return error_response(APIError(503, "The engine is not running.", "service_unavailable"))
    return Response(status_code=200)


@misc.post("/tokenize", dependencies=[Depends(check_api_key_if_protected)])
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    chat = _serving(request, "chat")
    chat.check_model(body.model)
    # counted in full whatever the context (as vLLM's): a client measures a text before cutting it up
    if isinstance(body, TokenizeChatRequest):
        # the tools as a chat request with them renders them (tool_choice "none" leaves them out, a named
        # one renders that tool alone)
        tools = tool_plan(body)
        ids = await chat.prompt_ids(
            body.messages,
            body.add_generation_prompt,
            tools,
            bounded=False,
            continue_final=chat.continue_final(body),
        )
    else:
        ids = (await chat.encode([body.prompt], add_special_tokens=body.add_special_tokens, bounded=False))[0]
    strs = [chat.tokenizer.id_to_token(i) for i in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=chat.max_model_len, tokens=ids, token_strs=strs)


@misc.post("/detokenize", dependencies=[Depends(check_api_key_if_protected)])
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    chat = _serving(request, "chat")
    chat.check_model(body.model)
    try:
        if len(body.tokens) <= DETOKENIZE_INLINE_TOKENS:
            return DetokenizeResponse(prompt=chat.tokenizer.decode(body.tokens))
        # tens of milliseconds for the ids a large body holds: not on the event loop
        return DetokenizeResponse(prompt=await asyncio.to_thread(chat.tokenizer.decode, body.tokens))
    except ValueError as e:
        raise APIError(400, str(e), param="tokens") from e


@get_and_head(misc, "/version")
async def version() -> VersionResponse:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return VersionResponse(version=package_version("smollm2-server"))
    except PackageNotFoundError:
        return VersionResponse(version="0.0.0+unknown")


@get_and_head(misc, "/metrics", dependencies=[Depends(check_api_key_if_protected)])
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
