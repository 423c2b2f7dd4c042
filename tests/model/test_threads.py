"""Compute threads: heavy kernels switch to the model's thread count and back; other ops keep theirs."""

from __future__ import annotations

import pytest
import torch

from model.kernels import TORCH_ONLY, Kernels
from model.threads import WIDE_ROWS, run_on


@pytest.fixture(autouse=True)
def _restore():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_heavy_calls_run_on_the_compute_threads_and_switch_back() -> None:
    torch.set_num_threads(1)
    kernels = TORCH_ONLY.with_threads(2)
    assert kernels.wide(torch.get_num_threads) == 2
    assert torch.get_num_threads() == 1  # the small ops' count is back
    assert kernels.wide_rows(WIDE_ROWS, torch.get_num_threads) == 2  # a long step's element-wise ops
    assert kernels.wide_rows(WIDE_ROWS - 1, torch.get_num_threads) == 1  # a decode step's stay


def test_the_count_is_restored_when_the_call_raises() -> None:
    torch.set_num_threads(1)

    def boom() -> None:
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        run_on(2, boom)
    assert torch.get_num_threads() == 1


def test_no_compute_threads_means_no_switch() -> None:
    torch.set_num_threads(1)
    assert TORCH_ONLY.wide(torch.get_num_threads) == 1
    with pytest.raises(ValueError, match="at least 1"):
        TORCH_ONLY.with_threads(0)


def test_the_thread_count_is_not_part_of_what_the_kernels_are() -> None:
    """A prepared model cached by one process serves in another whatever its core count."""
    assert Kernels(cpp=True).with_threads(8) == Kernels(cpp=True)


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
    q, kv = torch.randn(2 * 5, 6, 8), torch.randn(2 * 5, 4, 8)  # two prompts of 5 tokens, 6 heads, 2 KV heads
    seqs = [
        attention.PrefillSeq(0, 5, 5, torch.tensor([0])),
        attention.PrefillSeq(5, 5, 5, torch.tensor([1])),
    ]
    out = attention.fresh_prefill_attention(q, kv, seqs, threads=2)
    assert out.shape == (10, 48) and seen == [2] and torch.get_num_threads() == 1


def test_use_compute_threads_reaches_every_linear() -> None:
    from tests.tiny import make_tiny_model

    model = make_tiny_model(dtype=torch.bfloat16)
    model.prepare_for_serving()
    model.use_compute_threads(2)
    assert model.kernels is not None and model.kernels.compute_threads == 2
    linears = [*model._layer_linears(), model.lm_head_linear]
    assert all(lin is not None and lin.kernels.compute_threads == 2 for lin in linears)
