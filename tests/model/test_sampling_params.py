"""SamplingParams' helpers: one greedy, one top-k clamp, one min_tokens banned set."""

from __future__ import annotations

from model.sampling_params import GREEDY_EPS, SamplingParams, banned_before_min_tokens, clamp_top_k
from server.engine import request


def test_engine_reexports_the_model_definitions() -> None:
    assert request.SamplingParams is SamplingParams


def test_greedy_below_eps() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=GREEDY_EPS / 2).greedy
    assert not SamplingParams(temperature=GREEDY_EPS).greedy


def test_clamp_top_k() -> None:
    assert [clamp_top_k(k) for k in (None, -1, 0, 1, 50)] == [-1, -1, -1, 1, 50]
    assert clamp_top_k(512, vocab_size=512) == -1
    assert clamp_top_k(511, vocab_size=512) == 511


def test_banned_before_min_tokens() -> None:
    params = SamplingParams(min_tokens=2, stop_token_ids=[5, 7])
    assert banned_before_min_tokens(params, eos_token_id=2) == {2, 5, 7}
    assert banned_before_min_tokens(params, eos_token_id=2, num_output_tokens=1) == {2, 5, 7}
    assert banned_before_min_tokens(params, eos_token_id=2, num_output_tokens=2) == set()
    ignore = SamplingParams(min_tokens=2, stop_token_ids=[5], ignore_eos=True)
    assert banned_before_min_tokens(ignore, eos_token_id=2) == {5}
