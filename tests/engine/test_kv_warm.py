"""While idle, the engine gives the CPU KV blocks just past those used so far their pages, a chunk at a time,
so that the next prompts do not take page faults (model.attention.populate_kv_cache)."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
import torch

from model.config import SmolLM2Config
from model.modeling import SmolLM2ForCausalLM
from server.engine.core import EngineConfig, EngineCore
from server.engine.engine import AsyncEngine, LLMEngine
from server.engine.request import SamplingParams
from server.engine.runner import KV_WARM_AHEAD_TOKENS, KV_WARM_CHUNK_TOKENS, ModelRunner
from server.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.fake_runner import FakeRunner

pytestmark = pytest.mark.timeout(30)
BS = 8


def tiny_runner(num_blocks: int) -> ModelRunner:
    torch.manual_seed(0)
    config = SmolLM2Config(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, eos_token_id=1,
    )  # fmt: skip
    return ModelRunner(SmolLM2ForCausalLM(config).eval(), num_blocks, BS, eos_token_id=1)


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")
def test_warm_ahead_stops_a_window_past_the_highest_block_used() -> None:
    runner = tiny_runner(num_blocks=1024)
    ahead, chunk = KV_WARM_AHEAD_TOKENS // BS, KV_WARM_CHUNK_TOKENS // BS
    calls = 0
    while runner.warm_kv_ahead():
        calls += 1
    if runner._kv_warm == 0:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux >= 5.14)")
    assert calls + 1 == ahead // chunk and runner._kv_warm == ahead
    assert not runner.warm_kv_ahead()  # nothing left until more blocks are used
    sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=4096, block_size=BS,
                            num_blocks=1024, eos_token_id=1)  # fmt: skip
    engine = LLMEngine(runner, Scheduler(sched))
    engine.add_request(
        "a", list(range(2, 402)), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    )
    while engine.has_unfinished():
        engine.step()
    used = runner._kv_frontier
    assert used >= 400 // BS
    while runner.warm_kv_ahead():
        pass
    assert runner._kv_warm == min(1024, used + ahead)


class WarmCounter(FakeRunner):
    """FakeRunner whose warm_kv_ahead has `chunks` chunks to do after each step."""

    def __init__(self, chunks: int) -> None:
        super().__init__(128, 4, 1000)
        self.chunks = chunks
        self.left = chunks
        self.calls = 0

    def execute(self, plan):  # type: ignore[no-untyped-def]
        self.left = self.chunks
        return super().execute(plan)

    def warm_kv_ahead(self) -> bool:
        self.calls += 1
        self.left = max(0, self.left - 1)
        return self.left > 0


async def test_the_idle_loop_warms_until_done_then_waits() -> None:
    runner = WarmCounter(chunks=5)
    sched = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=4, num_blocks=128
    )
    engine = AsyncEngine.in_thread(lambda: EngineCore(runner, Scheduler(sched), EngineConfig(sched)))
    await engine.start()
    try:
        deadline = time.monotonic() + 5
        while runner.calls < 5:  # the idle loop at start: 5 chunks
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert runner.calls == 5  # then it blocks, without calling again
        async for _ in engine.generate("x", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0)):
            pass
        await asyncio.sleep(0.2)
        assert runner.calls == 10  # idle again after the request: 5 more
    finally:
        await engine.shutdown()
