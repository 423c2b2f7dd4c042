"""Tool calling on /v1/chat/completions: how tools reach the prompt, what constrains the output, and how
the model's text becomes OpenAI `tool_calls`.

Prompt: a chat template that knows tools (it mentions `tools`) gets them as transformers passes them.
SmolLM2's template does not, so the default format below (Hermes / Qwen style, which small instruct
models follow best) is written into the system message: the tools as JSON inside <tools></tools>, and
each call asked for as {"name": ..., "arguments": {...}} inside <tool_call></tool_call>. Past assistant
calls are rendered in that same form, and tool results as a user turn inside <tool_response>.

Output: tool_choice "required" constrains the output to a JSON array of calls (one at most with
parallel_tool_calls false), a named function to one call object of that function; both use the
arguments' JSON schema. "auto" leaves the model free and parses the <tool_call> blocks it writes.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from server.engine.request import StructuredSpec
from server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    FunctionCall,
    TokenizeChatRequest,
    ToolCall,
)

ToolMode = Literal["none", "auto", "required", "named"]

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN_TAG) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE_TAG) + r"|$)", re.DOTALL)


# the start of one call as the call schema's grammar writes it: its name (group 1) and where its arguments
# begin (group 2), each present once written whole
_CALL_HEAD = re.compile(r'\s*\{\s*(?:"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*(?:,\s*"arguments"\s*:\s*()|$)?)?')


def _call_schema(tool: ChatTool, at: str = "#") -> dict[str, Any]:
    """One call of `tool` as a JSON schema: {"name": <its name>, "arguments": <its parameters>}, placed at
    the JSON pointer `at` of the whole output schema."""
    arguments = tool.function.parameters or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            "arguments": _rebased(arguments, at + "/properties/arguments"),
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _rebased(schema: Any, at: str) -> Any:
    """`schema` with its local references (`#/$defs/X`, `#/properties/v`, `#`) pointing where it now sits,
    at `at` inside the call schema: pydantic writes a `$defs` and `$ref`s to it for every nested model and
    enum, and those would no longer resolve from the call schema's root. Copied without recursion: the
    schema may nest as deep as the body's JSON did."""
    root: list[Any] = [schema]
    stack: list[tuple[Any, Any]] = [(root, 0)]  # (a copied container, a key or index in it to copy)
    while stack:
        parent, key = stack.pop()
        node = parent[key]
        if isinstance(node, dict):
            node = dict(node)
            ref = node.get("$ref")
            if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
                node["$ref"] = at + ref[1:]
            stack.extend((node, k) for k, v in node.items() if isinstance(v, dict | list))
        elif isinstance(node, list):
            node = list(node)
            stack.extend((node, k) for k, v in enumerate(node) if isinstance(v, dict | list))
        parent[key] = node
    return root[0]


