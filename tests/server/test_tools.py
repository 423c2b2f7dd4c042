"""Tool calling without a model: the plan read from a request, the default prompt format, parsing, and
the streaming filter."""

from __future__ import annotations

import json

import pytest

from server.protocol import APIError, ChatCompletionRequest
from server.tools import ToolPlan, ToolTextFilter, render_messages, tool_plan

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER, TIME], **fields}
    )


def test_plans() -> None:
    assert tool_plan(request()).mode == "auto"
    assert tool_plan(request(tool_choice="none")).mode == "none"
    required = tool_plan(request(tool_choice="required", parallel_tool_calls=False))
    schema = json.loads(required.spec.source)  # type: ignore[union-attr]
    assert schema["type"] == "array" and schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    named = tool_plan(request(tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert named.mode == "named" and json.loads(named.spec.source)["properties"]["name"] == {
        "const": "get_time"
    }  # type: ignore[union-attr]
    with pytest.raises(APIError, match="not among the tools"):
        tool_plan(request(tool_choice={"type": "function", "function": {"name": "nope"}}))
    with pytest.raises(APIError, match="only allowed when tools"):
        tool_plan(
            ChatCompletionRequest.model_validate(
                {"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}
            )
        )


# a call and its result, as chat messages (test_responses.py sends the same as Responses items)
CALL_ROUND_TRIP = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
]  # fmt: skip


def test_default_format_renders_tools_calls_and_results() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "messages": CALL_ROUND_TRIP,
            "tools": [WEATHER],
        }
    )  # fmt: skip
    out = render_messages(req.messages, tool_plan(req), native=False)
    assert (
        out[0]["role"] == "system"
        and out[0]["content"].startswith("Be brief.")
        and "<tools>" in out[0]["content"]
    )
    assert '"name": "get_weather", "arguments": {"city": "Paris"}' in out[2]["content"]
    assert out[3] == {"role": "user", "content": "<tool_response>\n18 C\n</tool_response>"}


def test_parse_auto_required_and_named() -> None:
    auto = tool_plan(request())
    content, calls = auto.parse(
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert (
        content == "Let me check." and calls[0].function.name == "get_weather"
    )  # as ToolTextFilter streams it
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"} and calls[0].id.startswith("call_")
    assert auto.parse("Just text.") == ("Just text.", [])
    assert auto.parse('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>')[1] == []
    _, calls = auto.parse('<tool_call>{"name": "get_time", "arguments": {}}')  # EOS before the closing tag
    assert [c.function.name for c in calls] == ["get_time"]
    required = tool_plan(request(tool_choice="required"))
    content, calls = required.parse(
        '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "X"}}]'
    )
    assert content is None and len(calls) == 2
    # cut by max_tokens (OpenAI's): the calls written whole, then the cut one with its arguments so far;
    # the grammar's wrapper is never content
    cut = '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Pa'
    content, calls = required.parse(cut)
    assert content is None and [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_time", "{}"),
        ("get_weather", '{"city": "Pa'),
    ]
    content, calls = required.parse('[{"name": "get_time", "arguments": {}}, {"name": "get_we')
    assert content is None and [c.function.name for c in calls] == ["get_time"]
    assert required.parse('[{"name": "get_weather"')[1][0].function.arguments == ""
    assert required.parse('[{"na') == (None, [])
    one = tool_plan(request(tool_choice="required", parallel_tool_calls=False))
    assert len(one.parse('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arg')[1]) == 1
    named = tool_plan(request(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    for text, arguments in (
        ('{"name": "get_weather", "arguments": {"city": "Pa', '{"city": "Pa'),
        ('{"na', ""),
    ):
        content, [call] = named.parse(text)
        assert content is None and (call.function.name, call.function.arguments) == ("get_weather", arguments)


def test_stream_filter_holds_back_what_may_be_a_call() -> None:
    f = ToolTextFilter(tool_plan(request()))
    sent = (
        f.feed("Sure. <tool")
        + f.feed('_call>\n{"name": "get_time", ')
        + f.feed('"arguments": {}}\n</tool_call>')
    )
    assert sent == "Sure."  # the space before a call is not content
    rest, calls = f.finish()
    assert rest == "" and [c.function.name for c in calls] == ["get_time"]
    plain = ToolTextFilter(tool_plan(request()))
    assert plain.feed("a <to") == "a" and plain.finish() == (" <to", [])


@pytest.mark.parametrize(
    "text",
    [
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "  Two spaces first, a tab last\t",
        'Text <tool_call>{"name": "unknown", "arguments": {}}</tool_call> after',
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
        "no call at all \n\n",
    ],
)
def test_streamed_content_equals_the_parsed_content(text: str) -> None:
    """A client gets the same content whether it streams or not, fed in any pieces."""
    plan = tool_plan(request())
    content, calls = plan.parse(text)
    for size in (1, 3, len(text)):
        f = ToolTextFilter(plan)
        sent = "".join(f.feed(text[i : i + size]) for i in range(0, len(text), size))
        rest, streamed_calls = f.finish()
        assert ((sent + rest) or None) == content
        assert [c.function.name for c in streamed_calls] == [c.function.name for c in calls]


def test_what_the_model_writes_in_a_call_never_fails_the_request() -> None:
    auto = tool_plan(request())
    for junk in (
        '{"name": ["get_time"], "arguments": {}}',  # not a string: unhashable
        '{"name": {"a": 1}, "arguments": {}}',
        '{"name": 7, "arguments": {}}',
        '{"name": "get_time", "arguments": ' + "[" * 5_000 + "]" * 5_000 + "}",  # deeper than Python parses
    ):
        text = f"<tool_call>{junk}</tool_call>"
        assert auto.parse(text) == (text, [])
        assert tool_plan(request(tool_choice="required")).parse(f"[{junk}]")[1] == []
    named = tool_plan(request(tool_choice={"type": "function", "function": {"name": "get_time"}}))
    _, calls = named.parse('{"name": "get_time", "arguments": {}}')
    assert named.finish_reason(calls, "stop") == "stop"  # OpenAI's for a function the request named
    assert (
        auto.finish_reason(calls, "stop") == "tool_calls" and auto.finish_reason(calls, "length") == "length"
    )
    # a forced call cut before its name is whole: no call, and the grammar's text is not content,
    # streamed as not streamed
    cut = ToolTextFilter(tool_plan(request(tool_choice="required")))
    assert cut.feed('[{"name": "get_') == "" and cut.finish() == ("", [])
    held = ToolTextFilter(ToolPlan("required", []))
    assert held.feed("[") == ""
