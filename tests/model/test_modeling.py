"""The spec's modules against transformers' Llama (an independent implementation of the same network)."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model import (
    SmolLM2Config,
    SmolLM2ForCausalLM,
    SmolLM2RotaryEmbedding,
    _precompute_freqs_cis,
    apply_rotary_pos_emb,
    paged_kernel,
    repeat_kv,
    rotate_half,
)
from model.attention import PrefillSeq, allocate_kv_cache, build_decode_mask, populate_kv_cache, step_metadata
from model.kernels import Kernels

TINY = dict(
    vocab_size=300,
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=100000.0,
)


@pytest.fixture(scope="module")
def pair() -> tuple[SmolLM2ForCausalLM, LlamaForCausalLM]:
    torch.manual_seed(0)
    ours = SmolLM2ForCausalLM(SmolLM2Config(**TINY)).eval()
    theirs = LlamaForCausalLM(LlamaConfig(**ours.config.to_hf_dict())).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def test_spec_config_defaults() -> None:
    c = SmolLM2Config()
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (576, 1536, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert (c.vocab_size, c.max_position_embeddings, c.block_size) == (49152, 2048, 512)
    assert c.rope_theta == 10000.0 and c.rms_norm_eps == 1e-5 and c.tie_word_embeddings
    assert c.initializer_range == pytest.approx(1 / 24) and c.hidden_act == "silu"


def test_tiny_model_parameter_count_and_tied_head() -> None:
    m = SmolLM2ForCausalLM(SmolLM2Config(**TINY))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    names = {n for n, _ in m.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.norm.weight" in names


def test_logits_and_loss_equal_transformers(pair) -> None:  # type: ignore[no-untyped-def]
    ours, theirs = pair
    x = torch.randint(0, TINY["vocab_size"], (3, 37))
    labels = x.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        a, b = ours(x, labels=labels), theirs(x, labels=labels)
    assert (a.logits - b.logits).abs().max().item() < 1e-5
    assert a.loss is not None and b.loss is not None
    assert abs(a.loss.item() - b.loss.item()) < 1e-5


def test_padded_batch_equals_transformers(pair) -> None:  # type: ignore[no-untyped-def]
    ours, theirs = pair
    x = torch.randint(0, TINY["vocab_size"], (2, 12))
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        a = ours(x, attention_mask=mask).logits
        b = theirs(x, attention_mask=mask).logits
    assert (a[mask.bool()] - b[mask.bool()]).abs().max().item() < 1e-5


def test_kv_cache_decoding_equals_full_forward(pair) -> None:  # type: ignore[no-untyped-def]
    ours, _ = pair
    x = torch.randint(0, TINY["vocab_size"], (2, 30))
    with torch.no_grad():
        full = ours(x).logits
        out = ours(x[:, :10], use_cache=True)
        pieces, past = [out.logits], out.past_key_values
        for t in range(10, 30, 4):  # chunks of 4 after the prompt
            out = ours(x[:, t : t + 4], past_key_values=past, use_cache=True)
            pieces.append(out.logits)
            past = out.past_key_values
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("kernel", ["torch", "cpp"])
def test_paged_forward_equals_full_forward(pair, kernel: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """One flat step holding two decodes and a prefill chunk over a scattered block table, with the
    decodes on the torch path and on the C++ kernel."""
    monkeypatch.setenv(paged_kernel.ENV_VAR, kernel)
    ours = copy.deepcopy(pair[0])  # a model keeps the kernels it was first prepared with
    ours.prepare_for_serving(kernels=Kernels.detect(torch.device("cpu")))
    assert ours.kernels is not None and ours.kernels.cpp == (kernel == "cpp")
    cfg, bs = ours.config, 4
    caches = allocate_kv_cache(
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 32, bs, torch.float32, "cpu"
    )
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (9, 14, 11)]
    tables = [[5, 2, 9], [7, 1, 12, 3], [30, 4, 8]]
    with torch.no_grad():
        full = [ours(s[None]).logits[0] for s in seqs]
        # step 1: prefill seq0 [0:8], seq1 [0:13], seq2 [0:6]
        starts, ends = [0, 0, 0], [8, 13, 6]
        _paged_step(ours, caches, seqs, tables, starts, ends, bs, decodes=[])
        # step 2: decode seq0 (pos 8) and seq1 (pos 13), prefill chunk seq2 [6:11]
        h = _paged_step(ours, caches, seqs, tables, [8, 13, 6], [9, 14, 11], bs, decodes=[0, 1])
        logits = ours.compute_logits(h)
    assert (logits[0] - full[0][8]).abs().max().item() < 1e-4
    assert (logits[1] - full[1][13]).abs().max().item() < 1e-4
    assert (logits[2:] - full[2][6:11]).abs().max().item() < 1e-4


def _paged_step(model, caches, seqs, tables, starts, ends, bs, decodes):  # type: ignore[no-untyped-def]
    ids, pos, slots, prefills = [], [], [], []
    order = decodes + [i for i in range(len(seqs)) if i not in decodes]
    for i in order:
        q0 = len(ids)
        for p in range(starts[i], ends[i]):
            ids.append(int(seqs[i][p]))
            pos.append(p)
            slots.append(tables[i][p // bs] * bs + p % bs)
        if i not in decodes:
            prefills.append(PrefillSeq(q0, ends[i] - starts[i], ends[i], torch.tensor(tables[i])))
    width = max((len(tables[i]) for i in decodes), default=0)
    dec_tables = (
        torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in decodes]) if decodes else None
    )
    mask = lens = None
    if decodes:
        lens = torch.tensor([ends[i] for i in decodes])
        mask = build_decode_mask(lens, width * bs, model.config.num_key_value_heads, model.dtype)
    meta = step_metadata(torch.tensor(slots), prefills, bs, model.kernels.cpp, dec_tables, lens, mask)
    return model.forward_paged(torch.tensor(ids), torch.tensor(pos), meta, caches)


def test_rotary_cache_grows_and_helpers() -> None:
    rope = SmolLM2RotaryEmbedding(16, max_position_embeddings=8, base=10000.0)
    cos, sin = rope(torch.zeros(1), seq_len=20)
    assert cos.shape == (20, 16) and rope.max_seq_len_cached >= 20
    fc = _precompute_freqs_cis(16, 20, 10000.0)
    assert fc.shape == (20, 8, 2)
    assert torch.allclose(cos[:, :8], fc[..., 0]) and torch.allclose(sin[:, 8:], fc[..., 1])
    x = torch.arange(8.0)
    assert rotate_half(x).tolist() == [-4.0, -5.0, -6.0, -7.0, 0.0, 1.0, 2.0, 3.0]
    q = torch.randn(1, 2, 5, 16)
    q2, _ = apply_rotary_pos_emb(q, q, cos, sin, torch.arange(5)[None])
    assert torch.allclose(q2.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation keeps norms
    kv = torch.randn(2, 3, 4, 8)
    r = repeat_kv(kv, 3)
    assert r.shape == (2, 9, 4, 8) and torch.equal(r[:, 4], kv[:, 1])


def test_generate_greedy_equals_transformers_and_truncates(pair) -> None:  # type: ignore[no-untyped-def]
    ours, theirs = pair
    x = torch.randint(0, TINY["vocab_size"], (2, 7))
    a = ours.generate(x, 12, temperature=0.0)
    b = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)
    # past block_size the context is cropped to the last block_size tokens, as the spec says
    small = SmolLM2ForCausalLM(SmolLM2Config(**{**TINY, "block_size": 8})).eval()
    y = small.generate(x[:, :6], 6, temperature=0.0)
    last = small(y[:, -9:-1][:, -8:]).logits[:, -1].argmax(-1)
    assert torch.equal(last, y[:, -1])


def test_generate_samples_with_top_k() -> None:
    m = SmolLM2ForCausalLM(SmolLM2Config(**TINY)).eval()
    g = torch.Generator().manual_seed(0)
    out = m.generate(torch.zeros(1, 3, dtype=torch.long), 20, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(out, m.generate(torch.zeros(1, 3, dtype=torch.long), 20, temperature=0.0))


def test_out_of_range_token_ids_are_a_clear_error(pair) -> None:  # type: ignore[no-untyped-def]
    ours, _ = pair
    with pytest.raises(ValueError, match="token id 300 is outside the vocabulary"):
        ours(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours(torch.tensor([[-1]]))


# ---- the real model ----------------------------------------------------------------------------------
PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def quicksort(arr):",
    "In 1969, the first humans",
]


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    from model.defaults import DefaultModelMissing, require_default_model

    try:
        return require_default_model()
    except DefaultModelMissing as e:
        pytest.skip(str(e))


@pytest.mark.slow
@pytest.mark.real_model
def test_real_gguf_greedy_equals_transformers(real_gguf: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.weights import load_model

    oracle = AutoModelForCausalLM.from_pretrained(
        str(real_gguf.parent), gguf_file=real_gguf.name, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)
    ours = load_model(real_gguf, dtype=torch.float32)
    for text in PROMPTS:
        ids = torch.tensor([tok.encode(text)])
        want = oracle.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        got = ours.generate(ids, 32, temperature=0.0)
        assert got.tolist() == want.tolist(), text
    # bfloat16 stays close to float32: measured max |dlogit| about 0.3-0.6 on logits of range ~30,
    # and the top-1 token agrees on almost every position
    ids = torch.tensor([tok.encode(" ".join(PROMPTS))])
    with torch.no_grad():
        ref = ours(ids).logits[0]
        bf = load_model(real_gguf, dtype=torch.bfloat16)(ids).logits[0]
    assert (bf - ref).abs().max().item() < 1.5
    assert (bf.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


def test_fresh_prompts_of_different_lengths_share_one_padded_attention_call(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Adjacent whole prompts of lengths 8, 13, 6 (padding them to 13 costs < 2x) go through one SDPA call
    on the torch path (as on a GPU) and equal each prompt's own causal attention; a 40-token prompt next to
    them would pad too wastefully and starts a run of its own."""
    from model import attention

    calls = []
    sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k)
    )
    monkeypatch.setenv(paged_kernel.ENV_VAR, "torch")
    lens, nh, nkv, hd = [8, 13, 6], 6, 2, 16
    starts = [0, 8, 21]
    seqs = [PrefillSeq(s, n, n, torch.tensor([i])) for i, (s, n) in enumerate(zip(starts, lens, strict=True))]
    q, kv = torch.randn(27, nh, hd), torch.randn(27, 2 * nkv, hd)
    assert attention._fresh_runs(seqs) == [(True, seqs)]
    [run] = attention.prefill_runs(seqs, q.device)  # built once per step, by the runner
    assert run.fresh and run.seqs == seqs and run.padding is not None
    out = attention.fresh_prefill_attention(q, kv, seqs, run.padding)
    assert calls == [(3, nh, 13, hd)]
    for s in seqs:
        rows = slice(s.query_start, s.query_start + s.query_len)
        k = kv[rows, :nkv].transpose(0, 1).repeat_interleave(nh // nkv, 0)
        v = kv[rows, nkv:].transpose(0, 1).repeat_interleave(nh // nkv, 0)
        want = (
            sdpa(q[rows].transpose(0, 1), k, v, is_causal=True, scale=1.0)
            .transpose(0, 1)
            .reshape(-1, nh * hd)
        )
        torch.testing.assert_close(out[rows], want, atol=1e-5, rtol=1e-5)
    long = PrefillSeq(27, 40, 40, torch.tensor([3, 4, 5]))
    assert attention._fresh_runs([*seqs, long]) == [(True, seqs), (True, [long])]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")
def test_populating_kv_slots_takes_their_pages_and_keeps_their_data() -> None:
    """The engine gives blocks their pages ahead while idle; that must never change a block in use."""
    layers, nkv, hd, blocks, bs = 30, 3, 64, 4096, 16
    caches = allocate_kv_cache(layers, nkv, hd, blocks, bs, torch.bfloat16, "cpu")
    for c in caches:
        c[:, 3 * bs : 4 * bs].fill_(2.5)  # a block in use, inside the range populated below
    before = _rss_bytes()
    if not populate_kv_cache(caches, 0, 2048):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux >= 5.14)")
    grown = _rss_bytes() - before
    expected = layers * 2 * nkv * 2048 * hd * 2  # 45 MiB
    assert 0.9 * expected < grown < 1.1 * expected + 8 * 2**20, grown
    assert all(bool((c[:, 3 * bs : 4 * bs] == 2.5).all()) for c in caches)
    assert not caches[0][:, : 3 * bs].any() and not caches[0][:, 4 * bs :].any()
    before = _rss_bytes()
    assert populate_kv_cache(caches, 0, 2048)  # again: nothing more to take
    assert _rss_bytes() - before < 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_cpu_kv_cache_takes_memory_only_where_written() -> None:
    """A large default pool must not cost an idle server its size: the CPU KV tensors read as zeros and
    their pages count towards the process only once a block is written."""
    layers, nkv, hd, blocks, bs = 30, 3, 64, 4096, 16  # 1.4 GiB of bf16 in all
    before = _rss_bytes()
    caches = allocate_kv_cache(layers, nkv, hd, blocks, bs, torch.bfloat16, "cpu")
    assert sum(c.numel() * c.element_size() for c in caches) == 2 * layers * nkv * hd * blocks * bs * 2
    assert _rss_bytes() - before < 64 * 2**20
    for c in caches:
        assert c.shape == (2 * nkv, blocks * bs, hd) and c.is_contiguous()
        c[:, 5 * bs : 6 * bs].fill_(1.5)  # one block in every layer
    assert _rss_bytes() - before < 64 * 2**20
    assert bool((caches[7][:, 5 * bs : 6 * bs] == 1.5).all())
    assert not caches[7][:, : 5 * bs].any() and not caches[7][:, 6 * bs :].any()
