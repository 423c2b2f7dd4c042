"""OpenAI's Responses API (`POST /v1/responses`), served by the chat path.

A request becomes the chat request it means (`instructions` a system message, `input` items messages,
function calls and their outputs the assistant's tool calls and tool messages, `text.format` the
response format, flat function tools chat's nested ones), runs through `ServingChat` (so every bound,
check and guard of chat holds), and its answer is written back as a `response` object, or streamed as
the Responses API's typed events. Nothing is stored: `previous_response_id` and `background` are 400s,
and a client sends the whole conversation in `input`, as with chat.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from server.protocol import (
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ResponsesRequest,
    UsageInfo,
)

log = logging.getLogger("server")

# chat's field -> the Responses field a client sent it as, for errors that name it
_FIELDS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request `req` stands for; 400 for what this server cannot do, naming the field as sent."""
    if req.previous_response_id is not None:
        raise APIError(400, "previous_response_id is not supported: this server stores no responses; send "
                       "the whole conversation in input.", param="previous_response_id")  # fmt: skip
    if req.background:
        raise APIError(400, "background responses are not supported.", param="background")
    conversation = _Conversation()
    if req.instructions:
        conversation.add({"role": "system", "content": req.instructions}, "instructions")
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        conversation.item(item, f"input[{i}]")
    body: dict[str, Any] = {"model": req.model, "messages": conversation.messages, "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    for name, value in (("max_tokens", req.max_output_tokens), ("temperature", req.temperature),
                        ("top_p", req.top_p), ("parallel_tool_calls", req.parallel_tool_calls)):  # fmt: skip
        if value is not None:
            body[name] = value
    if req.text and req.text.get("format") is not None:
        body["response_format"] = _response_format(req.text["format"])
    if req.tools:
        body["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        first, more = e.errors()[0], len(e.errors()) - 1
        param = conversation.path(first.get("loc", ()))
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}" + (f" (and {more} more errors)" if more else ""),
                       param=param) from e  # fmt: skip


