"""The HTTP layer over the real engine (scheduler, paged KV cache, sampler) on a tiny random model."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.tokenizer import Tokenizer
from server.engine.request import SamplingParams
from tests.server.conftest import TINY_MAX_MODEL_LEN, serve_tiny, tiny_settings
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
    joined = bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace")
    assert joined == data["choices"][0]["message"]["content"]

    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 2,
                                                   "echo": True, "logprobs": 1, "temperature": 0})  # fmt: skip
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and all(x is not None for x in lp["token_logprobs"][1:])
    scored = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 0,
                                                        "echo": True, "logprobs": 1})  # fmt: skip
    [choice] = scored.json()["choices"]
    assert choice["text"] == "a b c" and choice["logprobs"]["token_logprobs"] == lp["token_logprobs"][:-2]
    await wait_idle(engine)


async def test_prompt_logprobs_agree_with_echoed_logprobs_and_rank_the_prompt_token(
    tiny_client: tuple[httpx.AsyncClient, Any],
) -> None:
    client, engine = tiny_client
    prompt = [5, 17, 9, 33, 12, 40]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    echoed = (await client.post("/v1/completions", json={**body, "echo": True, "logprobs": 2})).json()
    r = await client.post("/v1/completions", json={**body, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    lps = r.json()["choices"][0]["prompt_logprobs"]
    assert lps[0] is None and len(lps) == len(prompt)
    want = echoed["choices"][0]["logprobs"]["token_logprobs"][1 : len(prompt)]
    for tid, at, logprob in zip(prompt[1:], lps[1:], want, strict=True):
        own = at[str(tid)]
        assert own["logprob"] == pytest.approx(logprob, abs=1e-6)
        top = sorted((v["rank"], v["logprob"]) for v in at.values() if v["rank"] <= 2)
        assert [rank for rank, _ in top] == [1, 2] and top[0][1] >= top[1][1]  # the top 2, ranked
        if own["rank"] > 2:  # outside the top 2: less likely than both
            assert own["logprob"] <= top[1][1] and len(at) == 3
    await wait_idle(engine)


async def test_a_prompt_that_fills_the_context_can_be_scored(
    tiny_client: tuple[httpx.AsyncClient, Any],
) -> None:
    """lm-eval's rolling log-likelihood sends windows of exactly the context with echo and max_tokens 0."""
    client, engine = tiny_client
    full = [5 + i % 50 for i in range(TINY_MAX_MODEL_LEN)]
    body = {"model": MODEL, "prompt": full, "max_tokens": 0, "echo": True, "logprobs": 0}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == TINY_MAX_MODEL_LEN and r.json()["usage"]["completion_tokens"] == 0
    r = await client.post("/v1/completions", json={**body, "prompt": [*full, 5]})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = await client.post("/v1/completions", json={**body, "max_tokens": 1, "echo": False})
    assert r.status_code == 400 and "no room for output" in r.json()["error"]["message"]
    await wait_idle(engine)


