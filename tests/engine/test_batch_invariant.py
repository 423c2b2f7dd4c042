"""--batch-invariant on the real model in bfloat16: a greedy request gives the same tokens alone, in a batch
of 64 mixed requests (prefilling in chunks while others decode), after a prefix-cache hit and with
speculative decoding; and the mode is what makes that hold (without it a row's logits depend on how many
rows share the step)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from model import SmolLM2ForCausalLM
from model.kernels import Kernels, has_bf16_gemm
from model.tokenizer import Tokenizer
from server.engine.engine import LLMEngine
from server.engine.request import RequestOutput, SamplingParams
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from server.engine.spec_decode import SpecConfig

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(not has_bf16_gemm(), reason="needs the C++ kernels with AVX512-BF16"),
]

NEW_TOKENS = 32
PARAGRAPH = (
    "The river town kept its records in a stone library by the bridge. Every spring the water rose, and "
    "the librarians carried the oldest books to the upper floor, one shelf at a time, while the children "
    "counted the steps and the boatmen told stories about the floods of earlier years. "
)


def load(batch_invariant: bool) -> SmolLM2ForCausalLM:
    from model.weights import load_model

    model = load_model(None, dtype=torch.bfloat16)
    kernels = Kernels.detect(torch.device("cpu"), batch_invariant=batch_invariant)
    model.prepare_for_serving(int4_small_batch="auto", int8_lm_head="auto", kernels=kernels)
    return model


@pytest.fixture(scope="module")
def invariant_model() -> SmolLM2ForCausalLM:
    return load(batch_invariant=True)


@pytest.fixture(scope="module")
def target_prompt(tokenizer: Tokenizer) -> list[int]:
    """Longer than attention.KERNEL_PROMPT_MAX, so that outside the mode it would be attended by SDPA."""
    ids = tokenizer.encode(PARAGRAPH * 6 + "Question: what did the librarians do every spring? Answer:")
    assert 256 < len(ids) < 400
    return ids


def make_engine(model: SmolLM2ForCausalLM, speculative: int = 0) -> LLMEngine:
    config = SchedulerConfig(
        max_num_seqs=64,
        max_num_batched_tokens=512,
        max_model_len=1024,
        block_size=16,
        num_blocks=1024,
        speculative=SpecConfig(speculative),
    )
    return LLMEngine(ModelRunner(model, config.num_blocks, config.block_size), Scheduler(config))


def greedy(max_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def drain(
    engine: LLMEngine, tokens: dict[str, list[int]], cached: dict[str, int], until: Callable[[], bool]
) -> None:
    while engine.has_unfinished() and not until():
        out: RequestOutput
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t for c in out.outputs for t in c.new_token_ids)
            cached[out.request_id] = max(cached.get(out.request_id, 0), out.num_cached_tokens)


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_alone(model: SmolLM2ForCausalLM, prompt: list[int], speculative: int = 0) -> list[int]:
    """The target alone, on one thread (the batches run on all: how work is split between threads must not
    matter either)."""
    engine = make_engine(model, speculative)
    engine.add_request("target", prompt, greedy())
    tokens: dict[str, list[int]] = {}
    with one_thread():
        drain(engine, tokens, {}, lambda: False)
    assert len(tokens["target"]) == NEW_TOKENS
    if speculative:
        assert engine.scheduler.num_accepted_tokens > 0, "no draft was accepted: the check proves nothing"
    return tokens["target"]


def test_greedy_tokens_alone_in_a_mixed_batch_and_after_a_prefix_hit(
    invariant_model: SmolLM2ForCausalLM, target_prompt: list[int]
) -> None:
    alone = run_alone(invariant_model, target_prompt)

    # (b) 63 other requests of mixed prompt lengths and max_tokens; the target arrives once 20 of the first
    # 40 decode, behind 10 newer ones, so its prompt is computed in chunks beside decode rows
    engine = make_engine(invariant_model)
    g = torch.Generator().manual_seed(0)
    vocab = invariant_model.config.vocab_size
    others = {
        f"o{i}": (
            torch.randint(0, vocab, (int(torch.randint(4, 160, (1,), generator=g)),), generator=g).tolist(),
            greedy(int(torch.randint(1, 40, (1,), generator=g))),
        )
        for i in range(63)
    }
    names = list(others)
    steps: list[tuple[int, int, int]] = []  # per step with the target: (start, tokens, decode rows beside it)
    execute = engine.runner.execute

    def spy(plan: SchedulerOutput):  # type: ignore[no-untyped-def]
        for s in plan.scheduled:
            if s.request.request_id == "target":
                decodes = sum(
                    1 for o in plan.scheduled if o.num_tokens == 1 and o.start >= o.request.num_prompt_tokens
                )
                steps.append((s.start, s.num_tokens, decodes))
        return execute(plan)

    engine.core.runner.execute = spy  # type: ignore[method-assign]
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    for name in names[:40]:
        engine.add_request(name, *others[name])
    drain(engine, tokens, cached, lambda: sum(1 for n in names[:40] if tokens.get(n)) >= 20)
    for name in names[40:50]:
        engine.add_request(name, *others[name])
    engine.add_request("target", target_prompt, greedy())
    for name in names[50:]:
        engine.add_request(name, *others[name])
    drain(engine, tokens, cached, lambda: False)
    assert all(len(tokens[n]) == others[n][1].max_tokens for n in names)
    prefill = [s for s in steps if s[0] < len(target_prompt)]
    assert len(prefill) > 1, f"the target's prompt was not chunked: {prefill}"
    assert all(decodes > 0 for _, _, decodes in prefill), f"no decodes beside the target's prefill: {prefill}"
    assert tokens["target"] == alone

    # (c) a request with the same long prefix first; the target then finds its full blocks cached
    engine = make_engine(invariant_model)
    tokens, cached = {}, {}
    engine.add_request("prefix", target_prompt[:-5] + target_prompt[:3], greedy(4))
    with one_thread():
        drain(engine, tokens, cached, lambda: False)
        engine.add_request("target", target_prompt, greedy())
        drain(engine, tokens, cached, lambda: False)
    assert cached["target"] >= 16 * ((len(target_prompt) - 5) // 16) > 0
    assert engine.stats().prefix_cache_hits >= cached["target"]
    assert tokens["target"] == alone

    # (d) speculative decoding: drafts are verified as a continuation chunk of 1 + k rows, which the mode
    # computes as it computes single decode rows
    assert run_alone(invariant_model, target_prompt, speculative=4) == alone


def test_without_the_mode_a_rows_logits_depend_on_the_batch(invariant_model: SmolLM2ForCausalLM) -> None:
    """The same hidden row through the LM head and a layer linear at M = 1 and M = 64: bit-identical with the
    mode; outside it the int8 head and int4 weights (lossless for this GGUF, so on by default) serve M = 1
    and the bf16 GEMM M = 64, whose roundings differ."""
    default = load(batch_invariant=False)
    assert default.int8_head_active and default.int4_active
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, default.config.hidden_size, generator=g).to(torch.bfloat16)
    for model, same in ((invariant_model, True), (default, False)):
        qkv = model.model.decoder_layers[0].self_attn.qkv_linear
        assert qkv is not None
        assert torch.equal(model.compute_logits(x[:1]), model.compute_logits(x)[:1]) == same
        assert torch.equal(qkv(x[:1]), qkv(x)[:1]) == same
