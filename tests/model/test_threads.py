"""Compute threads: heavy kernels switch to their own thread count and back; other ops keep theirs."""

from __future__ import annotations

import pytest
import torch

from model.threads import get_compute_threads, run_wide, set_compute_threads


@pytest.fixture(autouse=True)
def _restore():  # type: ignore[no-untyped-def]
    before, threads = get_compute_threads(), torch.get_num_threads()
    yield
    set_compute_threads(before)
    torch.set_num_threads(threads)


def test_heavy_calls_run_on_the_compute_threads_and_switch_back() -> None:
    torch.set_num_threads(1)
    set_compute_threads(2)
    assert run_wide(torch.get_num_threads) == 2
    assert torch.get_num_threads() == 1  # the small ops' count is back


def test_the_count_is_restored_when_the_call_raises() -> None:
    torch.set_num_threads(1)
    set_compute_threads(2)

    def boom() -> None:
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        run_wide(boom)
    assert torch.get_num_threads() == 1


def test_no_compute_threads_means_no_switch() -> None:
    torch.set_num_threads(1)
    set_compute_threads(None)
    assert run_wide(torch.get_num_threads) == 1
    with pytest.raises(ValueError, match="at least 1"):
        set_compute_threads(0)


def test_whole_prompt_attention_runs_on_the_compute_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh prompts' causal attention (SDPA) was ~13% of a mixed 28-decode + 4-prompt step on one thread."""
    from model import attention

    seen: list[int] = []
    sdpa = attention.F.scaled_dot_product_attention

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    torch.set_num_threads(1)
    set_compute_threads(2)
    q, kv = torch.randn(2 * 5, 6, 8), torch.randn(2 * 5, 4, 8)  # two prompts of 5 tokens, 6 heads, 2 KV heads
    seqs = [
        attention.PrefillSeq(0, 5, 5, torch.tensor([0])),
        attention.PrefillSeq(5, 5, 5, torch.tensor([1])),
    ]
    out = attention.fresh_prefill_attention(q, kv, seqs)
    assert out.shape == (10, 48) and seen == [2] and torch.get_num_threads() == 1
