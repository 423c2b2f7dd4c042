"""vLLM's request extras that clients migrating from vLLM send: honoured, or refused by name (never ignored).

Over the ASGI app with the scripted fake engine (conftest.py), which replies with SCRIPT's tokens.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import httpx
import pytest

from model.tokenizer import Tokenizer
from tests.server.conftest import MAX_MODEL_LEN, SCRIPT, FakeEngine, fake_client
from tests.server.test_api import MODEL, assert_error, complete, sse_chunks


async def chat(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("model", MODEL)
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return await client.post("/v1/chat/completions", json=body)


def last_choice(r: httpx.Response, stream: bool) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return sse_chunks(r.text)[-1]["choices"][0] if stream else r.json()["choices"][0]


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_reason_names_the_stop_string_or_token_that_ended_a_choice(
    client: httpx.AsyncClient, tokenizer: Tokenizer, stream: bool
) -> None:
    fox = tokenizer.encode(SCRIPT)[3]  # " fox"
    cases = [
        ({"stop": ["zzz", "brown f"]}, "stop", "brown f"),  # a stop string that spans two tokens
        ({"stop_token_ids": [fox]}, "stop", fox),
        ({"max_tokens": 3}, "length", None),
        ({"max_tokens": 200}, "stop", None),  # EOS is no stop reason, as vLLM reports it
    ]
    for body, finish, reason in cases:
        body = {"max_tokens": 40, "temperature": 0, "stream": stream, **body}
        choice = last_choice(await complete(client, prompt="x", **body), stream)
        assert (choice["finish_reason"], choice["stop_reason"]) == (finish, reason), body
        choice = last_choice(await chat(client, **body), stream)
        assert (choice["finish_reason"], choice["stop_reason"]) == (finish, reason), body
    if stream:  # chunks before the last carry a null stop_reason
        r = await complete(client, prompt="x", max_tokens=40, stream=True, stop="lazy")
        assert [c["choices"][0]["stop_reason"] for c in sse_chunks(r.text)][:-1] == [None] * (
            len(sse_chunks(r.text)) - 1
        )


async def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(
    client: httpx.AsyncClient, fake_engine: FakeEngine, tokenizer: Tokenizer
) -> None:
    long = " ".join(f"w{i}" for i in range(400))  # more tokens than the 256-token context
    full = tokenizer.encode(long)
    assert len(full) > MAX_MODEL_LEN
    assert_error(await complete(client, prompt=long, max_tokens=2), 400, "context")
    r = await complete(client, prompt=long, max_tokens=2, truncate_prompt_tokens=10, echo=True)
    assert r.status_code == 200, r.text
    assert fake_engine.submitted[-1][1] == full[-10:]
    assert r.json()["usage"]["prompt_tokens"] == 10
    assert r.json()["choices"][0]["text"].startswith(tokenizer.decode(full[-10:]))  # echo: what was run
    r = await complete(client, prompt=[full, full[:5]], max_tokens=1, truncate_prompt_tokens=10)
    assert [s[1] for s in fake_engine.submitted[-2:]] == [full[-10:], full[:5]]  # shorter ones whole
    r = await complete(client, prompt=long, max_tokens=1, truncate_prompt_tokens=-1)
    assert r.status_code == 200, r.text
    assert fake_engine.submitted[-1][1] == full[-(MAX_MODEL_LEN - 1) :]  # all the context holds
    assert_error(await complete(client, prompt="x", truncate_prompt_tokens=0), 400, "truncate_prompt_tokens")
    assert_error(await complete(client, prompt="x", truncate_prompt_tokens=-2), 400, "truncate_prompt_tokens")

    messages = [{"role": "user", "content": long}]
    assert_error(await chat(client, messages=messages, max_tokens=2), 400, "context")
    r = await chat(client, messages=messages, max_tokens=2, truncate_prompt_tokens=12)
    assert r.status_code == 200, r.text
    rendered = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert fake_engine.submitted[-1][1] == rendered[-12:]
    assert r.json()["usage"]["prompt_tokens"] == 12


async def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(
    client: httpx.AsyncClient, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode(SCRIPT)
    r = await complete(client, prompt="x", max_tokens=4, logprobs=2, return_tokens_as_token_ids=True)
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in ids[:4]]
    assert all(re.fullmatch(r"token_id:\d+", k) for top in lp["top_logprobs"] for k in top)
    r = await chat(client, max_tokens=4, logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in ids[:4]]
    assert all(re.fullmatch(r"token_id:\d+", t["token"]) for c in content for t in c["top_logprobs"])
    r = await complete(client, prompt="x", max_tokens=4, logprobs=1)  # by default, the tokens' text
    assert "".join(r.json()["choices"][0]["logprobs"]["tokens"]) == tokenizer.decode(ids[:4])


async def test_skip_special_tokens_false_shows_control_tokens_in_the_text(
    client: httpx.AsyncClient, tokenizer: Tokenizer
) -> None:
    assert tokenizer.eos_token_id is not None
    eos = tokenizer.decode([tokenizer.eos_token_id])
    assert eos.startswith("<|")
    body = {"max_tokens": 200, "temperature": 0, "include_stop_str_in_output": True}  # the EOS stays
    shown = (await complete(client, prompt="x", skip_special_tokens=False, **body)).json()["choices"][0]
    hidden = (await complete(client, prompt="x", **body)).json()["choices"][0]
    assert shown["text"] == hidden["text"] + eos
    r = await chat(client, skip_special_tokens=False, stream=True, **body)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_chunks(r.text))
    assert text.endswith(eos)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_beam_search", True),
        ("bad_words", [" fox"]),
        ("allowed_token_ids", [1, 2]),
        ("logits_processors", ["my.module:Processor"]),
    ],
)
async def test_vllm_extras_this_server_cannot_honour_are_refused_by_name(
    client: httpx.AsyncClient, field: str, value: Any
) -> None:
    assert assert_error(await complete(client, prompt="x", **{field: value}), 400, field)["param"] == field
    assert_error(await chat(client, **{field: value}), 400, field)
    # their defaults, which some clients always send, change nothing
    default: Any = False if isinstance(value, bool) else []
    assert (await complete(client, prompt="x", max_tokens=1, **{field: default})).status_code == 200


async def test_a_chat_template_sent_with_the_request_is_refused_not_ignored(
    client: httpx.AsyncClient,
) -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    error = assert_error(await chat(client, chat_template=template), 400, "chat template")
    assert error["param"] == "chat_template"
    assert (await chat(client, chat_template=None, max_tokens=1)).status_code == 200


async def test_chat_top_logprobs_0_without_logprobs_asks_for_nothing(client: httpx.AsyncClient) -> None:
    r = await chat(client, max_tokens=2, top_logprobs=0)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, r.text
    assert_error(await chat(client, max_tokens=2, top_logprobs=1), 400, "logprobs")


async def test_return_token_ids_gives_the_prompt_and_output_ids(
    client: httpx.AsyncClient, fake_engine: FakeEngine, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode(SCRIPT)
    prompt = tokenizer.encode("Hello there")
    r = await complete(client, prompt="Hello there", max_tokens=5, n=2, return_token_ids=True)
    for choice in r.json()["choices"]:
        assert choice["prompt_token_ids"] == prompt
        assert len(choice["token_ids"]) == 5 and tokenizer.decode(choice["token_ids"]) == choice["text"]
    chunks = sse_chunks((await complete(client, prompt="Hello there", max_tokens=5, stream=True,
                                        return_token_ids=True, stop="lazy")).text)  # fmt: skip
    assert chunks[0]["choices"][0]["prompt_token_ids"] == prompt
    assert all("prompt_token_ids" not in c["choices"][0] for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == ids[:5]

    everything = ids * 3 + [tokenizer.eos_token_id]  # the fake engine's whole reply: its script 3 times, EOS
    r = await chat(client, max_tokens=200, return_token_ids=True)  # ends with EOS: counted, in the ids
    data = r.json()
    assert data["prompt_token_ids"] == fake_engine.submitted[-1][1]
    assert data["choices"][0]["token_ids"] == everything
    assert len(data["choices"][0]["token_ids"]) == data["usage"]["completion_tokens"]
    chunks = sse_chunks((await chat(client, max_tokens=200, stream=True, return_token_ids=True)).text)
    assert chunks[0]["prompt_token_ids"] == fake_engine.submitted[-1][1]
    assert [t for c in chunks for t in c["choices"][0].get("token_ids") or []] == everything
    # not asked for: not in the JSON at all (no nulls in every chunk)
    r = await complete(client, prompt="x", max_tokens=2)
    assert "token_ids" not in r.json()["choices"][0] and "prompt_token_ids" not in r.json()["choices"][0]
    chunks = sse_chunks((await chat(client, max_tokens=2, stream=True)).text)
    assert all("prompt_token_ids" not in c and "token_ids" not in c["choices"][0] for c in chunks)


async def test_prompt_logprobs_give_each_prompt_tokens_logprob_by_id(
    client: httpx.AsyncClient, fake_engine: FakeEngine, tokenizer: Tokenizer
) -> None:
    prompt = tokenizer.encode("The quick brown fox")
    r = await complete(client, prompt="The quick brown fox", max_tokens=2, prompt_logprobs=2)
    assert r.status_code == 200, r.text
    lps = r.json()["choices"][0]["prompt_logprobs"]
    assert fake_engine.submitted[-1][2].prompt_logprobs == 2
    assert len(lps) == len(prompt) and lps[0] is None
    for tid, at in zip(prompt[1:], lps[1:], strict=True):
        assert at[str(tid)]["decoded_token"] == tokenizer.decode([tid])
        assert 1 <= len(at) <= 3  # the prompt's own token and the top 2
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in at.values())
    # with echo + logprobs too: each keeps its own N
    r = await complete(
        client, prompt="The quick brown fox", max_tokens=1, echo=True, logprobs=1, prompt_logprobs=3
    )
    assert fake_engine.submitted[-1][2].prompt_logprobs == 3
    choice = r.json()["choices"][0]
    assert all(top is None or len(top) <= 2 for top in choice["logprobs"]["top_logprobs"])
    assert len(choice["prompt_logprobs"]) == len(prompt)

    r = await chat(client, max_tokens=2, prompt_logprobs=0)
    data = r.json()
    assert len(data["prompt_logprobs"]) == len(fake_engine.submitted[-1][1]) == data["usage"]["prompt_tokens"]
    assert all(len(at) == 1 for at in data["prompt_logprobs"][1:])
    # not with a stream, out of range, and not in the JSON unless asked
    assert_error(await complete(client, prompt="x", stream=True, prompt_logprobs=1), 400, "stream")
    assert_error(await chat(client, stream=True, prompt_logprobs=1), 400, "stream")
    assert_error(await complete(client, prompt="x", prompt_logprobs=21), 400, "prompt_logprobs")
    assert_error(await complete(client, prompt="x", prompt_logprobs=-1), 400, "prompt_logprobs")
    assert "prompt_logprobs" not in (await complete(client, prompt="x", max_tokens=1)).json()["choices"][0]
    assert "prompt_logprobs" not in (await chat(client, max_tokens=1)).json()


async def test_tokenize_returns_token_strings_when_asked(
    client: httpx.AsyncClient, tokenizer: Tokenizer
) -> None:
    r = await client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    data = r.json()
    assert (
        data["token_strs"] == [tokenizer.id_to_token(t) for t in data["tokens"]] and len(data["tokens"]) == 2
    )
    r = await client.post(
        "/tokenize", json={"messages": [{"role": "user", "content": "hi"}], "return_token_strs": True}
    )
    assert len(r.json()["token_strs"]) == r.json()["count"]
    assert (await client.post("/tokenize", json={"prompt": "Hello"})).json().get("token_strs") is None


async def test_a_text_prompt_gets_the_tokenizers_own_additions_as_tokenize_counts_them(
    tokenizer: Tokenizer,
) -> None:
    """A tokenizer.json whose post-processor adds a BOS (Llama-style folders): completions run the same ids
    /tokenize reports (vLLM's add_special_tokens, default true); add_special_tokens false leaves it out."""
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.encode("<|endoftext|>")[0]
    tok = copy.copy(tokenizer)
    backend = copy.deepcopy(tokenizer._backend)
    backend.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    tok._backend = backend
    engine = FakeEngine(tok)
    async with fake_client(engine, tok) as c:
        counted = (await c.post("/tokenize", json={"prompt": "Hello world"})).json()["tokens"]
        assert counted[0] == bos
        r = await complete(c, prompt="Hello world", max_tokens=1)
        assert engine.submitted[-1][1] == counted and r.json()["usage"]["prompt_tokens"] == len(counted)
        await complete(c, prompt="Hello world", max_tokens=1, add_special_tokens=False)
        assert engine.submitted[-1][1] == counted[1:]


async def test_an_engine_refusal_names_the_field_it_is_about(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ValueError(
            "logit_bias names token 5, outside the vocabulary [0, 4)"
        )  # a model smaller than its tokenizer

    fake_engine.generate = refuse  # type: ignore[method-assign]
    error = assert_error(await complete(client, prompt="x", logit_bias={"5": 1}), 400, "logit_bias")
    assert error["param"] == "logit_bias"


async def test_the_models_other_eos_ids_stop_every_request_unless_eos_is_ignored(
    tokenizer: Tokenizer,
) -> None:
    """generation_config.json's eos_token_id list (the tokenizer's extra_eos_token_ids) joins each request's
    stop_token_ids, as vLLM adds them; the text stops at them as at EOS."""
    im_end = tokenizer.encode("<|im_end|>")[0]
    fox = tokenizer.encode(SCRIPT)[3]

    class WithExtraEos(Tokenizer):
        extra_eos_token_ids = (fox, im_end)

    tok = copy.copy(tokenizer)
    tok.__class__ = WithExtraEos
    engine = FakeEngine(tok)
    async with fake_client(engine, tok) as c:
        r = await complete(c, prompt="x", max_tokens=20, temperature=0, stop_token_ids=[7])
        assert engine.submitted[-1][2].stop_token_ids == [7, fox, im_end]
        assert r.json()["choices"][0]["text"] == "The quick brown"  # stopped at " fox"
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        await complete(c, prompt="x", max_tokens=20, ignore_eos=True)
        assert engine.submitted[-1][2].stop_token_ids == []


@pytest.mark.parametrize(
    "choice", [None, "auto", "required", "none", {"type": "function", "function": {"name": "get_time"}}]
)
async def test_tokenize_counts_a_chat_with_tools_as_the_chat_request_runs_it(
    client: httpx.AsyncClient, fake_engine: FakeEngine, choice: Any
) -> None:
    """A named tool_choice renders that tool alone: /tokenize's count is the request's prompt_tokens."""
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
    tools = [weather, {"type": "function", "function": {"name": "get_time"}}]
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools}
    if choice is not None:
        body["tool_choice"] = choice
    counted = (await client.post("/tokenize", json=body)).json()
    r = await chat(client, max_tokens=1, **body)
    assert r.status_code == 200, r.text
    assert counted["tokens"] == fake_engine.submitted[-1][1]
    assert counted["count"] == r.json()["usage"]["prompt_tokens"]
