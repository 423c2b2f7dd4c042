"""Structured output end to end: the real model behind `python -m server`, driven by the `openai` SDK.

Schemas here bound their strings, arrays and numbers, so that even at temperature 1 an answer completes
well within max_tokens (the JSON grammar allows no free whitespace)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.test_openai_client import MODEL, client, server_url  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.real_model]
ASK = [{"role": "user", "content": "Describe a fictional person as JSON."}]


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    names: list[Annotated[str, Field(max_length=12)]] = Field(max_length=3)
    vaccinated: bool


class Family(BaseModel):
    surname: str = Field(max_length=20)
    members: list[Person] = Field(max_length=2)
    pet: Pet | None = None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("model", [Person, Pet, Family])
def test_parse_validates(client: openai.OpenAI, model: type[BaseModel], temperature: float) -> None:  # noqa: F811
    for seed in range(2):
        done = client.chat.completions.parse(
            model=MODEL,
            messages=ASK,
            response_format=model,
            temperature=temperature,
            seed=seed,
            max_tokens=400,
        )  # type: ignore[arg-type]
        choice = done.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, model)


def test_json_object_parses_on_both_endpoints(client: openai.OpenAI) -> None:  # noqa: F811
    done = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format={"type": "json_object"},
        n=2,
        temperature=1.0,
        max_tokens=300,
    )  # type: ignore[arg-type]
    for choice in done.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content or ""), dict)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    }
    done_c = client.completions.create(
        model=MODEL, prompt="The capital of France as JSON:", max_tokens=40, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}},
    )  # fmt: skip
    assert done_c.choices[0].finish_reason == "stop"
    assert set(json.loads(done_c.choices[0].text)) == {"city"}


def test_json_schema_n3_streamed_validates_every_choice(client: openai.OpenAI) -> None:  # noqa: F811
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "p", "schema": Person.model_json_schema(), "strict": True},
    }
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, n=3, temperature=1.0, max_tokens=200, stream=True,
        logprobs=True, top_logprobs=2,
    )  # type: ignore[arg-type]  # fmt: skip
    texts, reasons = {0: "", 1: "", 2: ""}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert reasons == {0: "stop", 1: "stop", 2: "stop"}
    for text in texts.values():
        Person.model_validate_json(text)


def test_regex_and_choice_with_n(client: openai.OpenAI) -> None:  # noqa: F811
    pattern = r"[A-Z][a-z]{2,8} [0-9]{2}"
    done = client.completions.create(
        model=MODEL, prompt="A name and a number:", n=3, temperature=1.0, max_tokens=30,
        extra_body={"structured_outputs": {"regex": pattern}},
    )  # fmt: skip
    for choice in done.choices:
        assert choice.finish_reason == "stop" and re.fullmatch(pattern, choice.text), choice.text
    options = ["positive", "negative", "neutral"]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Sentiment of: I love it!"}], n=3, temperature=1.0,
        max_tokens=10, extra_body={"guided_choice": options},
    )  # type: ignore[arg-type]  # fmt: skip
    for choice in chat.choices:
        assert choice.finish_reason == "stop" and choice.message.content in options


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format.json_schema"),
        ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ],
)  # fmt: skip
def test_invalid_constraint_is_a_400_naming_the_field(client: openai.OpenAI, body: dict, param: str) -> None:  # noqa: F811
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body=body)  # type: ignore[arg-type]
    assert param in str(info.value)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(server_url: str, method: str) -> None:  # noqa: F811
    """LangChain's ChatOpenAI against this server: both of its structured-output methods (a response
    format, or a forced tool call) come back as a validated pydantic object."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{server_url}/v1",
        api_key="test-key",
        temperature=0,
        max_retries=0,
        max_tokens=300,
    )  # type: ignore[call-arg]
    structured = llm.with_structured_output(Person, method=method)  # type: ignore[arg-type]
    person = structured.invoke("Invent a person and describe them as JSON.")
    assert isinstance(person, Person) and person.name
