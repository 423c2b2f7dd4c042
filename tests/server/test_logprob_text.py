"""Legacy /v1/completions logprobs and output text where tokens are parts of UTF-8 characters, with the
scripted fake engine (tests/server/conftest.py) and the real SmolLM2 tokenizer."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from model.tokenizer import Tokenizer
from server.engine.request import SamplingParams, TokenLogprob
from tests.server.conftest import FakeEngine
from tests.server.test_api import complete, sse_chunks

# "日本の首都は、アニュ" cut before the last byte of "ュ" (its last token is b"\xe3\x83")
CUT_PROMPT = [
    23274,
    115,
    40993,
    26453,
    180,
    116,
    240,
    180,
    38466,
    7365,
    124,
    29917,
    10391,
    112,
    11100,
    229,
    11100,
]


def token_bytes(token: str) -> bytes:
    """A legacy logprobs token back to its bytes ("bytes:\\xe3\\x81" for part of a character)."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in re.findall(r"\\x([0-9a-f]{2})", token))
    return token.encode()


async def streamed(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    """A streamed completion's choice 0 joined: its text and logprobs lists."""
    r = await complete(client, stream=True, **body)
    choices = [c for e in sse_chunks(r.text) for c in e["choices"]]
    lp: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in choices:
        for k in lp:
            lp[k] += (c["logprobs"] or {}).get(k, [])
    return {"text": "".join(c["text"] for c in choices), "logprobs": lp}


async def both(client: httpx.AsyncClient, **body: Any) -> list[dict[str, Any]]:
    r = await complete(client, **body)
    assert r.status_code == 200, r.text
    return [r.json()["choices"][0], await streamed(client, **body)]


# ---- byte tokens are named apart ----------------------------------------------------------------------


async def test_byte_tokens_are_named_by_their_bytes_and_keys_stay_distinct(
    client: httpx.AsyncClient, fake_engine: FakeEngine, tokenizer: Tokenizer
) -> None:
    # the fake's top entries are the script's first tokens: several are single bytes of a character
    fake_engine.script = tokenizer.encode("日本の首都は東京です")
    for echo in (False, True):
        n = len(fake_engine.script)
        body = {"prompt": "日本の首都は", "max_tokens": n, "temperature": 0, "logprobs": 5, "echo": echo}
        for choice in await both(client, **body):
            lp, text = choice["logprobs"], choice["text"]
            assert "bytes:\\xe6\\x97" in lp["tokens"]  # 日 is split: b"\xe6\x97" + b"\xa5"
            assert b"".join(token_bytes(t) for t in lp["tokens"]).decode() == text
            first = 1 if echo else 0  # an echoed prompt's first token has no logprobs
            for token, value, top in zip(lp["tokens"][first:], lp["token_logprobs"][first:],
                                         lp["top_logprobs"][first:], strict=True):  # fmt: skip
                assert len(top) == 5 and top[token] == value, (token, top)
                assert not any("\ufffd" in key for key in top), top
            for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
                if not token.startswith("bytes:"):
                    assert text[offset : offset + len(token)] == token
                assert 0 <= offset <= len(text)
            assert lp["text_offset"] == sorted(lp["text_offset"])


# ---- the chosen token is always listed ------------------------------------------------------------------


def outside_top(fake_engine: FakeEngine) -> None:
    """The fake's logprobs list N tokens that are never the chosen one (as sampling at temperature > 0 can)."""

    def logprob(token_id: int, params: SamplingParams) -> TokenLogprob | None:
        if params.logprobs is None:
            return None
        others = [t for t in dict.fromkeys(fake_engine.script) if t != token_id][: params.logprobs]
        return TokenLogprob(token_id, -7.5, 40, [(t, -1.0 - k) for k, t in enumerate(others)])

    fake_engine._logprob = logprob  # type: ignore[method-assign]


@pytest.mark.parametrize("top_n", [0, 2])
async def test_the_chosen_token_is_listed_even_outside_the_top_n(
    client: httpx.AsyncClient, fake_engine: FakeEngine, top_n: int
) -> None:
    outside_top(fake_engine)
    for echo in (False, True):
        body = {"prompt": "Hi you there", "max_tokens": 4, "temperature": 0.7, "seed": 3, "logprobs": top_n,
                "echo": echo}  # fmt: skip
        for choice in await both(client, **body):
            lp = choice["logprobs"]
            first = 1 if echo else 0
            assert lp["top_logprobs"][:first] == [None] * first
            for token, value, top in zip(lp["tokens"][first:], lp["token_logprobs"][first:],
                                         lp["top_logprobs"][first:], strict=True):  # fmt: skip
                assert value == -7.5 and top[token] == -7.5 and len(top) == top_n + 1, (token, top)


async def test_chat_top_logprobs_stay_the_top_n(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    outside_top(fake_engine)
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0.7, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    content = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]["logprobs"][
        "content"
    ]
    assert len(content) == 3
    for entry in content:
        assert len(entry["top_logprobs"]) == 2 and entry["token"] not in [
            t["token"] for t in entry["top_logprobs"]
        ]


# ---- a prompt of ids that ends inside a character -------------------------------------------------------


def test_incomplete_tail(tokenizer: Tokenizer) -> None:
    assert tokenizer.incomplete_tail(CUT_PROMPT) == b"\xe3\x83"
    assert tokenizer.incomplete_tail(CUT_PROMPT[:-1]) == b""  # ends with the whole "ニ"
    assert tokenizer.incomplete_tail(tokenizer.encode("Hello 日本")) == b""
    assert tokenizer.incomplete_tail(tokenizer.encode("日")[:1]) == b"\xe6\x97"
    assert tokenizer.incomplete_tail([]) == b""
    decoder = tokenizer.incremental_decoder(lead=b"\xe3\x83")
    assert decoder.push(tokenizer.encode("ュ")[1:]) == "ュ" and not decoder.lead_dropped
    decoder = tokenizer.incremental_decoder(lead=b"\xe3\x83")
    assert decoder.push(tokenizer.encode("A cat")) == "A cat" and decoder.lead_dropped


@pytest.mark.parametrize(
    ("output", "text", "echoed"),
    [
        ("ュラグ", "ュラグ", ""),  # the output's first byte completes the prompt's "ュ"
        # it does not: the prompt's incomplete bytes are not the output's text; echoed, they show as U+FFFD
        ("A cat", "A cat", "\ufffd"),
    ],
)
async def test_output_completing_the_prompts_last_character_shows_it(
    client: httpx.AsyncClient,
    fake_engine: FakeEngine,
    tokenizer: Tokenizer,
    output: str,
    text: str,
    echoed: str,
) -> None:
    script = tokenizer.encode("日本の首都は、アニ" + output)[len(CUT_PROMPT) :]
    if output.isascii():
        script = tokenizer.encode(output)
    fake_engine.script = script
    base = {"prompt": CUT_PROMPT, "max_tokens": len(script), "temperature": 0}
    for choice in await both(client, **base):
        assert choice["text"] == text
    for choice in await both(client, **base, echo=True, logprobs=1):
        assert choice["text"] == tokenizer.decode(CUT_PROMPT + script) == "日本の首都は、アニ" + echoed + text
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(CUT_PROMPT) + len(script)
        assert lp["text_offset"][len(CUT_PROMPT)] == len("日本の首都は、アニ" + echoed)  # the output's text
        assert lp["text_offset"] == sorted(lp["text_offset"])
        assert b"".join(token_bytes(t) for t in lp["tokens"]).decode("utf-8", "replace") == choice["text"]
    for choice in await both(
        client, **base, stop=["ラ"]
    ):  # a stop string right after the completed character
        assert choice["text"] == text.split("ラ")[0]


async def test_a_prompt_cut_inside_a_character_echoes_it_whole_when_nothing_follows(
    client: httpx.AsyncClient, fake_engine: FakeEngine, tokenizer: Tokenizer
) -> None:
    fake_engine.script = []  # EOS at once
    for max_tokens in (0, 1):
        for choice in await both(client, prompt=CUT_PROMPT, max_tokens=max_tokens, echo=True):
            assert choice["text"] == tokenizer.decode(CUT_PROMPT), max_tokens
    for choice in await both(client, prompt=CUT_PROMPT, max_tokens=1):
        assert choice["text"] == ""
