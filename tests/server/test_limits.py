"""Every input a client controls is bounded before work proportional to it is done: each limit answers
a 4xx in OpenAI's shape naming the parameter, at once and without building what it bounds."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from model.tokenizer import Tokenizer
from server.app import create_app
from server.stop_strings import StopMatcher
from tests.server.conftest import FakeEngine, fake_settings
from tests.server.test_api import MODEL, assert_error

QUICK_S = 1.0  # the limits answer in well under 100 ms on a quiet machine; CI machines are shared


def threads_calling(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[str]:
    """The names of the threads that call `owner.name` from now on (the call still goes through)."""
    import threading

    threads: list[str] = []
    real = getattr(owner, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return threads


async def timed_post(client: httpx.AsyncClient, path: str, body: Any) -> tuple[httpx.Response, float, int]:
    """The response, its latency and the peak of Python memory allocated while it was made: the same
    (refused) request twice, timed without tracemalloc, whose tracing of every allocation made a large
    body's JSON several times slower, then traced."""
    t0 = time.perf_counter()
    r = await client.post(path, json=body)
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        again = await client.post(path, json=body)
        assert again.status_code == r.status_code
        return r, seconds, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
async def big_client(tokenizer: Tokenizer) -> Any:
    """The fake engine behind the real HTTP layer, with OpenAI's 1 MiB-class body limit."""
    engine = FakeEngine(tokenizer, max_waiting=256)
    app = create_app(fake_settings(max_body_bytes=2 * 1024 * 1024), engine=engine, tokenizer=tokenizer)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            yield c, engine


async def test_many_prompts_times_n_is_refused_before_fan_out(big_client: Any) -> None:
    client, engine = big_client
    body = {"model": MODEL, "prompt": [[1]] * 16384, "n": 128, "max_tokens": 1}
    r, seconds, peak = await timed_post(client, "/v1/completions", body)
    assert_error(r, 400, "2048 prompts")
    assert r.json()["error"]["param"] == "prompt"
    assert seconds < QUICK_S and peak < 32 * 1024 * 1024, (seconds, peak)
    # Under the prompt limit but over the queue: 429 before anything is tokenized or queued.
    r, seconds, _ = await timed_post(client, "/v1/completions", {**body, "prompt": [[1]] * 200, "n": 2})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert engine.submitted == [] and seconds < QUICK_S


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stop": [f"s{i}" for i in range(20_000)]}, "stop"),
        ({"stop": ["x" * 257]}, "stop"),
        ({"logit_bias": {str(i): 1.0 for i in range(49_000)}}, "logit_bias"),
        ({"stop_token_ids": list(range(5_000))}, "stop_token_ids"),
        ({"echo": True, "logprobs": 20, "n": 128, "max_tokens": 200}, "logprobs"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ],
    ids=["stop-count", "stop-length", "logit-bias", "stop-token-ids", "logprob-budget", "repetition-penalty"],
)
async def test_each_size_limit_is_a_quick_400_naming_its_parameter(
    big_client: Any, extra: dict[str, Any], param: str
) -> None:
    client, engine = big_client
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **extra}
    r, seconds, _ = await timed_post(client, "/v1/completions", body)
    error = assert_error(r, 400)
    assert error["param"] == param, error
    assert seconds < QUICK_S and engine.submitted == [], seconds


async def test_chat_logprob_budget_counts_choices_and_top_logprobs(big_client: Any) -> None:
    client, _ = big_client
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 128, "logprobs": True,
            "top_logprobs": 20, "max_tokens": 200, "ignore_eos": True}  # fmt: skip
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text[:300]
    r = await client.post("/v1/chat/completions", json={**body, "n": 2, "max_tokens": 20})
    assert r.status_code == 200, r.text[:300]


