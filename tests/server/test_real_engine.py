"""The HTTP layer over the real engine (scheduler, paged KV cache, sampler) on a tiny random model."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.server.test_api import MODEL, sse_chunks


async def wait_idle(engine: Any, timeout: float = 20.0) -> Any:
    """Stats once nothing runs, waits or holds KV blocks (the engine frees them a step after an abort)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = engine.stats()
        if (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0):
            return stats
        assert asyncio.get_running_loop().time() < deadline, f"engine not idle: {stats}"
        await asyncio.sleep(0.05)


async def test_seeded_stream_equals_non_stream_and_multi_token_stop(
    tiny_client: tuple[httpx.AsyncClient, Any],
) -> None:
    client, engine = tiny_client
    body: dict[str, Any] = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "seed": 11,
                            "temperature": 1.0, "n": 2, "ignore_eos": True}  # fmt: skip
    plain = (await client.post("/v1/completions", json=body)).json()
    texts = [c["text"] for c in plain["choices"]]
    assert all(c["finish_reason"] == "length" for c in plain["choices"])
    assert plain["usage"]["completion_tokens"] == 48
    assert texts[0] != texts[1]  # n choices are sampled independently

    r = await client.post("/v1/completions", json={**body, "stream": True})
    streamed = ["", ""]
    for chunk in sse_chunks(r.text):
        for c in chunk["choices"]:
            streamed[c["index"]] += c["text"]
    assert streamed == texts

    # A stop string taken from the middle of choice 0 (it spans several tokens): cut there, and aborted.
    stop = texts[0][len(texts[0]) // 3 : len(texts[0]) // 3 + 6]
    cut = (await client.post("/v1/completions", json={**body, "n": 1, "stop": [stop]})).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == texts[0][: texts[0].index(stop)]
    await wait_idle(engine)


async def test_chat_and_logprobs_on_real_sampler(tiny_client: tuple[httpx.AsyncClient, Any]) -> None:
    client, engine = tiny_client
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "logprobs": True, "top_logprobs": 3, "ignore_eos": True}  # fmt: skip
    data = (await client.post("/v1/chat/completions", json=body)).json()
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == data["usage"]["completion_tokens"] == 5
    for entry in content:
        assert len(entry["top_logprobs"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] == max(t["logprob"] for t in entry["top_logprobs"])
    assert "".join(e["token"] for e in content) == data["choices"][0]["message"]["content"]

    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 2,
                                                   "echo": True, "logprobs": 1, "temperature": 0})  # fmt: skip
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and all(x is not None for x in lp["token_logprobs"][1:])
    await wait_idle(engine)


async def test_prompt_too_long_for_context(tiny_client: tuple[httpx.AsyncClient, Any]) -> None:
    client, _ = tiny_client
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": list(range(5, 1100)), "max_tokens": 1}
    )
    assert r.status_code == 400 and "1024" in r.json()["error"]["message"]
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1024})
    assert r.status_code == 400 and "1024" in r.json()["error"]["message"]


EXTREMES = [
    {"top_k": 10**12}, {"top_k": 0}, {"seed": 2**63 - 1, "n": 3}, {"seed": -(2**63)}, {"n": 128},
    {"logprobs": 20}, {"logit_bias": {"0": 100, "49151": -100}}, {"min_p": 1.0}, {"top_p": 1e-9},
    {"repetition_penalty": 2.0, "presence_penalty": 2, "frequency_penalty": -2}, {"temperature": 1e-9},
    {"min_tokens": 2, "stop_token_ids": [0, 49151]}, {"stop": ["", "a" * 1000]}, {"echo": True, "logprobs": 20},
    {"prompt": [49151] * 10}, {"prompt": [[0], [1, 2]], "n": 2},
]  # fmt: skip


async def test_extreme_valid_values_never_break_the_engine(
    tiny_client: tuple[httpx.AsyncClient, Any],
) -> None:
    """Values at the edges of what validation accepts reach the real sampler; none may kill the engine."""
    client, engine = tiny_client
    for extra in EXTREMES:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **extra}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, (extra, r.text)
        r = await client.post("/v1/completions", json={**body, "stream": True})
        assert r.status_code == 200 and '"error"' not in r.text, (extra, r.text)
        assert engine.is_healthy, extra
    await wait_idle(engine)