class _Conversation:
    """Chat messages built from Responses items, each remembering the item it came from (errors found
    when chat validates them name that item)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.origins: list[str] = []

    def add(self, message: dict[str, Any], origin: str) -> None:
        self.messages.append(message)
        self.origins.append(origin)

    def item(self, item: Any, where: str) -> None:
        if not isinstance(item, dict):
            raise APIError(
                400, f"{where} must be an object (a message or a function call item).", param=where
            )
        kind = item.get("type", "message")
        if kind == "message":
            role = _required(item, "role", str, where, "a string")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role must be user, system, developer or assistant, got "
                               f"{role!r}.", param=f"{where}.role")  # fmt: skip
            self.add({"role": role, "content": _text(item, "content", where)}, where)
        elif kind == "function_call":
            call = {"id": _required(item, "call_id", str, where, "a string"), "type": "function",
                    "function": {"name": _required(item, "name", str, where, "a string"),
                                 "arguments": _required(item, "arguments", str, where, "a string (JSON)")}}  # fmt: skip
            last = self.messages[-1] if self.messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls come as consecutive items
            else:
                self.add({"role": "assistant", "content": None, "tool_calls": [call]}, where)
        elif kind == "function_call_output":
            call_id = _required(item, "call_id", str, where, "a string")
            self.add(
                {"role": "tool", "tool_call_id": call_id, "content": _text(item, "output", where)}, where
            )
        elif kind == "item_reference":
            raise APIError(400, f"{where} refers to a stored item: this server stores none. Send store: false "
                           "and the whole conversation in input (Vercel's AI SDK: providerOptions.openai."
                           "store = false).", param=where)  # fmt: skip
        elif kind != "reasoning":  # another model's reasoning: nothing this model can read
            raise APIError(400, f"{where} has type {kind!r}; this server takes message, function_call and "
                           "function_call_output items.", param=where)  # fmt: skip

    def path(self, loc: tuple[Any, ...]) -> str:
        """A chat request's error location as the Responses request's field."""
        head = str(loc[0]) if loc else "body"
        if head == "messages" and len(loc) > 1 and isinstance(loc[1], int) and loc[1] < len(self.origins):
            return self.origins[loc[1]]
        if head == "tools" and len(loc) > 1:
            rest = [str(x) for x in loc[2:] if x != "function"]
            return ".".join([f"tools[{loc[1]}]", *rest])
        if head == "response_format":
            return ".".join(["text.format", *(str(x) for x in loc[1:] if x != "json_schema")])
        if head == "tool_choice":
            return "tool_choice"
        return ".".join([_FIELDS.get(head, head), *(str(x) for x in loc[1:])])


def _required(item: dict[str, Any], key: str, kind: type, where: str, what: str) -> Any:
    value = item.get(key)
    if not isinstance(value, kind):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise APIError(400, f"{where}.{key} must be {what}, got {got}.", param=f"{where}.{key}")
    return value


def _text(item: dict[str, Any], key: str, where: str) -> Any:
    """A message's content (or a call's output) as chat takes it: a string, or text parts (other kinds
    of part are refused)."""
    content = item.get(key)
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(
            400, f"{where}.{key} must be a string or a list of text parts.", param=f"{where}.{key}"
        )
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise APIError(400, f"{where}.{key}[{j}] has type {kind!r}; this model reads text only.",
                           param=f"{where}.{key}")  # fmt: skip
        text = part.get("refusal") if kind == "refusal" else part.get("text")
        if not isinstance(text, str):
            raise APIError(400, f"{where}.{key}[{j}] has no text.", param=f"{where}.{key}")
        parts.append({"type": "text", "text": text})
    return parts


def _response_format(fmt: Any) -> Any:
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        _required(fmt, "name", str, "text.format", "a string")
        _required(fmt, "schema", dict, "text.format", "a JSON schema object")
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    return fmt


def _tool(tool: Any, where: str) -> Any:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise APIError(400, f"{where} has type {kind!r}; this server runs function tools only.", param=where)
    _required(tool, "name", str, where, "a string")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {
            "type": "function",
            "function": {"name": _required(choice, "name", str, "tool_choice", "a string")},
        }
    raise APIError(400, "tool_choice must be auto, none, required or {\"type\": \"function\", \"name\": ...}.",
                   param="tool_choice")  # fmt: skip


def renamed(e: APIError) -> APIError:
    """An error from the chat path, naming the field as the client sent it (the message is left as it is
    but where it names that field: it may quote the client's own strings)."""
    if e.param is None:
        return e
    head, _, rest = e.param.partition(".")
    name = _FIELDS.get(head)
    if name is None:
        return e
    message = e.message.replace(head, name) if head != "messages" else e.message
    return APIError(e.status_code, message, e.type, name + ("." + rest if rest else ""))


class ResponseBuilder:
    """The `response` object of one request, as the openai SDK's `Response` reads it."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.req = req
        self.model = model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": content if status == "completed" else []}  # fmt: skip

    @staticmethod
    def call(call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
        return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}  # fmt: skip

    def response(
        self, status: str, output: list[dict[str, Any]], usage: UsageInfo | None = None,
        error: APIError | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        req = self.req
        fmt = (req.text or {}).get("format") or {"type": "text"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None if error is None else {"code": _error_code(error), "message": error.message},
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None,
            "store": False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": {"format": fmt},
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "truncation": "disabled",
            "metadata": req.metadata or {},
            "user": req.user,
            "usage": None if usage is None else _usage(usage),
        }

    def from_chat(self, chat: ChatCompletionResponse) -> dict[str, Any]:
        choice = chat.choices[0]
        calls, status = choice.message.tool_calls, _status(choice.finish_reason)
        output = [self.message(choice.message.content or "")] if choice.message.content or not calls else []
        output += [self.call(c.id, c.function.name, c.function.arguments) for c in calls]
        return self.response(status, _mark_cut(output, status), chat.usage)


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _mark_cut(output: list[dict[str, Any]], status: str) -> list[dict[str, Any]]:
    """The item max_output_tokens cut (the last) is "incomplete", so a tool loop does not run a call whose
    arguments were cut off."""
    if status == "incomplete" and output:
        output[-1] = {**output[-1], "status": "incomplete"}
    return output


def _error_code(error: APIError) -> str:
    return "server_error" if error.status_code >= 500 else error.type


def _usage(usage: UsageInfo) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.prompt_tokens_details.cached_tokens,
            "cache_write_tokens": 0,
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


async def response_events(
    builder: ResponseBuilder, chunks: AsyncIterator[ChatCompletionChunk]
) -> AsyncIterator[bytes]:
    """The Responses API's stream: `response.created`, the message's text deltas, each function call,
    then `response.completed` (or `response.incomplete`), as typed server-sent events. An error ends it
    with an `error` event and `response.failed`."""
    seq = -1  # OpenAI's count from 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        seq += 1
        data = json.dumps({"type": kind, "sequence_number": seq, **fields}, ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n".encode()

    yield event("response.created", response=builder.response("in_progress", []))
    yield event("response.in_progress", response=builder.response("in_progress", []))
    text, started, finish, usage = "", False, None, None
    calls: list[tuple[str, str, str]] = []
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    at = {"item_id": builder.message_id, "output_index": 0, "content_index": 0}
    try:
        async for chunk in chunks:
            usage = chunk.usage or usage
            for c in chunk.choices:
                finish = c.finish_reason or finish
                if c.delta.content:
                    if not started:
                        started = True
                        item = builder.message("", "in_progress")
                        yield event("response.output_item.added", output_index=0, item=item)
                        yield event("response.content_part.added", **at, part=part)
                    text += c.delta.content
                    yield event("response.output_text.delta", **at, delta=c.delta.content, logprobs=[])
                for d in c.delta.tool_calls or []:  # whole calls, in the choice's last chunk
                    name, arguments = (d.function.name, d.function.arguments) if d.function else (None, None)
                    calls.append((d.id or "", name or "", arguments or ""))
    except Exception as e:  # noqa: BLE001 - the client gets an error event, as on the other endpoints
        if isinstance(e, APIError):
            error = renamed(e)
        else:
            log.exception("error while streaming a response")
            error = APIError(500, "Internal error while streaming.", "internal_error")
        yield event("error", code=error.type, message=error.message, param=error.param)
        yield event("response.failed", response=builder.response("failed", [], error=error))
        return
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]  # at once when the client goes away
    output: list[dict[str, Any]] = []
    status = _status(finish)  # also the last item's: the one max_output_tokens cut, if it cut one
    if started or not calls:
        if not started:
            yield event("response.output_item.added", output_index=0, item=builder.message("", "in_progress"))
            yield event("response.content_part.added", **at, part=part)
        yield event("response.output_text.done", **at, text=text, logprobs=[])
        yield event("response.content_part.done", **at, part={**part, "text": text})
        output.append({**builder.message(text), "status": "completed" if calls else status})
        yield event("response.output_item.done", output_index=0, item=output[-1])
    for k, (call_id, name, arguments) in enumerate(calls):
        index, item = len(output), builder.call(call_id, name, "", "in_progress")
        yield event("response.output_item.added", output_index=index, item=item)
        yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                    delta=arguments)  # fmt: skip
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                    name=name, arguments=arguments)  # fmt: skip
        output.append(
            {**item, "arguments": arguments, "status": status if k == len(calls) - 1 else "completed"}
        )
        yield event("response.output_item.done", output_index=index, item=output[-1])
    yield event(f"response.{status}", response=builder.response(status, output, usage))
