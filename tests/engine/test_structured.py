"""Constrained decoding: the grammar cache, the bitmask unpacking, and the engine over a tiny model whose
512 logits are the first 512 tokens of the real tokenizer (single characters, enough for JSON)."""

from __future__ import annotations

import functools
import json
import math
import re

import pytest
import torch

from model import SmolLM2ForCausalLM
from model.tokenizer import Tokenizer
from server.engine.engine import LLMEngine
from server.engine.request import SamplingParams, StructuredSpec
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerConfig
from tests.conftest import TINY_VOCAB

xgr = pytest.importorskip("xgrammar")
from server.engine.structured import GrammarCache, StructuredError, StructuredOutputs, tokenizer_info  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "boolean"}},
    "required": ["a", "b"],
}


@pytest.fixture(scope="module")
def cache(tokenizer: Tokenizer) -> GrammarCache:
    return GrammarCache(tokenizer_info(tokenizer, TINY_VOCAB), max_entries=3)


def test_cache_compiles_each_spec_once_and_evicts_the_oldest(cache: GrammarCache) -> None:
    specs = [StructuredSpec("regex", f"x{i}") for i in range(4)]
    before = cache.misses
    cache.get(specs[0])
    cache.get(specs[0])
    assert cache.misses == before + 1
    for spec in specs[1:]:
        cache.get(spec)  # the fourth evicts specs[0]
    cache.get(specs[3])
    assert cache.misses == before + 4
    cache.get(specs[0])
    assert cache.misses == before + 5


def test_cache_is_bounded_in_bytes(tokenizer: Tokenizer) -> None:
    """A compiled grammar can take tens of MB (an enum of 15,000 values: 24 MB): past max_bytes the least
    recently used go, even the newest if it alone is over."""
    info = tokenizer_info(tokenizer, TINY_VOCAB)
    specs = [StructuredSpec("choice", json.dumps([f"{c}{i}" for i in range(40)])) for c in "ab"]
    sizes = [GrammarCache(info).get(s).memory_size_bytes for s in specs]
    assert min(sizes) > 0
    roomy = GrammarCache(info, max_bytes=sum(sizes))
    for spec in specs:
        roomy.get(spec)
    assert roomy.cached_bytes == sum(sizes)
    tight = GrammarCache(info, max_bytes=max(sizes))  # room for one of them
    for spec in [*specs, specs[1]]:
        tight.get(spec)
    assert tight.cached_bytes == sizes[1] and tight.misses == 2  # specs[0] went; specs[1] was kept
    none = GrammarCache(info, max_bytes=min(sizes) - 1)
    none.get(specs[0])
    none.get(specs[0])
    assert none.cached_bytes == 0 and none.misses == 2


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (StructuredSpec("json", '{"type": "objectx"}'), "objectx"),
        (StructuredSpec("json", '{"type": '), "char"),
        (StructuredSpec("regex", "a("), "parenthesis"),
        (StructuredSpec("choice", "[]"), "non-empty"),
        (StructuredSpec("grammar", "root ::= missing"), "missing"),
    ],
)
def test_invalid_specs_raise_a_readable_value_error(
    cache: GrammarCache, spec: StructuredSpec, words: str
) -> None:
    with pytest.raises(StructuredError, match=words) as info:
        cache.get(spec)
    assert not str(info.value).startswith("[")  # xgrammar's C++ location prefix is cut