async def test_a_prompt_longer_than_any_context_is_refused_without_tokenizing(
    big_client: Any, monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer
) -> None:
    client, _ = big_client

    def never(*args: Any, **kwargs: Any) -> list[int]:
        raise AssertionError("tokenized a prompt that could not fit")

    monkeypatch.setattr(tokenizer, "encode", never)
    huge = "word " * 200_000  # 1 MB
    for path, body in [
        ("/v1/completions", {"model": MODEL, "prompt": huge}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": huge}]}),
    ]:
        r, seconds, _ = await timed_post(client, path, body)
        assert_error(r, 400, "context length")
        assert seconds < QUICK_S, (path, seconds)


async def test_a_prompt_whose_beginning_overflows_the_context_is_refused_after_a_bounded_probe(
    big_client: Any, monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer
) -> None:
    """Too short for the no-tokenization bound (any token may cover many characters), but its first part
    alone is more tokens than the context: only that part is tokenized."""
    client, engine = big_client
    seen: list[int] = []
    real = tokenizer.encode

    def spy(text: str, *args: Any, **kwargs: Any) -> list[int]:
        seen.append(len(text))
        return real(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", spy)
    text = "word " * 4000  # 20,000 characters, 4,000 tokens; the context is 256
    # a rendered template has no spaces to cut at, only newlines: ~24,000 characters of them
    messages = [{"role": "user", "content": "abcdefghij" * 10}] * 200
    for path, body in [
        ("/v1/completions", {"model": MODEL, "prompt": text}),
        ("/v1/chat/completions", {"model": MODEL, "messages": messages}),
    ]:
        r = await client.post(path, json=body)
        assert_error(r, 400, "context length")
    assert seen and max(seen) <= 256 * 8 and not engine.submitted


async def test_tokenize_counts_a_text_longer_than_the_context_off_the_event_loop(
    big_client: Any, monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer
) -> None:
    """A client measures a text before cutting it to fit (as vLLM's /tokenize): counted in full, the body
    limit bounding the work, on a worker thread."""
    import threading

    client, _ = big_client
    threads = threads_calling(monkeypatch, tokenizer, "encode")
    text = "word " * 100_000  # 100,000 tokens against a context of 256
    r = await client.post("/tokenize", json={"model": MODEL, "prompt": text})
    assert r.status_code == 200 and r.json()["count"] >= 100_000 and r.json()["max_model_len"] == 256
    assert threads and threading.main_thread().name not in threads
    messages = [{"role": "user", "content": "abcdefghij" * 10}] * 200
    r = await client.post("/tokenize", json={"model": MODEL, "messages": messages})
    assert r.status_code == 200 and r.json()["count"] > 200 * 10


async def test_long_prompts_that_fit_are_tokenized_off_the_event_loop(
    big_client: Any, monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer
) -> None:
    import threading

    client, engine = big_client
    threads = threads_calling(monkeypatch, tokenizer, "encode")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "ab " * 2000, "max_tokens": 1})
    assert r.status_code == 400 or r.status_code == 200  # fits the fake engine's context or not: no matter
    assert threads and threading.main_thread().name not in threads
    threads.clear()
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "short", "max_tokens": 1})
    assert r.status_code == 200 and threads == [threading.main_thread().name]  # no thread hop for short ones
    assert engine.submitted


async def test_lone_surrogates_are_a_400_not_a_500(big_client: Any) -> None:
    client, _ = big_client
    for body in (
        '{"model": "\\ud800", "prompt": "hi"}',
        '{"model": "SmolLM2-135M-Instruct", "prompt": "a\\udfff"}',
        '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "\\ud83d"}]}',
    ):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
        assert_error(r, 400, "surrogate")


# ---- stop strings: a bounded cost per character ---------------------------------------------------------


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool, int]:
    """The text kept before the first stop string, whether one was found, and the last held count."""
    state, text = 0, ""
    for piece in pieces:
        state, hit = matcher.feed(state, piece)
        if hit is not None:
            end, length = hit
            return (text + piece[:end])[: len(text) + end - length], True, 0
        text += piece
    return text, False, matcher.held(state)


@pytest.mark.parametrize(
    ("stops", "pieces", "expected"),
    [
        (["END"], ["The ", "E", "N", "D"], ("The ", True, 0)),
        (["abcd", "bc"], ["xab", "cd"], ("xa", True, 0)),  # "bc" completes first
        (["aaab"], ["aa", "aa", "ab!"], ("aa", True, 0)),  # the match restarts inside a failed one
        (["<|end|>", "\n\n"], ["one\n", "two <|e"], ("one\ntwo <|e", False, 3)),  # "<|e" held back
        (["xyz"], ["abc"], ("abc", False, 0)),
    ],
)
def test_stop_matcher_cuts_at_the_first_stop_and_holds_back_prefixes(
    stops: list[str], pieces: list[str], expected: tuple[str, bool, int]
) -> None:
    assert feed_all(StopMatcher(stops), pieces) == expected


def test_stop_matcher_agrees_with_a_plain_search() -> None:
    import random

    rng = random.Random(0)
    for _ in range(300):
        stops = [
            "".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))
        ]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        ends = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
        kept, found, _ = feed_all(StopMatcher(stops), list(text))
        if not ends:
            assert not found and kept == text
            continue
        end, neg_len = min(ends)  # the earliest end, the longest stop string ending there
        assert found and kept == text[: end + neg_len], (stops, text)


def test_stop_matching_cost_does_not_grow_with_the_number_of_stop_strings() -> None:
    few, many = StopMatcher(["zzzz"]), StopMatcher([f"{i:08d}z" for i in range(64)] + ["q" * 256])
    text = "0123456789 " * 2000

    def cost(matcher: StopMatcher) -> float:
        t0 = time.perf_counter()
        state = 0
        for i in range(0, len(text), 4):
            state, _ = matcher.feed(state, text[i : i + 4])
        return time.perf_counter() - t0

    cost(few)
    assert cost(many) < 5 * cost(few) + 0.01


