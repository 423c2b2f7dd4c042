"""smollm2::decode_layers (model/csrc/decode_layers.cpp): a step whose attention is one kernel call runs its
layer loop in C++, and must give what the Python loop gives, bit for bit: hidden states and KV cache."""

from __future__ import annotations

import pytest
import torch

from model import SmolLM2Config, SmolLM2ForCausalLM, paged_kernel
from model.attention import PrefillSeq, allocate_kv_cache, step_metadata
from model.kernels import Kernels

pytestmark = pytest.mark.skipif(not paged_kernel.load(), reason="the C++ kernels do not build here")

TINY = dict(
    vocab_size=320,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=100000.0,
)
BS = 16
PER_SEQ = 20  # blocks of each sequence


def _model(int4: str) -> SmolLM2ForCausalLM:
    torch.manual_seed(0)
    model = SmolLM2ForCausalLM(SmolLM2Config(**TINY)).to(torch.bfloat16).eval()
    model.prepare_for_serving(int4_small_batch=int4, kernels=Kernels.detect(torch.device("cpu")))
    model.use_compute_threads(2)
    return model


def _step(
    model: SmolLM2ForCausalLM, caches: list[torch.Tensor], lens: list[int], prompt: int
) -> torch.Tensor:
    """One step over sequences i = 0 .. len(lens) - 1 (sequence i owns blocks PER_SEQ i .. PER_SEQ (i + 1) - 1,
    has lens[i] tokens cached and decodes one more), then a fresh prompt of `prompt` tokens (0: none) in the
    blocks after theirs."""
    g = torch.Generator().manual_seed(sum(lens) + prompt)
    D = len(lens)
    ids = torch.randint(0, TINY["vocab_size"], (D + prompt,), generator=g)
    pos = torch.tensor(lens + list(range(prompt)))
    tables = torch.tensor([[PER_SEQ * i + b for b in range(PER_SEQ)] for i in range(D)])
    slots = [PER_SEQ * i * BS + n for i, n in enumerate(lens)] + [PER_SEQ * D * BS + p for p in range(prompt)]
    prefills = [PrefillSeq(D, prompt, prompt, torch.arange(PER_SEQ * D, PER_SEQ * (D + 1)))] if prompt else []
    meta = step_metadata(
        torch.tensor(slots), prefills, BS, True, tables if D else None, torch.tensor([n + 1 for n in lens]) if D else None,
        compute_threads=2, prefill_kernel=paged_kernel.prefill_kernel_available(),
    )  # fmt: skip
    with torch.inference_mode():
        return model.forward_paged(ids, pos, meta, caches)


def _caches(model: SmolLM2ForCausalLM) -> list[torch.Tensor]:
    cfg = model.config
    caches = allocate_kv_cache(
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 10 * PER_SEQ, BS, torch.bfloat16, "cpu"
    )
    g = torch.Generator().manual_seed(1)
    for c in caches:
        c.copy_(torch.randn(c.shape, generator=g).to(torch.bfloat16))
    return caches


@pytest.mark.parametrize("int4", ["on", "off"])
@pytest.mark.parametrize(
    "lens, prompt",
    [([37], 0), ([5, 70, 19], 0), ([i * 7 + 1 for i in range(9)], 0), ([40, 3], 12), ([], 9)],
    ids=["one-decode", "three-decodes", "nine-decodes", "decodes-and-short-prompt", "short-prompt"],
)
def test_cpp_layer_loop_equals_python_loop(int4: str, lens: list[int], prompt: int) -> None:
    model = _model(int4)
    if model.model._layer_plan(len(lens) + prompt) is None:
        pytest.skip("this CPU's linears take a path the C++ loop does not have (oneDNN)")
    caches_cpp, caches_py = _caches(model), _caches(model)
    h_cpp = _step(model, caches_cpp, lens, prompt)
    model.model.cpp_layers = False
    h_py = _step(model, caches_py, lens, prompt)
    assert model.model._layer_plans, "the C++ loop was not taken"
    assert h_cpp.dtype == h_py.dtype == torch.bfloat16
    assert torch.equal(h_cpp, h_py)
    for a, b in zip(caches_cpp, caches_py, strict=True):
        assert torch.equal(a, b)


def test_long_prompt_takes_the_python_loop_and_plans_follow_the_linears() -> None:
    """A prompt past the one-call limit goes part by part (SDPA or the AMX prefill kernel), so the C++ loop
    is not asked; switching int4 off drops the cached plans, which held the int4 copies."""
    model = _model("on")
    caches = _caches(model)
    _step(model, caches, [], 300)
    assert not model.model._layer_plans
    _step(model, caches, [10], 0)
    if not model.model._layer_plans:
        pytest.skip("this CPU's linears take a path the C++ loop does not have (oneDNN)")
    model.prepare_for_serving(int4_small_batch="off")
    assert not model.model._layer_plans