def test_bias_matches_the_bitmask(tokenizer: Tokenizer) -> None:
    so = StructuredOutputs(tokenizer, TINY_VOCAB)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, TINY_VOCAB // 32), dtype=torch.int32)
    bias = so.bias_from_bitmask(bitmask)
    assert bias.shape == (3, TINY_VOCAB) and bias.dtype == torch.float32
    for row in range(3):
        for token in range(TINY_VOCAB):
            word = int(bitmask[row, token // 32]) & 0xFFFFFFFF
            assert (bias[row, token] == 0) == bool((word >> (token % 32)) & 1)
    # xgrammar's own kernel agrees
    logits = torch.randn(3, TINY_VOCAB)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, backend="cpu")
    assert torch.equal(logits + bias, expected)


def make_engine(
    model: SmolLM2ForCausalLM, tokenizer: Tokenizer, num_blocks: int = 128, max_model_len: int = 256
) -> LLMEngine:
    config = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=128, max_model_len=max_model_len, num_blocks=num_blocks,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    structured = functools.partial(StructuredOutputs, tokenizer, TINY_VOCAB)
    runner = ModelRunner(model, num_blocks, 16, tokenizer.eos_token_id, structured=structured)
    return LLMEngine(runner, Scheduler(config))


def run(
    engine: LLMEngine, params: SamplingParams, prompt: list[int] | None = None
) -> dict[int, tuple[list, str]]:
    engine.add_request("r", prompt or list(range(5, 40)), params)
    tokens: dict[int, list[int]] = {}
    logprobs: dict[int, list] = {}
    reasons: dict[int, str] = {}
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs:
                tokens.setdefault(c.index, []).extend(c.new_token_ids)
                logprobs.setdefault(c.index, []).extend(c.logprobs or [])
                if c.finish_reason:
                    reasons[c.index] = c.finish_reason
    engine.scheduler.allocator.check_integrity()
    assert engine.scheduler.allocator.usage == 0.0
    return {i: (tokens[i], reasons[i], logprobs[i]) for i in tokens}  # type: ignore[misc]


def text(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_n3_with_seed_and_logprobs(
    tiny_model: SmolLM2ForCausalLM, tokenizer: Tokenizer, temperature: float
) -> None:
    engine = make_engine(tiny_model, tokenizer)
    spec = StructuredSpec("json", json.dumps(SCHEMA))
    params = SamplingParams(n=3, max_tokens=64, temperature=temperature, seed=7, logprobs=2, structured=spec)
    results = run(engine, params)
    assert len(results) == 3
    for ids, reason, lps in results.values():
        assert reason == "stop", text(tokenizer, ids)
        value = json.loads(text(tokenizer, ids))
        assert set(value) == {"a", "b"} and 0 <= value["a"] <= 99 and isinstance(value["b"], bool)
        assert ids[-1] == tokenizer.eos_token_id
        assert len(lps) == len(ids)
        # logprobs are those of the raw distribution: the top alternatives need not be allowed tokens
        assert all(lp.logprob <= 0 for lp in lps)


def test_seeded_structured_run_is_reproducible(tiny_model: SmolLM2ForCausalLM, tokenizer: Tokenizer) -> None:
    spec = StructuredSpec("regex", "[a-z]{2,6}-[0-9]{1,3}")
    params = SamplingParams(n=2, max_tokens=32, temperature=1.0, seed=3, structured=spec)
    first = run(make_engine(tiny_model, tokenizer), params)
    second = run(make_engine(tiny_model, tokenizer), params)
    assert {i: r[0] for i, r in first.items()} == {i: r[0] for i, r in second.items()}
    for ids, reason, _ in first.values():
        assert reason == "stop" and re.fullmatch("[a-z]{2,6}-[0-9]{1,3}", text(tokenizer, ids))


def test_choice_and_min_tokens(tiny_model: SmolLM2ForCausalLM, tokenizer: Tokenizer) -> None:
    choices = ["yes", "no", "maybe so"]
    spec = StructuredSpec("choice", json.dumps(choices))
    # min_tokens bans EOS, which the grammar needs at the end: the grammar wins
    params = SamplingParams(n=4, max_tokens=16, temperature=1.0, min_tokens=10, structured=spec)
    for ids, reason, _ in run(make_engine(tiny_model, tokenizer), params).values():
        assert reason == "stop" and text(tokenizer, ids) in choices


def test_preemption_recomputes_without_breaking_the_grammar(
    tiny_model: SmolLM2ForCausalLM, tokenizer: Tokenizer
) -> None:
    # 8 blocks of 16 tokens for 4 sequences of 40 prompt tokens and 30+ outputs each: some are preempted
    engine = make_engine(tiny_model, tokenizer, num_blocks=8, max_model_len=128)
    spec = StructuredSpec("regex", "[a-z ]{60,80}\\.")
    params = SamplingParams(n=4, max_tokens=85, temperature=1.0, seed=1, structured=spec)
    results = run(engine, params, list(range(100, 140)))
    assert engine.scheduler.num_preemptions > 0
    for ids, reason, _ in results.values():
        assert reason == "stop" and re.fullmatch("[a-z ]{60,80}\\.", text(tokenizer, ids))


def test_length_cut_is_reported_as_length(tiny_model: SmolLM2ForCausalLM, tokenizer: Tokenizer) -> None:
    spec = StructuredSpec("regex", "[a-z]{30}")
    params = SamplingParams(max_tokens=5, temperature=0.0, structured=spec)
    ids, reason, _ = run(make_engine(tiny_model, tokenizer), params)[0]
    assert reason == "length" and len(ids) == 5


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])],
)  # fmt: skip
def test_sampler_masks_after_logprobs_and_logit_bias(device: str) -> None:
    from model.sampling import SamplingBatch, sample

    vocab = 8
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]] * 2, device=device)
    raw = torch.log_softmax(logits[0], dim=-1).cpu()
    params = [
        SamplingParams(temperature=0.0, logprobs=1, logit_bias={1: 100.0}),
        SamplingParams(temperature=0.0),
    ]
    bias = torch.full((1, vocab), -math.inf)
    bias[0, 2] = 0.0  # row 0 may only produce token 2
    batch = SamplingBatch.build(
        params, [[], []], [[], []], [None, None], grammar_bias=(torch.tensor([0]), bias)
    )
    out = sample(logits.clone(), batch)
    assert out.token_ids == [2, 1]  # the +100 bias does not bring token 1 back in row 0; row 1 is free
    lp = out.logprobs[0]  # type: ignore[index]
    assert lp is not None and lp.top[0][0] == 1 and abs(lp.logprob - float(raw[2])) < 1e-5  # raw distribution
