"""Tool calling end to end: the real model behind `python -m server`, driven by the `openai` SDK."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pydantic
import pytest

from tests.server.test_openai_client import MODEL, client, server_url  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.real_model]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time",
        "parameters": {"type": "object", "properties": {}},
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def test_required_returns_valid_calls(client: openai.OpenAI) -> None:  # noqa: F811
    done = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, n=2, parallel_tool_calls=False,
        max_tokens=200,
    )  # type: ignore[arg-type]  # fmt: skip
    for choice in done.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls or []
        assert len(calls) == 1 and calls[0].id.startswith("call_")
        for call in calls:
            args = json.loads(call.function.arguments)  # type: ignore[union-attr]
            if call.function.name == "get_weather":  # type: ignore[union-attr]
                assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
            else:
                assert call.function.name == "get_time" and args == {}  # type: ignore[union-attr]


def test_named_function_streamed(client: openai.OpenAI) -> None:  # noqa: F811
    choice = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, temperature=0, max_tokens=100,
        stream=True,
    )  # type: ignore[arg-type]  # fmt: skip
    calls, reason = [], None
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            reason = c.finish_reason or reason
    assert reason == "stop" and len(calls) == 1  # OpenAI's for a named function ("tool_calls" for auto)
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert set(json.loads(calls[0].function.arguments)) == {"city", "unit"}


def test_a_forced_call_cut_by_max_tokens_is_a_call_with_the_arguments_so_far(client: openai.OpenAI) -> None:  # noqa: F811
    """OpenAI's: the call, its arguments cut where the limit fell, finish_reason "length"; the call's JSON
    wrapper the grammar writes is never content."""
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        args = dict(
            model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=choice, temperature=0, max_tokens=18
        )
        done = client.chat.completions.create(**args).choices[0]  # type: ignore[call-overload]
        [call] = done.message.tool_calls or []
        assert done.finish_reason == "length" and done.message.content is None
        assert call.function.name == "get_weather" and call.function.arguments.startswith("{")
        streamed, reasons = [], []
        for chunk in client.chat.completions.create(**args, stream=True):  # type: ignore[call-overload]
            for c in chunk.choices:
                assert not c.delta.content, c.delta.content
                streamed += c.delta.tool_calls or []
                reasons.append(c.finish_reason)
        assert [(c.function.name, c.function.arguments) for c in streamed] == [
            ("get_weather", call.function.arguments)
        ]
        assert reasons[-1] == "length"


def test_a_forced_call_is_not_cut_by_stop_strings_or_stop_tokens(
    client: openai.OpenAI,  # noqa: F811
    server_url: str,  # noqa: F811
) -> None:
    """Stop strings and stop tokens apply to text; a call forced by tool_choice required or named is held
    to its schema until whole, and a stop inside it would return arguments cut mid-JSON as a finished
    call (",", a stop string agents send, falls between every two arguments)."""
    comma = httpx.post(f"{server_url}/tokenize", json={"prompt": ","}).json()["tokens"]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        for stops in ({"stop": [",", "}"]}, {"extra_body": {"stop_token_ids": comma}}):
            for stream in (False, True):
                args = dict(
                    model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=choice, temperature=0, max_tokens=200,
                    parallel_tool_calls=False,
                )  # fmt: skip
                if not stream:
                    done = client.chat.completions.create(**args, **stops).choices[0]  # type: ignore[call-overload]
                    calls, reason = done.message.tool_calls or [], done.finish_reason
                else:
                    calls, reason = [], None
                    for chunk in client.chat.completions.create(**args, **stops, stream=True):  # type: ignore[call-overload]
                        for c in chunk.choices:
                            calls += c.delta.tool_calls or []
                            reason = c.finish_reason or reason
                assert reason == ("tool_calls" if choice == "required" else "stop"), (choice, stops, stream)
                [call] = calls
                assert set(json.loads(call.function.arguments)) == {"city", "unit"}, (choice, stops, stream)


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]  # an enum: pydantic writes it to $defs as well


class Cities(pydantic.BaseModel):
    """Weather in several cities."""

    cities: list[City] = pydantic.Field(max_length=2)


def test_a_forced_call_of_a_nested_pydantic_tool_follows_its_defs(client: openai.OpenAI) -> None:  # noqa: F811
    """pydantic's schemas reach their nested models through `$ref: #/$defs/...`, which must resolve where
    the tool's parameters sit inside the call schema (openai's pydantic_function_tool, instructor, llama-index
    send them); and a response_format beside a forced call (instructor's, OpenAI accepts it) shapes no text."""
    tool = openai.pydantic_function_tool(Cities)
    assert "$defs" in json.dumps(tool)
    asks = [{"role": "user", "content": "Weather in Paris and Rome, in celsius?"}]
    for choice, extra in (
        ({"type": "function", "function": {"name": "Cities"}}, {}),
        ("required", {"parallel_tool_calls": False}),
        ("required", {"parallel_tool_calls": False, "response_format": {"type": "json_object"}}),
    ):
        done = client.chat.completions.create(
            model=MODEL, messages=asks, tools=[tool], tool_choice=choice, temperature=0, max_tokens=200, **extra
        ).choices[0]  # type: ignore[call-overload]  # fmt: skip
        [call] = done.message.tool_calls or []
        assert done.finish_reason in ("stop", "tool_calls"), (choice, done.finish_reason)
        Cities.model_validate_json(call.function.arguments)  # type: ignore[union-attr]


def test_tool_result_round_trip(client: openai.OpenAI) -> None:  # noqa: F811
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, max_tokens=100,
    )  # type: ignore[arg-type]  # fmt: skip
    message = first.choices[0].message
    [call] = message.tool_calls or []
    history = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=40
    )  # type: ignore[arg-type]
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.choices[0].message.content or second.choices[0].message.tool_calls


def test_refused_fields_are_400s(client: openai.OpenAI) -> None:  # noqa: F811
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="x", suffix="y", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=2,
            tool_choice={"type": "function", "function": {"name": "missing"}},
        )  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="modalities"):
        client.chat.completions.create(model=MODEL, messages=ASK, modalities=["audio"], max_tokens=2)  # type: ignore[arg-type]