def test_the_detokenizer_window_stays_bounded_on_invalid_utf8(tokenizer: Tokenizer) -> None:
    broken = next(t for t in range(tokenizer.vocab_size) if tokenizer.decode([t]) == "\ufffd")
    decoder = tokenizer.incremental_decoder()
    text = "".join(decoder.push([broken]) for _ in range(2000)) + decoder.flush()
    assert len(decoder._window) <= 16
    assert text.count("\ufffd") >= 2000 // 16


async def test_more_messages_than_the_context_has_tokens_are_refused_before_rendering(
    big_client: Any, monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer
) -> None:
    client, _ = big_client

    def never(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("rendered a conversation that could not fit")

    monkeypatch.setattr(tokenizer, "apply_chat_template", never)
    messages = [{"role": "user", "content": "a"}] * 20_000
    r, seconds, _ = await timed_post(client, "/v1/chat/completions", {"model": MODEL, "messages": messages})
    assert assert_error(r, 400, "20000 user and assistant messages")["param"] == "messages"
    assert seconds < QUICK_S


async def test_bodies_being_prepared_share_a_budget_and_admitted_requests_leave_it(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsed bodies waiting for a tokenizer thread could take many times their size each: past the
    budget a request is a quick 429; a request in the engine no longer counts."""
    import asyncio
    import threading

    engine = FakeEngine(tokenizer, max_waiting=64, delay=0.05)
    settings = fake_settings(max_body_bytes=64 * 1024, max_preparing_bytes=40_000)
    app = create_app(settings, engine=engine, tokenizer=tokenizer)
    gate = threading.Event()
    real = tokenizer.encode

    def held(text: str, *args: Any, **kwargs: Any) -> list[int]:
        if text.startswith("held"):
            assert gate.wait(30)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", held)
    long_prompt = "held " + "ab " * 9000  # ~27 KB of body, tokenized on a worker thread
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            first = asyncio.create_task(
                client.post("/v1/completions", json={"model": MODEL, "prompt": long_prompt, "max_tokens": 1})
            )
            while not any(t.name.startswith("asyncio") and t.is_alive() for t in threading.enumerate()):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the first is now tokenizing, its 27 KB counted
            r, seconds, _ = await timed_post(
                client, "/v1/completions", {"model": MODEL, "prompt": "x" * 20_000, "max_tokens": 1}
            )
            assert_error(r, 429, "retry")
            assert r.headers["retry-after"] == "1" and seconds < QUICK_S
            small = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}
            )
            assert small.status_code == 200  # a small body still fits beside it
            gate.set()
            assert (await first).status_code in (200, 400)
            # a request in the engine holds no budget: two large ones run at once
            body = {
                "model": MODEL,
                "prompt": "hi",
                "user": "u" * 25_000,
                "max_tokens": 30,
                "ignore_eos": True,
            }
            running = asyncio.create_task(client.post("/v1/completions", json=body))
            while not engine.running:
                await asyncio.sleep(0.01)
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert (await running).status_code == 200


def test_the_tokens_a_turn_takes_are_a_lower_bound_for_any_conversation(tokenizer: Tokenizer) -> None:
    """The bound refuses long conversations before rendering: it must never refuse one that fits."""
    from server.serving import ServingChat

    chat = ServingChat(FakeEngine(tokenizer), tokenizer, MODEL, 4096, None)
    assert chat.tokens_per_turn > 1  # ChatML: <|im_start|>, the role, a newline, <|im_end|>, a newline
    for content in ["", "hi", "a longer message, with punctuation."]:
        for first in ("user", "assistant"):
            roles = [first, "assistant" if first == "user" else "user"] * 20
            messages = [{"role": role, "content": content} for role in roles]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
            assert len(tokenizer.encode(text)) >= len(messages) * chat.tokens_per_turn


async def test_large_bodies_are_parsed_and_validated_off_the_event_loop(
    big_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies that arrive together would otherwise be validated back to back on the event loop, holding
    every running stream; a small one stays on the loop (no thread hop)."""
    import threading

    from server import protocol

    client, _ = big_client
    threads = threads_calling(monkeypatch, protocol, "_check_text")
    large = {"model": MODEL, "prompt": "ab " * 30_000, "max_tokens": 1}  # ~90 KB
    r = await client.post("/v1/completions", json=large)
    assert r.status_code == 400  # longer than the fake engine's context: validated all the same
    assert threads and threading.main_thread().name not in threads
    threads.clear()
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200 and set(threads) == {threading.main_thread().name}
    # an invalid large body is worded as any other: the field named, in OpenAI's shape
    r = await client.post("/v1/completions", json={**large, "temperature": "hot"})
    assert assert_error(r, 400, "temperature")["param"] == "temperature"
    r = await client.post("/v1/completions", content=b'{"prompt": "' + b"a" * 70_000 + b'"',
                          headers={"content-type": "application/json"})  # fmt: skip
    assert_error(r, 400, "not valid JSON")
    # JSON nested deeper than Python parses is a 400 too, large or small, and the connection serves on
    for depth in (40_000, 2_000):
        nested = b'{"model": "m", "prompt": "a", "x": ' + b"[" * depth + b"]" * depth + b"}"
        r = await client.post("/v1/completions", content=nested, headers={"content-type": "application/json"})
        assert_error(r, 400, "parsing the body")
    # a chunked body (no Content-Length) too, once its size is known; a small chunked one stays
    for body, off_loop in ((large, True), ({"model": MODEL, "prompt": "hi", "max_tokens": 1}, False)):
        threads.clear()
        data = json.dumps(body).encode()

        async def chunks(data: bytes = data) -> AsyncIterator[bytes]:
            for i in range(0, len(data), 16_384):
                yield data[i : i + 16_384]

        r = await client.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == (400 if off_loop else 200)
        assert (threading.main_thread().name not in threads) is off_loop and threads


async def test_long_token_lists_are_detokenized_off_the_event_loop(
    big_client: Any, monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer
) -> None:
    import threading

    client, _ = big_client
    ids = tokenizer.encode("The quick brown fox. " * 2000)  # ~10,000 ids
    text = tokenizer.decode(ids)
    threads = threads_calling(monkeypatch, tokenizer, "decode")
    r = await client.post("/detokenize", json={"model": MODEL, "tokens": ids})
    assert r.status_code == 200 and r.json()["prompt"] == text
    assert threads and threading.main_thread().name not in threads
    threads.clear()
    r = await client.post("/detokenize", json={"model": MODEL, "tokens": ids[:10]})
    assert r.status_code == 200 and threads == [threading.main_thread().name]
    r = await client.post("/detokenize", json={"model": MODEL, "tokens": [*ids, 10**6]})
    assert_error(r, 400, "outside the vocabulary")


async def test_serving_a_request_takes_no_hop_through_fastapis_thread_pool(
    big_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain-function dependency or route runs on a pool of 40 threads: every request would hop
    there and back, and a burst would queue behind it."""
    import fastapi.dependencies.utils
    import fastapi.routing

    client, _ = big_client
    hops: list[str] = []

    async def recorded(func: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return func(*args, **kwargs)

    monkeypatch.setattr(fastapi.dependencies.utils, "run_in_threadpool", recorded)
    monkeypatch.setattr(fastapi.routing, "run_in_threadpool", recorded)
    for path, body in [
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ),
        ("/tokenize", {"model": MODEL, "prompt": "hi"}),
    ]:
        assert (await client.post(path, json=body)).status_code == 200
    assert (await client.get("/v1/models")).status_code == 200
    assert hops == []


async def test_connections_that_declare_a_body_and_send_none_hold_no_budget(tokenizer: Tokenizer) -> None:
    """The budget counts bytes that arrived: idle connections declaring large (or chunked) bodies to an
    open route cannot lock every POST out; bodies that really arrive together past it still get a 429."""
    import asyncio

    from tests.server.test_connections import assert_openai_error, fake_app, post, read_all, serve, split

    limit = 64 * 1024
    app = fake_app(tokenizer, client_timeout=30, max_body_bytes=limit, max_preparing_bytes=2 * limit)
    head = b"POST /tokenize HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    chunked = head + b"transfer-encoding: chunked\r\n\r\n"
    completion = {"model": MODEL, "prompt": "Once", "max_tokens": 4}
    async with serve(app) as port:
        idle = []
        for start in [chunked] * 4 + [head + b"content-length: %d\r\n\r\n" % limit] * 4:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(start)
            idle.append((reader, writer))
        await asyncio.sleep(0.3)
        status, payload = await post(port, completion)
        assert status == 200, payload
        for _, writer in idle:
            writer.close()

        # two bodies of 60 KB arrived and wait for the rest; a third that arrives past the budget is refused
        held = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(chunked + b"%x\r\n" % 60_000 + b"[" * 60_000 + b"\r\n")
            held.append((reader, writer))
        await asyncio.sleep(0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chunked + b"%x\r\n" % 20_000 + b"[" * 20_000 + b"\r\n")
        status, headers, body = split(await read_all(reader, 10.0))
        writer.close()
        assert status == 429 and headers["retry-after"] == "1" and headers["connection"] == "close"
        assert "preparing" in assert_openai_error(body, 429)
        assert json.loads(body)["error"]["type"] == "rate_limit_error"
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.3)
        status, payload = await post(port, completion)  # their bytes no longer count
        assert status == 200, payload
