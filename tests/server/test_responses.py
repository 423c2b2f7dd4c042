"""OpenAI's Responses API (`POST /v1/responses`) over the ASGI app, with the scripted fake engine: the
request reaches the engine as the chat request it stands for, and the answer comes back in the
Responses API's shape, streamed as its typed events."""

from __future__ import annotations

import json
from typing import Any

import httpx

from model.tokenizer import Tokenizer
from tests.server.conftest import SCRIPT, FakeEngine
from tests.server.test_api import MODEL, assert_error
from tests.server.test_tools import CALL_ROUND_TRIP


def events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of a Responses stream; asserts each event's name is its data's type."""
    out = []
    for block in filter(None, body.split("\n\n")):
        name, data = block.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: "), block
        parsed = json.loads(data.removeprefix("data: "))
        assert parsed["type"] == name.removeprefix("event: ")
        out.append((parsed["type"], parsed))
    return out


async def test_a_response_is_the_chat_answer_in_the_responses_shape(
    client: httpx.AsyncClient, fake_engine: FakeEngine, tokenizer: Tokenizer
) -> None:
    body = {"model": MODEL, "input": "Hello there", "instructions": "Be brief.", "max_output_tokens": 5}
    r = await client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert fake_engine.submitted[-1][1] == prompt
    assert data["object"] == "response" and data["id"].startswith("resp_") and data["model"] == MODEL
    assert data["status"] == "incomplete" and data["incomplete_details"] == {"reason": "max_output_tokens"}
    [message] = data["output"]
    assert (
        message["type"] == "message" and message["role"] == "assistant" and message["status"] == "incomplete"
    )
    assert message["content"][0]["text"] == tokenizer.decode(tokenizer.encode(SCRIPT)[:5])
    assert data["usage"]["input_tokens"] == len(prompt) and data["usage"]["output_tokens"] == 5
    assert data["usage"]["total_tokens"] == len(prompt) + 5 and data["store"] is False


async def test_input_items_are_the_conversation(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    """Message items (text parts), a function call and its output: the same prompt as chat's messages."""
    call = {
        "type": "function_call",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    items = [
        {"type": "message", "role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "in Paris?"}]},
        call,
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
        {"type": "reasoning", "id": "rs_1", "summary": []},  # another model's: skipped
    ]  # fmt: skip
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    r = await client.post(
        "/v1/responses", json={"model": MODEL, "input": items, "tools": [tool], "max_output_tokens": 2}
    )
    assert r.status_code == 200, r.text
    chat = {
        "model": MODEL,
        "max_tokens": 2,
        "tools": [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}],
        "messages": CALL_ROUND_TRIP,
    }
    assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
    assert fake_engine.submitted[-1][1] == fake_engine.submitted[-2][1]


async def test_the_stream_is_the_responses_events(client: httpx.AsyncClient, tokenizer: Tokenizer) -> None:
    body = {"model": MODEL, "input": "Hello there", "max_output_tokens": 6, "stream": True}
    r = await client.post("/v1/responses", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    stream = events(r.text)
    kinds = [kind for kind, _ in stream]
    assert kinds[:4] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"
    ]  # fmt: skip
    assert kinds[-4:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"
    ]  # fmt: skip
    assert [data["sequence_number"] for _, data in stream] == list(range(len(stream)))
    text = "".join(data["delta"] for kind, data in stream if kind == "response.output_text.delta")
    final = stream[-1][1]["response"]
    assert text == tokenizer.decode(tokenizer.encode(SCRIPT)[:6]) == final["output"][0]["content"][0]["text"]
    assert final["usage"]["output_tokens"] == 6 and final["status"] == "incomplete"
    assert (
        stream[0][1]["response"]["status"] == "in_progress" and stream[0][1]["response"]["id"] == final["id"]
    )
    # the item max_output_tokens cut is "incomplete" in its own done event too, as in the final response
    [done] = [data["item"] for kind, data in stream if kind == "response.output_item.done"]
    assert (
        done["status"] == final["output"][0]["status"] == "incomplete" and done["content"][0]["text"] == text
    )
    body = {**body, "max_output_tokens": 200}  # ends at EOS: completed everywhere
    stream = events((await client.post("/v1/responses", json=body)).text)
    [done] = [data["item"] for kind, data in stream if kind == "response.output_item.done"]
    assert done["status"] == stream[-1][1]["response"]["output"][0]["status"] == "completed"


async def test_what_the_server_cannot_do_is_a_400_naming_the_field(client: httpx.AsyncClient) -> None:
    async def post(**fields: Any) -> httpx.Response:
        return await client.post("/v1/responses", json={"model": MODEL, "input": "hi", **fields})

    assert_error(await post(previous_response_id="resp_1"), 400, "previous_response_id")
    assert_error(await post(background=True), 400, "background")
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]
    assert assert_error(await post(input=image), 400, "input_image")["param"] == "input[0].content"
    assert assert_error(await post(input=[{"type": "computer_call"}]), 400)["param"] == "input[0]"
    assert assert_error(await post(input=["hi", 2]), 400, "must be an object")["param"] == "input[0]"
    assert assert_error(await post(tools=[{"type": "web_search"}]), 400)["param"] == "tools[0]"
    too_long = assert_error(await post(max_output_tokens=10**9), 400, "max_output_tokens")
    assert too_long["param"] == "max_output_tokens" and "max_tokens" not in too_long["message"]
    assert assert_error(await post(temperature=5), 400)["param"] == "temperature"
    assert assert_error(await post(input=[{"role": "wizard", "content": "x"}]), 400)["param"].startswith(
        "input"
    )
    assert_error(await post(model="gpt-4"), 404, "gpt-4")
    # each error names the field as this request sent it, the item by its place in input
    call = {"type": "function_call", "name": "f", "arguments": "{}"}
    assert assert_error(await post(input=[call]), 400, "call_id")["param"] == "input[0].call_id"
    bad_role = [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]
    assert assert_error(await post(instructions="Be brief.", input=bad_role), 400)["param"] == "input[1].role"
    output = {"type": "function_call_output", "call_id": "c"}
    assert assert_error(await post(input=[output]), 400)["param"] == "input[0].output"
    tool = {"type": "function", "name": "f", "parameters": "not a schema"}
    assert assert_error(await post(tools=[tool]), 400)["param"] == "tools[0].parameters"
    assert assert_error(await post(tools=[{"type": "function"}]), 400)["param"] == "tools[0].name"
    unnamed = {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    assert assert_error(await post(text=unnamed), 400)["param"] == "text.format.name"
    assert assert_error(await post(tool_choice="sometimes"), 400)["param"] == "tool_choice"
    named = {"type": "function", "name": "max_tokens"}  # a client's own string is not renamed
    tools = [{"type": "function", "name": "f"}]
    assert "'max_tokens'" in assert_error(await post(tools=tools, tool_choice=named), 400)["message"]
    assert_error(await post(input=[{"type": "item_reference", "id": "msg_1"}]), 400, "store: false")
    assert assert_error(await post(metadata={"a": {"b": 1}}), 400)["param"].startswith("metadata")