@dataclass
class ToolPlan:
    """What a chat request's tools mean for its prompt, its output constraint and its response."""

    mode: ToolMode
    tools: list[ChatTool] = field(default_factory=list)
    parallel: bool = True
    spec: StructuredSpec | None = None  # the output constraint of "required" and "named"

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    def finish_reason(self, calls: list[ToolCall], reason: str | None) -> str | None:
        """OpenAI's: "tool_calls" when the model chose to call (auto, required), "stop" when the request
        named the function."""
        return "tool_calls" if calls and reason == "stop" and self.mode != "named" else reason

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of one finished choice; calls is empty when the text holds none."""
        if self.mode in ("required", "named"):
            try:
                value = json.loads(text)
            except RecursionError:  # nested deeper than Python parses: the text is all there is
                return text, []
            except ValueError:
                return None, self._cut_calls(text)
            calls = self._calls(value if isinstance(value, list) else [value])
            return (None, calls) if calls else (text, [])
        if self.mode == "none" or OPEN_TAG not in text:
            return text, []
        items = []
        for block in _BLOCK.findall(text):
            try:
                items.append(json.loads(block))
            except (ValueError, RecursionError):  # not a call: the model's text is free here
                continue
        calls = self._calls(items)
        if not calls:
            return text, []
        return text[: text.index(OPEN_TAG)].rstrip() or None, calls  # what ToolTextFilter streams

    def _cut_calls(self, text: str) -> list[ToolCall]:
        """The calls of a required or named output that max_tokens cut (the grammar holds it to the call
        schema, so nothing else makes it invalid JSON): the calls written whole, then the cut one with
        the arguments written so far, as OpenAI returns a call cut by the length limit (its
        finish_reason says so). A call cut before its name is whole is left out."""
        items, at = [], 0
        if self.mode == "required":
            at = text.find("[") + 1
            decoder = json.JSONDecoder()
            while at:
                at = len(text) - len(text[at:].lstrip(" \t\n\r,"))
                try:
                    item, at = decoder.raw_decode(text, at)
                except (ValueError, RecursionError):
                    break
                items.append(item)
        calls = self._calls(items)
        head = _CALL_HEAD.match(text, at)
        name = self.tools[0].function.name if self.mode == "named" else None
        if head and head.group(1):
            name = _loads_or(head.group(1), None)
        if name in self.names and (self.parallel or not calls) and at < len(text):
            arguments = text[head.end() :].rstrip() if head and head.group(2) is not None else ""
            calls.append(_new_call(name, arguments))
        return calls

    def _calls(self, items: list[Any]) -> list[ToolCall]:
        calls = []
        names = self.names
        for item in items:  # the model wrote them: anything JSON can hold
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("name"), str)
                or item["name"] not in names
            ):
                continue
            arguments = item.get("arguments", item.get("parameters", {}))
            if isinstance(arguments, str):  # some models write the arguments as a JSON string already
                arguments = _loads_or(arguments, arguments)
            calls.append(_new_call(item["name"], json.dumps(arguments, ensure_ascii=False)))
        return calls if self.parallel else calls[:1]


def _new_call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))


def _loads_or(text: str, default: Any) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return default


def tool_plan(req: ChatCompletionRequest | TokenizeChatRequest) -> ToolPlan:
    """Read tools / tool_choice / parallel_tool_calls; 400 for a choice that names no given tool. /tokenize's
    chat form reads them the same way, so that its count is the chat request's prompt_tokens."""
    choice = req.tool_choice
    tools = req.tools or []
    parallel = req.parallel_tool_calls is not False
    if choice is not None and choice != "none" and not tools:
        raise APIError(400, "tool_choice is only allowed when tools are specified.", param="tool_choice")
    if not tools or choice == "none":
        return ToolPlan("none")
    if choice is None or choice == "auto":
        return ToolPlan("auto", tools, parallel)
    if choice == "required":
        call = {"anyOf": [_call_schema(t, f"#/items/anyOf/{i}") for i, t in enumerate(tools)]}
        schema = {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return ToolPlan("required", tools, parallel, StructuredSpec("json", json.dumps(schema)))
    named = [t for t in tools if t.function.name == choice.function.name]  # type: ignore[union-attr]
    if not named:
        raise APIError(
            400, f"tool_choice names the function {choice.function.name!r}, which is not among the tools.",  # type: ignore[union-attr]
            param="tool_choice",
        )  # fmt: skip
    return ToolPlan("named", named, False, StructuredSpec("json", json.dumps(_call_schema(named[0]))))


def _tool_call_text(call: ToolCall) -> str:
    arguments = _loads_or(call.function.arguments, call.function.arguments)
    return f"{OPEN_TAG}\n{json.dumps({'name': call.function.name, 'arguments': arguments})}\n{CLOSE_TAG}"


def render_messages(messages: list[ChatMessage], plan: ToolPlan, native: bool) -> list[dict[str, Any]]:
    """Plain messages for the chat template. `native`: the template renders tools itself (it is given
    them, and messages keep tool_calls / tool_call_id); otherwise the default format above."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": m.text()}
        if native:
            if m.tool_calls:
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
        elif m.tool_calls:
            msg["content"] = "\n".join(
                [m.text()] * bool(m.text()) + [_tool_call_text(c) for c in m.tool_calls]
            )
        elif role == "tool":
            msg = {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
        out.append(msg)
    if native or plan.mode == "none":
        return out
    listing = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in plan.tools)
    system = TOOLS_PROMPT.format(tools=listing)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}".strip()}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


class ToolTextFilter:
    """Streaming with tools: passes content through until a tool call may begin, then holds the rest
    (the calls are sent whole once the choice has finished). Required / named calls are all held."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""  # everything fed
        self._sent = 0

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.plan.mode in ("required", "named"):
            return ""
        text = self.text
        end = text.find(OPEN_TAG, max(0, self._sent - len(OPEN_TAG)))
        if end < 0:
            end = len(text) - _partial_tag(text)
        while end > self._sent and text[end - 1].isspace():  # not content if a call follows: held
            end -= 1
        out, self._sent = text[self._sent : max(end, self._sent)], max(end, self._sent)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, calls) once the choice has finished: what `parse` makes of the whole
        text, as the response not streamed has it."""
        content, calls = self.plan.parse(self.text)
        if calls:
            return "", calls
        if self.plan.mode in ("required", "named"):  # nothing was sent: held whole
            self._sent = len(self.text)
            return content or "", []
        rest, self._sent = self.text[self._sent :], len(self.text)
        return rest, []


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that begins OPEN_TAG."""
    for k in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if text.endswith(OPEN_TAG[:k]):
            return k
    return 0
