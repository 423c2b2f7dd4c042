"""Structured output, tools and refused fields over the ASGI app with the scripted fake engine: what
reaches the engine, the 400s, and how a tool call in the text becomes OpenAI's tool_calls."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from model.tokenizer import Tokenizer
from server.engine.request import StructuredSpec
from tests.server.conftest import FakeEngine
from tests.server.test_api import MODEL, sse_chunks

pytest.importorskip("xgrammar")
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
CHAT = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


async def post(client: httpx.AsyncClient, path: str, **body: Any) -> httpx.Response:
    return await client.post(path, json={"model": MODEL, "max_tokens": 4, **body})


@pytest.mark.parametrize(
    ("body", "spec"),
    [
        ({"guided_regex": "[0-9]+"}, StructuredSpec("regex", "[0-9]+")),
        ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredSpec("choice", '["a", "b"]')),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredSpec("json", json.dumps(SCHEMA))),
        ({"guided_json": json.dumps(SCHEMA)}, StructuredSpec("json", json.dumps(SCHEMA))),
        ({"response_format": {"type": "json_object"}}, StructuredSpec("json_object")),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
         StructuredSpec("json", json.dumps(SCHEMA))),
        ({"response_format": {"type": "text"}}, None),
    ],
)  # fmt: skip
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_constraint_reaches_the_engine(
    client: httpx.AsyncClient, fake_engine: FakeEngine, path: str, body: dict, spec: StructuredSpec | None
) -> None:
    prompt = {"prompt": "x"} if path == "/v1/completions" else {"messages": CHAT}
    r = await post(client, path, **prompt, **body, n=2)
    assert r.status_code == 200, r.text
    assert fake_engine.submitted[-1][2].structured == spec


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"guided_json": {"type": "nope"}}, "guided_json"),
        ({"guided_regex": "(("}, "guided_regex"),
        ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
        ({"suffix": "tail"}, "suffix"),
        ({"best_of": 3}, "best_of"),
    ],
)  # fmt: skip
async def test_bad_requests_are_400s_naming_the_field(
    client: httpx.AsyncClient, fake_engine: FakeEngine, body: dict, param: str
) -> None:
    before = len(fake_engine.submitted)
    r = await post(client, "/v1/completions", prompt="x", **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert len(fake_engine.submitted) == before  # nothing was queued


async def test_a_constraint_that_compiles_too_large_is_a_400(
    client: httpx.AsyncClient, fake_engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each running sequence holds its compiled grammar, and an enum of 15,000 values compiles to 24 MB:
    past MAX_GRAMMAR_BYTES (16 MiB; 100 KiB here, so the request stays small) a constraint is refused."""
    import server.engine.structured as structured

    monkeypatch.setattr(
        structured, "MAX_GRAMMAR_BYTES", 100 * 2**10
    )  # 3,000 values: 0.2 MiB; an object: 0.05
    before = len(fake_engine.submitted)
    schema = {"enum": [f"v{i}" for i in range(3000)]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    r = await post(client, "/v1/chat/completions", messages=CHAT, response_format=fmt)
    assert r.status_code == 400, r.text
    assert (
        r.json()["error"]["param"] == "response_format.json_schema" and "MiB" in r.json()["error"]["message"]
    )
    assert len(fake_engine.submitted) == before
    r = await post(client, "/v1/chat/completions", messages=CHAT, response_format={"type": "json_object"})
    assert r.status_code == 200, r.text  # a small one still passes


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages.0.role"),
    ],
)  # fmt: skip
async def test_chat_refusals(client: httpx.AsyncClient, body: dict, param: str) -> None:
    r = await post(client, "/v1/chat/completions", **{"messages": CHAT, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_ignored_fields_are_accepted(client: httpx.AsyncClient) -> None:
    extra = {
        "store": True,
        "metadata": {"k": "v"},
        "service_tier": "auto",
        "user": "u",
        "reasoning_effort": "low",
    }
    r = await post(client, "/v1/chat/completions", messages=CHAT, modalities=["text"], **extra)
    assert r.status_code == 200, r.text


async def test_required_tool_choice_constrains_to_an_array_of_calls(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    r = await post(client, "/v1/chat/completions", messages=CHAT, tools=[WEATHER], tool_choice="required")
    assert r.status_code == 200, r.text
    spec = fake_engine.submitted[-1][2].structured
    assert spec is not None and spec.kind == "json" and json.loads(spec.source)["type"] == "array"
    prompt = fake_engine.tokenizer.decode(fake_engine.submitted[-1][1])
    assert "<tools>" in prompt and "get_weather" in prompt


CALL = 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
async def test_auto_tool_call_in_the_text_becomes_tool_calls(
    client: httpx.AsyncClient, fake_engine: FakeEngine, tokenizer: Tokenizer, stream: bool
) -> None:
    fake_engine.script = tokenizer.encode(CALL)
    body = {
        "messages": CHAT,
        "tools": [WEATHER],
        "temperature": 0,
        "max_tokens": 60,
        "stop": ["</tool_call>"],
    }
    r = await post(client, "/v1/chat/completions", **body, stream=stream)
    assert r.status_code == 200, r.text
    if not stream:
        [choice] = r.json()["choices"]
        message = choice["message"]
    else:
        chunks = sse_chunks(r.text)
        deltas = [c["choices"][0] for c in chunks if c["choices"]]
        choice = deltas[-1]
        message = {
            "content": "".join(d["delta"].get("content") or "" for d in deltas),
            "tool_calls": [t for d in deltas for t in d["delta"].get("tool_calls") or []],
        }
        assert all("tool_call" not in (d["delta"].get("content") or "") for d in deltas)
    assert choice["finish_reason"] == "tool_calls"
    assert message["content"] == "Checking."
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