async def test_more_sequences_than_the_queue_holds_names_the_field_that_asked(
    tiny_client: tuple[httpx.AsyncClient, Any],
) -> None:
    client, _ = tiny_client
    for body, param in (
        ({"prompt": [[5]] * 300}, "prompt"),
        ({"prompt": [[5]] * 3, "n": 128, "best_of": 128}, "n"),
    ):
        r = await client.post("/v1/completions", json={"model": MODEL, "max_tokens": 1, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


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
    {"min_tokens": 2, "stop_token_ids": [0, 49151]}, {"stop": ["", "a" * 256]}, {"echo": True, "logprobs": 20},
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


async def test_stop_string_in_one_choice_aborts_only_that_choice(
    tiny_client: tuple[httpx.AsyncClient, Any],
) -> None:
    client, engine = tiny_client
    body: dict[str, Any] = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "seed": 3,
                            "temperature": 1.0, "n": 2, "ignore_eos": True}  # fmt: skip
    plain = (await client.post("/v1/completions", json=body)).json()["choices"]
    text0, text1 = plain[0]["text"], plain[1]["text"]
    stop = text0[len(text0) // 4 : len(text0) // 4 + 5]
    assert stop not in text1, "pick another seed: the stop string must hit choice 0 only"
    before = (await wait_idle(engine)).num_finished
    r = (await client.post("/v1/completions", json={**body, "stop": [stop]})).json()
    cut = {"text": text0[: text0.index(stop)], "finish_reason": "stop", "stop_reason": stop}
    assert r["choices"][0] == {**plain[0], **cut}
    assert r["choices"][1] == plain[1]  # the other choice is untouched and runs to its end
    after = (await wait_idle(engine)).num_finished
    assert after.get("abort", 0) - before.get("abort", 0) == 1  # choice 0 stopped in the engine too
    assert after["length"] - before["length"] == 1
    # Usage counts choice 0's tokens up to the one completing the stop string, as with n = 1.
    single = (await client.post("/v1/completions", json={**body, "n": 1, "stop": [stop]})).json()
    assert single["choices"][0]["text"] == r["choices"][0]["text"]
    assert r["usage"]["completion_tokens"] == single["usage"]["completion_tokens"] + 40


def scrape(text: str) -> dict[str, float]:
    """Samples by name, of the served model (every engine metric carries its `model_name`)."""
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.labels == {"model_name": MODEL}
    }


async def test_latency_histograms_count_requests_and_tokens(
    tiny_client: tuple[httpx.AsyncClient, Any],
) -> None:
    client, engine = tiny_client
    base = {"model": MODEL, "prompt": "hello", "ignore_eos": True, "temperature": 0}
    await asyncio.gather(
        client.post("/v1/completions", json={**base, "max_tokens": 5}),
        client.post("/v1/completions", json={**base, "max_tokens": 4, "n": 2, "stream": True}),
    )
    await wait_idle(engine)
    m = scrape((await client.get("/metrics")).text)
    p = "smollm2:"
    assert m[p + "request_queue_time_seconds_count"] == 2  # one per request, from the engine
    assert m[p + "time_to_first_token_seconds_count"] == 2
    assert m[p + "e2e_request_latency_seconds_count"] == 2  # per request, not per choice
    assert m[p + "inter_token_latency_seconds_count"] == (5 - 1) + 2 * (4 - 1)  # per choice, tokens - 1
    assert m[p + "generation_tokens_total"] == 13
    assert 0 < m[p + "request_queue_time_seconds_sum"] < m[p + "time_to_first_token_seconds_sum"]
    assert m[p + "time_to_first_token_seconds_sum"] < m[p + "e2e_request_latency_seconds_sum"]
    assert m[p + "request_time_per_output_token_seconds_count"] == 3  # per choice with 2+ tokens
    assert m[p + "request_prefill_time_seconds_count"] == m[p + "request_decode_time_seconds_count"] == 2
    assert m[p + "request_prompt_tokens_count"] == 2 and m[p + "request_generation_tokens_sum"] == 13
    assert 0 < m[p + "request_decode_time_seconds_sum"] < m[p + "e2e_request_latency_seconds_sum"]


async def test_health_is_503_once_the_engine_shut_down(tiny_client: tuple[httpx.AsyncClient, Any]) -> None:
    client, engine = tiny_client
    assert (await client.get("/health")).status_code == 200
    await engine.shutdown(graceful=True)
    assert (await client.get("/health")).status_code == 503


async def test_same_seed_gives_the_same_tokens_whatever_the_batch_fp32(
    tiny_client: tuple[httpx.AsyncClient, Any],
) -> None:
    """fp32: a seeded request's tokens do not depend on what runs beside it (here: one request alone
    for its first tokens, then two copies that join mid-way, with prefix-cache hits and other batch
    sizes). bf16 does not promise this (batch-dependent rounding; see the README's note on seeds)."""
    _, engine = tiny_client
    prompt, params = list(range(100, 140)), SamplingParams(max_tokens=48, seed=5, ignore_eos=True)

    async def tokens(outputs: Any) -> list[int]:
        return [t async for out in outputs for t in out.outputs[0].new_token_ids]

    first = engine.generate("first", prompt, params)
    head = [t for _ in range(6) for t in (await first.__anext__()).outputs[0].new_token_ids]
    joined = [tokens(engine.generate(f"copy{i}", prompt, params)) for i in range(2)]
    rest, *copies = await asyncio.gather(tokens(first), *joined)
    assert len(head + rest) == 48
    assert copies == [head + rest, head + rest]


async def test_speculative_ngram_gives_the_same_text_and_counts_drafts(tokenizer: Tokenizer) -> None:
    """The same random model (seeded) with and without --speculative-ngram over HTTP: the same greedy
    text, and the draft counters in /metrics."""
    body = {"model": MODEL, "prompt": "one two three one two three one two three one two", "max_tokens": 40,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    texts, samples = [], {}
    for k in (0, 3):
        async with serve_tiny(tokenizer, tiny_settings(speculative_ngram=k, speculative_ngram_min=1)) as (
            c,
            _,
        ):
            texts.append((await c.post("/v1/completions", json=body)).json()["choices"][0]["text"])
            metrics = (await c.get("/metrics")).text
        for family in text_string_to_metric_families(metrics):
            for s in family.samples:
                samples[(k, s.name)] = s.value
    assert texts[0] == texts[1]
    assert samples[(0, "smollm2:spec_decode_num_draft_tokens_total")] == 0
    assert samples[(3, "smollm2:spec_decode_num_draft_tokens_total")] > 0
    assert (3, "smollm2:spec_decode_acceptance_rate") in samples


async def test_usage_counts_the_prompt_tokens_the_prefix_cache_held(
    tiny_client: tuple[httpx.AsyncClient, Any],
) -> None:
    """usage.prompt_tokens_details.cached_tokens, as OpenAI's: a repeated prompt is mostly served from the
    cache (whole blocks), a new one not at all; streamed usage and chat say the same; n counts a prompt once."""
    client, engine = tiny_client
    prompt = "The same long opening of a prompt, asked twice: " + "one two three four five six " * 12
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    first = (await client.post("/v1/completions", json=body)).json()["usage"]
    again = (await client.post("/v1/completions", json={**body, "n": 2})).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert again["prompt_tokens"] == first["prompt_tokens"]
    assert first["prompt_tokens"] - 16 <= cached < first["prompt_tokens"] and cached % 16 == 0  # whole blocks
    r = await client.post(
        "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    usage = [json.loads(line[6:])["usage"] for line in r.text.splitlines() if line.startswith("data: {")][-1]
    assert usage["prompt_tokens_details"]["cached_tokens"] == cached
    chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
    await client.post("/v1/chat/completions", json=chat)
    usage = (await client.post("/v1/chat/completions", json=chat)).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
    response = {"model": MODEL, "input": prompt, "max_output_tokens": 2}
    usage = (await client.post("/v1/responses", json=response)).json()["usage"]  # the chat's prompt, cached
    assert usage["input_tokens_details"]["cached_tokens"] > 0
