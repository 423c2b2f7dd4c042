"""The server's check of structured-output constraints: compiles never queue without bound, never take the
pool that tokenizes prompts, and a constraint compiled once is not compiled again."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.engine.request import StructuredSpec
from server.guided import GrammarChecker
from server.protocol import APIError

pytestmark = pytest.mark.timeout(30)


class GatedChecker(GrammarChecker):
    """Compiles nothing: each compile waits for `gate`, and specs with source "bad" fail."""

    def __init__(self) -> None:
        super().__init__(tokenizer=None)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.compiled: list[str] = []

    def _compile(self, spec: StructuredSpec) -> None:
        assert self.gate.wait(20)
        if spec.source == "bad":
            raise ValueError("no such grammar")
        self.compiled.append(spec.source)


async def test_compiles_past_the_limit_get_429_at_once_and_the_rest_complete() -> None:
    checker = GatedChecker()
    waiting = [
        asyncio.ensure_future(checker.check(StructuredSpec("regex", f"a{{{i}}}"), "regex"))
        for i in range(GrammarChecker.MAX_COMPILING)
    ]
    await asyncio.sleep(0.05)
    with pytest.raises(APIError) as e:
        await asyncio.wait_for(checker.check(StructuredSpec("regex", "b"), "regex"), 1)
    assert e.value.status_code == 429 and e.value.param == "regex"
    # the default executor (prompts are tokenized there) is free while the compiles wait
    assert await asyncio.wait_for(asyncio.to_thread(lambda: 7), 1) == 7
    checker.gate.set()
    await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert len(checker.compiled) == GrammarChecker.MAX_COMPILING


async def test_a_valid_constraint_compiles_once_and_a_bad_one_is_a_400() -> None:
    checker = GatedChecker()
    checker.gate.set()
    spec = StructuredSpec("json", '{"type": "string"}')
    for _ in range(3):
        await checker.check(spec, "response_format")
    assert checker.compiled == [spec.source]
    with pytest.raises(APIError) as e:
        await checker.check(StructuredSpec("grammar", "bad"), "structured_outputs.grammar")
    assert e.value.status_code == 400 and "no such grammar" in e.value.message
    with pytest.raises(APIError):  # a bad one is not remembered as good
        await checker.check(StructuredSpec("grammar", "bad"), "structured_outputs.grammar")


async def test_a_burst_with_one_new_constraint_waits_on_one_compile() -> None:
    """An agent that starts 20 requests with the schema it just made: one compile, no 429, and a client
    that goes away meanwhile does not cancel it for the others."""
    checker = GatedChecker()
    spec = StructuredSpec("json", '{"type": "integer"}')
    burst = [asyncio.ensure_future(checker.check(spec, "response_format")) for _ in range(20)]
    await asyncio.sleep(0.05)
    burst[0].cancel()
    checker.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*burst[1:], return_exceptions=True), 10)
    assert results == [None] * 19 and checker.compiled == [spec.source]
    bad = [
        asyncio.ensure_future(checker.check(StructuredSpec("grammar", "bad"), "guided_grammar"))
        for _ in range(3)
    ]
    errors = await asyncio.gather(*bad, return_exceptions=True)
    assert all(isinstance(e, APIError) and e.status_code == 400 for e in errors)


async def test_a_compile_nobody_waits_for_any_more_is_dropped_before_it_begins() -> None:
    """8 slow schemas sent and abandoned must not keep the compile thread (and the 429 limit) busy for
    all of them: one whose requests all went away is dropped unless it has begun."""
    checker = GatedChecker()
    running = asyncio.ensure_future(checker.check(StructuredSpec("regex", "a{10000}"), "regex"))
    queued = asyncio.ensure_future(checker.check(StructuredSpec("regex", "b{10000}"), "regex"))
    await asyncio.sleep(0.05)
    queued.cancel()
    await asyncio.sleep(0.05)
    assert len(checker._inflight) == 1  # its place in the limit is free again
    checker.gate.set()
    await asyncio.wait_for(running, 10)
    checker._pool.shutdown(wait=True)
    assert checker.compiled == ["a{10000}"]
