"""Fixtures for the HTTP layer: a scripted fake engine that honours the AsyncEngine contract, and clients."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from model.tokenizer import Tokenizer
from server.app import create_app
from server.engine.request import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob
from server.serving import EngineDeadError, QueueFullError
from server.settings import Settings

SCRIPT = "The quick brown fox jumps over the lazy dog. Then it sleeps under a tree until the sun goes down."
MAX_MODEL_LEN = 256


class FakeEngine:
    """Replies with SCRIPT's tokens (shifted by the seed when sampling), one token per output, then EOS.

    It follows the AsyncEngine contract: delta outputs, leaving the iterator early aborts, QueueFullError
    at the waiting limit, EngineDeadError once `dead` is set. `running` and `aborted` let tests check
    that the server cleaned up.
    """

    def __init__(self, tokenizer: Tokenizer, max_waiting: int = 8, delay: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.script = tokenizer.encode(SCRIPT)
        self.max_waiting = max_waiting
        self.delay = delay
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.aborted_choices: list[tuple[str, int]] = []  # abort(request_id, index) calls
        self.submitted: list[tuple[str, list[int], SamplingParams]] = []
        self.dead = False
        self.max_model_len = MAX_MODEL_LEN

    @property
    def is_healthy(self) -> bool:
        return not self.dead

    def stats(self) -> dict[str, Any]:
        return {"num_running": len(self.running), "num_waiting": 0, "kv_cache_usage": 0.1 * len(self.running)}

    def check_capacity(self, num_sequences: int) -> None:
        if self.dead:
            raise EngineDeadError("the engine loop died")
        if len(self.running) + num_sequences > self.max_waiting:
            raise QueueFullError(f"{len(self.running)} requests are waiting (limit {self.max_waiting})")

    def abort(self, request_id: str, index: int | None = None) -> None:
        if index is not None:
            self.aborted_choices.append((request_id, index))
            return
        if request_id in self.running:
            self.running.discard(request_id)
            self.aborted.append(request_id)

    def _tokens(self, params: SamplingParams, index: int) -> list[int]:
        shift = 0 if params.greedy else ((params.seed or 0) + index) % 3
        eos = [] if params.ignore_eos else [self.tokenizer.eos_token_id]
        return (self.script[shift:] * 3)[:MAX_MODEL_LEN] + eos

    def _logprob(self, token_id: int, params: SamplingParams) -> TokenLogprob | None:
        if params.logprobs is None:
            return None
        top = [(token_id, -0.25)] + [
            (t, -2.0 - k) for k, t in enumerate(self.script[: params.logprobs]) if t != token_id
        ]
        return TokenLogprob(token_id, -0.25, 1, top[: params.logprobs])

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        group_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Refuses at once, as the real engine does; the stream itself is lazy."""
        if self.dead:
            raise EngineDeadError("the engine loop died")
        if request_id in self.running:  # as the real engine
            raise ValueError(f"request id {request_id!r} is already running")
        if len(self.running) >= self.max_waiting:
            raise QueueFullError(f"{len(self.running)} requests are waiting (limit {self.max_waiting})")
        self.submitted.append((request_id, list(prompt_token_ids), params))
        self.running.add(request_id)
        return self._stream(request_id, prompt_token_ids, params)

    async def _stream(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        streams = [self._tokens(params, i) for i in range(params.n)]
        limit = min(params.max_tokens or MAX_MODEL_LEN, MAX_MODEL_LEN - len(prompt_token_ids))
        prompt_lp = None
        if params.prompt_logprobs is not None:
            prompt_lp = [None] + [
                self._logprob(t, SamplingParams(logprobs=params.prompt_logprobs))
                for t in prompt_token_ids[1:]
            ]
        completed = False
        try:
            for step in range(limit):
                await asyncio.sleep(self.delay)
                outputs = []
                for i, tokens in enumerate(streams):
                    if step >= len(tokens):
                        continue
                    if (request_id, i) in self.aborted_choices:  # as the engine: "abort", no more tokens
                        outputs.append(CompletionOutput(i, [], None, "abort"))
                        tokens[step:] = []
                        continue
                    tid = tokens[step]
                    stop = tid == self.tokenizer.eos_token_id or tid in params.stop_token_ids
                    reason = "stop" if stop else ("length" if step == limit - 1 else None)
                    new = [tid]  # as the engine: the stop token (EOS too) is an output token
                    lp = [self._logprob(tid, params)] if params.logprobs is not None and new else None
                    stop_id = tid if stop and tid in params.stop_token_ids else None
                    outputs.append(CompletionOutput(i, new, lp, reason, stop_id))  # type: ignore[arg-type]
                    if reason is not None:
                        tokens[step + 1 :] = []
                finished = completed = all(len(t) <= step + 1 for t in streams)
                first = step == 0
                yield RequestOutput(request_id, outputs, finished, len(prompt_token_ids),
                                    prompt_lp if first else None, queue_time=0.001 if first else None)  # fmt: skip
                if finished:
                    break
        finally:  # leaving early aborts
            self.running.discard(request_id)
            if not completed:
                self.aborted.append(request_id)


def fake_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"max_model_len": MAX_MODEL_LEN, "max_body_bytes": 64 * 1024}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def fake_engine(tokenizer: Tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer)


@contextlib.asynccontextmanager
async def fake_client(engine: FakeEngine, tokenizer: Tokenizer) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app over `engine` and `tokenizer` (through ASGI, no socket)."""
    app = create_app(fake_settings(), engine=engine, tokenizer=tokenizer)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            yield c


@pytest.fixture
async def client(fake_engine: FakeEngine, tokenizer: Tokenizer) -> AsyncIterator[httpx.AsyncClient]:
    async with fake_client(fake_engine, tokenizer) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the real engine on a tiny random model -----------------------------------------------------------

TINY_MAX_MODEL_LEN = 1024


def tiny_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "max_model_len": TINY_MAX_MODEL_LEN,
        "kv_cache_memory": 8 * 1024 * 1024,
        "max_num_seqs": 16,
        "max_num_batched_tokens": 512,
    }
    values.update(overrides)
    return Settings(**values)


def tiny_engine(tokenizer: Tokenizer, settings: Settings) -> Any:
    """The real AsyncEngine (runner, scheduler, paged KV cache) over a random 2-layer model."""
    import torch

    from model.config import SmolLM2Config
    from model.modeling import SmolLM2ForCausalLM
    from server.app import make_engine

    torch.manual_seed(0)
    config = SmolLM2Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_MODEL_LEN,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = SmolLM2ForCausalLM(config).eval()
    return make_engine(model, tokenizer, settings)


@contextlib.asynccontextmanager
async def serve_tiny(
    tokenizer: Tokenizer, settings: Settings
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The app over a started tiny engine, with an in-process client; the engine is shut down after."""
    engine = tiny_engine(tokenizer, settings)
    await engine.start()
    app = create_app(settings, engine=engine, tokenizer=tokenizer)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
                yield c, engine
    finally:
        await engine.shutdown(graceful=False)


@pytest.fixture
async def tiny_client(tokenizer: Tokenizer) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    async with serve_tiny(tokenizer, tiny_settings()) as served:
        yield served
