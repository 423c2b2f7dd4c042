"""The C++ paged decode-attention kernel equals the torch path (gather, baddbmm, softmax, bmm) on random
caches and block tables, and SMOLLM2_ATTENTION_KERNEL switches between them."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch

from model import paged_kernel
from model.attention import (
    KERNEL_PROMPT_MAX,
    KERNEL_PROMPT_MIN,
    AttentionMetadata,
    PrefillSeq,
    build_decode_mask,
    decode_attention,
    paged_attention,
    prefill_attention,
    step_metadata,
)

pytestmark = pytest.mark.usefixtures("kernels", "kernel_mode_reset")


def random_case(D: int, nh: int, nkv: int, hd: int, dtype: torch.dtype, bs: int = 16, seed: int = 0):  # type: ignore[no-untyped-def]
    """Cache, q, scattered block tables (blocks shared between rows) and ragged lengths incl. 1 and k*bs."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 40
    cache = torch.randn(2 * nkv, num_blocks * bs, hd, generator=g).to(dtype)
    q = (torch.randn(D, nh, hd, generator=g) * 2 / math.sqrt(hd)).to(dtype)
    special = [3 * bs + 1, 1, bs, 3 * bs, 11 * bs, 2]
    lens = [
        special[i] if i < len(special) else int(torch.randint(1, 11 * bs + 1, (1,), generator=g))
        for i in range(D)
    ]
    width = max((n + bs - 1) // bs for n in lens)
    # drawn with replacement: rows share blocks, and blocks repeat inside a row, in no order
    tables = torch.randint(0, num_blocks, (D, width), generator=g)
    return q, cache, tables, torch.tensor(lens, dtype=torch.long)


def torch_path(q, cache, tables, lens, bs):  # type: ignore[no-untyped-def]
    nkv = cache.shape[0] // 2
    mask = build_decode_mask(lens, tables.shape[1] * bs, nkv, q.dtype)
    paged_kernel.set_attention_kernel("torch")
    try:
        return decode_attention(
            q, cache, AttentionMetadata(torch.empty(0), q.shape[0], tables, mask, [], bs, lens)
        )
    finally:
        paged_kernel.set_attention_kernel(None)


def reference(q, cache, tables, lens, bs):  # type: ignore[no-untyped-def]
    """float64 attention of each row over its own gathered tokens."""
    D, nh, hd = q.shape
    nkv = cache.shape[0] // 2
    out = torch.empty(D, nh, hd, dtype=torch.float64)
    for d in range(D):
        n = int(lens[d])
        slots = torch.tensor([int(tables[d, t // bs]) * bs + t % bs for t in range(n)])
        kv = cache[:, slots].double()  # (2nkv, n, hd)
        k = kv[:nkv].repeat_interleave(nh // nkv, 0)
        v = kv[nkv:].repeat_interleave(nh // nkv, 0)
        p = torch.softmax(torch.einsum("hd,hnd->hn", q[d].double(), k), -1)
        out[d] = torch.einsum("hn,hnd->hd", p, v)
    return out.view(D, nh * hd)


# (nh, nkv, hd): SmolLM2-135M; the tests' tiny config; one KV head per query head; head_dim 128;
# and two shapes only the portable path handles (hd not a multiple of 16, a group of 5)
SHAPES = [(9, 3, 64), (6, 2, 16), (4, 4, 64), (8, 2, 128), (6, 3, 24), (10, 2, 32)]


@pytest.mark.parametrize("D", [1, 33])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_equals_torch_path(D: int, shape: tuple[int, int, int]) -> None:
    q, cache, tables, lens = random_case(D, *shape, torch.float32)
    out = paged_kernel.paged_decode_attention(q, cache, tables, lens, 16)
    torch.testing.assert_close(out, torch_path(q, cache, tables, lens, 16), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, 16), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D", [1, 33])
@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_equals_torch_path(D: int, shape: tuple[int, int, int]) -> None:
    q, cache, tables, lens = random_case(D, *shape, torch.bfloat16, seed=1)
    out = paged_kernel.paged_decode_attention(q, cache, tables, lens, 16)
    assert out.dtype == torch.bfloat16 and out.shape == (D, shape[0] * shape[2])
    ref = reference(q, cache, tables, lens, 16)
    # the kernel rounds its output and P (as bmm does) to bf16; the torch path also rounds the scores
    torch.testing.assert_close(out.double(), ref, atol=5e-3, rtol=2**-8)
    torch.testing.assert_close(out, torch_path(q, cache, tables, lens, 16), atol=3e-2, rtol=3e-2)


def test_peaked_scores_and_other_block_size() -> None:
    """Large scores whose maximum moves from tile to tile exercise the online rescaling; block size 4."""
    q, cache, tables, lens = random_case(7, 9, 3, 64, torch.float32, bs=4, seed=2)
    q = q * 12
    out = paged_kernel.paged_decode_attention(q, cache, tables, lens, 4)
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, 4), atol=1e-5, rtol=1e-5)


def test_query_slice_of_fused_qkv_and_shared_table() -> None:
    """q may be a strided slice of the fused qkv rows; a table expanded with row stride 0 is not copied."""
    nh, nkv, hd = 9, 3, 64
    q, cache, tables, lens = random_case(5, nh, nkv, hd, torch.float32, seed=3)
    qkv = torch.randn(5, nh + 2 * nkv, hd)
    qkv[:, :nh] = q
    shared = tables[4:5].expand(5, -1)
    out = paged_kernel.paged_decode_attention(qkv[:, :nh], cache, shared, lens, 16)
    torch.testing.assert_close(out.double(), reference(q, cache, shared, lens, 16), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("T", "S"), [(5, 37), (16, 16), (33, 160), (1, 9), (KERNEL_PROMPT_MAX + 1, 700), (300, 300)]
)
def test_prefill_chunk_equals_torch_path(dtype: torch.dtype, T: int, S: int) -> None:
    """A chunk of T queries after S - T cached tokens, causal inside the chunk, over a scattered table
    (chunks longer than KERNEL_PROMPT_MAX: flash attention over the cached part and over the chunk,
    merged)."""
    g = torch.Generator().manual_seed(T * 1000 + S)
    cache = torch.randn(6, 48 * 16, 64, generator=g).to(dtype)
    table = torch.randperm(48, generator=g)[: (S + 15) // 16]
    q = (torch.randn(T, 9, 64, generator=g) / 4).to(dtype)
    seq = PrefillSeq(0, T, S, table)
    paged_kernel.set_attention_kernel("cpp")
    out = prefill_attention(q, cache, seq, 16)
    paged_kernel.set_attention_kernel("torch")
    expected = prefill_attention(q, cache, seq, 16)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    rows = reference(q, cache, table.view(1, -1).expand(T, -1), torch.arange(S - T + 1, S + 1), 16)
    torch.testing.assert_close(out.double(), rows, atol=tol if dtype == torch.float32 else 5e-3, rtol=tol)


@pytest.mark.parametrize("invariant", [False, True], ids=["default", "batch_invariant"])
@pytest.mark.parametrize("long_prompt", [False, True])
def test_a_mixed_step_in_one_kernel_call_equals_the_torch_path(long_prompt: bool, invariant: bool) -> None:
    """Decodes, two whole prompts of different lengths and a chunk after cached tokens: on CPU one kernel
    call attends every row (the runner's step_metadata builds its tables); a whole prompt over KERNEL_PROMPT_MAX sends the step down the
    per-part path (SDPA for it), except in batch-invariant mode, where the first prompt's rows come out
    bit-identical to a step of that prompt alone. Both equal the torch path, and the cache gets the step's
    K/V either way."""
    g = torch.Generator().manual_seed(7)
    bs, nkv, nh, hd = 16, 3, 9, 64
    cache0 = torch.randn(2 * nkv, 120 * bs, hd, generator=g)
    order = torch.randperm(120, generator=g)
    dec_lens = [5, 40, 17]
    dec_tables = order[:9].view(3, 3)
    prompt_lens = [KERNEL_PROMPT_MAX + 3 if long_prompt else 20, 7]
    chunk_len, chunk_ctx = 12, 50
    start, prefills, used = len(dec_lens), [], 9
    for n in prompt_lens + [chunk_len]:
        ctx = chunk_ctx if n == chunk_len else n
        table = order[used : used + (ctx + bs - 1) // bs]
        used += len(table)
        prefills.append(PrefillSeq(start, n, ctx, table))
        start += n
    N = start
    slots = [int(dec_tables[d, (n - 1) // bs]) * bs + (n - 1) % bs for d, n in enumerate(dec_lens)]
    for s in prefills:
        slots += [
            int(s.block_table[t // bs]) * bs + t % bs
            for t in range(s.context_len - s.query_len, s.context_len)
        ]
    q = torch.randn(N, nh, hd, generator=g) / 4
    kv = torch.randn(N, 2 * nkv, hd, generator=g)

    def run(mode: str) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        lens = torch.tensor(dec_lens)
        mask = build_decode_mask(lens, 3 * bs, nkv, q.dtype)
        meta = step_metadata(
            torch.tensor(slots),
            prefills,
            bs,
            mode == "cpp",
            dec_tables,
            lens,
            mask,
            invariant and mode == "cpp",
        )
        cache = cache0.clone()
        return paged_attention(q, kv, cache, meta), cache, meta

    out, cache, meta = run("cpp")
    expected, expected_cache, _ = run("torch")
    assert (meta.row_tables is None) == (long_prompt and not invariant)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache, expected_cache)
    if invariant:
        first = prefills[0]
        rows = slice(first.query_start, first.query_start + first.query_len)
        alone = PrefillSeq(0, first.query_len, first.context_len, first.block_table)
        meta = step_metadata(torch.tensor(slots[rows]), [alone], bs, True, batch_invariant=True)
        assert torch.equal(paged_attention(q[rows], kv[rows], cache0.clone(), meta), out[rows])


def test_rejects_lengths_and_block_ids_outside_the_cache() -> None:
    q, cache, tables, lens = random_case(3, 9, 3, 64, torch.float32)
    with pytest.raises(RuntimeError, match="exceeds the block table"):
        paged_kernel.paged_decode_attention(q, cache, tables, lens + tables.shape[1] * 16, 16)
    bad = tables.clone()
    bad[0, 0] = 10_000
    with pytest.raises(RuntimeError, match="out of range"):
        paged_kernel.paged_decode_attention(q, cache, bad, lens, 16)


def test_mode_switch_routes_decode_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    q, cache, tables, lens = random_case(4, 9, 3, 64, torch.float32)
    mask = build_decode_mask(lens, tables.shape[1] * 16, 3, torch.float32)
    meta = AttentionMetadata(torch.empty(0), 4, tables, mask, [], 16, lens)
    calls = []
    real = paged_kernel.paged_decode_attention
    monkeypatch.setattr(paged_kernel, "paged_decode_attention", lambda *a: calls.append(1) or real(*a))
    paged_kernel.set_attention_kernel("torch")
    via_torch = decode_attention(q, cache, meta)
    assert calls == []
    paged_kernel.set_attention_kernel("cpp")
    via_cpp = decode_attention(q, cache, meta)
    assert calls == [1]
    torch.testing.assert_close(via_cpp, via_torch, atol=1e-5, rtol=1e-5)
    paged_kernel.set_attention_kernel(None)
    monkeypatch.setenv(paged_kernel.ENV_VAR, "torch")
    decode_attention(q, cache, meta)
    assert calls == [1]
    monkeypatch.setenv(paged_kernel.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="SMOLLM2_ATTENTION_KERNEL"):
        decode_attention(q, cache, meta)


def test_failed_build_falls_back_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(paged_kernel, "_build_and_load", broken)
    monkeypatch.setattr(paged_kernel, "_loaded", None)
    q, cache, tables, lens = random_case(2, 9, 3, 64, torch.float32)
    mask = build_decode_mask(lens, tables.shape[1] * 16, 3, torch.float32)
    meta = AttentionMetadata(torch.empty(0), 2, tables, mask, [], 16, lens)
    with caplog.at_level(logging.WARNING, logger="model.paged_kernel"):
        out = decode_attention(q, cache, meta)
        decode_attention(q, cache, meta)
    assert [r.getMessage() for r in caplog.records if "no compiler here" in r.getMessage()] != []
    assert len(caplog.records) == 1
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, 16), atol=1e-5, rtol=1e-5)
    paged_kernel.set_attention_kernel("cpp")
    with pytest.raises(RuntimeError, match="failed to build"):
        decode_attention(q, cache, meta)


def test_kernel_build_folder_follows_env_and_avoids_read_only_homes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model.paged_kernel import KERNEL_CACHE_VAR, _build_dir

    monkeypatch.setenv(KERNEL_CACHE_VAR, str(tmp_path / "kernels"))
    assert _build_dir().parent == tmp_path / "kernels"
    monkeypatch.delenv(KERNEL_CACHE_VAR)
    monkeypatch.setenv("SMOLLM2_HOME", str(tmp_path / "home"))
    assert _build_dir().parent == tmp_path / "home" / "torch_extensions"
    not_a_folder = tmp_path / "model.gguf"  # a home that cannot hold the build (as root, a file stands
    not_a_folder.write_text("x")  # in for the Docker image's read-only /models volume)
    monkeypatch.setenv("SMOLLM2_HOME", str(not_a_folder))
    assert _build_dir().parent == Path(tempfile.gettempdir()) / f"smollm2-torch-extensions-{os.getuid()}"


def test_first_build_is_announced_and_a_built_library_is_loaded_without_the_build_tools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from torch.utils import cpp_extension

    builds: list[str] = []
    loads: list[str] = []

    def fake_load(build_directory: str, **_: object) -> None:
        builds.append(build_directory)
        (Path(build_directory) / "smollm2_paged_attention.so").write_bytes(b"")

    monkeypatch.setenv(paged_kernel.KERNEL_CACHE_VAR, str(tmp_path))
    monkeypatch.setattr(torch.ops, "smollm2", SimpleNamespace())  # as if not loaded in this process
    monkeypatch.setattr(torch.ops, "load_library", loads.append)
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)  # no toolchain needed
    monkeypatch.setattr(paged_kernel.shutil, "which", lambda name: "/usr/bin/" + name)
    with caplog.at_level(logging.INFO, logger="model.paged_kernel"):
        paged_kernel._build_and_load()
        first = [r.getMessage() for r in caplog.records]
        caplog.clear()
        paged_kernel._build_and_load()
    assert first[0] == "building C++ kernels (first start, ~30 s)..." and first[1].startswith(
        "C++ kernels built"
    )
    assert caplog.records == []
    library = paged_kernel._build_dir() / "smollm2_paged_attention.so"
    assert len(builds) == 1 and loads == [str(library)]  # the second start loads the library as it is
    library.write_bytes(b"rebuilt by another checkout")  # a library the stamp does not describe
    paged_kernel._build_and_load()
    assert len(builds) == 2


prefill_kernel = pytest.mark.skipif(
    not paged_kernel.prefill_kernel_available(),
    reason="needs AVX512-BF16 (or the AMX tile unit)",
)


@prefill_kernel
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize(
    ("T", "S"),
    [
        (1, 1),
        (5, 5),
        (3, 17),
        (16, 16),
        (17, 40),
        (33, 33),
        (31, 95),
        (KERNEL_PROMPT_MAX + 1, 700),
        (471, 1495),
    ],
)
def test_prefill_kernel_chunk_equals_reference(T: int, S: int, bs: int) -> None:
    """The prompt kernel for a chunk of T queries after S - T cached tokens (a whole prompt when T == S), over a
    scattered table, with q a slice of a fused qkv (strided rows): each row equals float64 attention over
    its own prefix to bf16's precision, like the torch path; partial query and key blocks included."""
    g = torch.Generator().manual_seed(T * 1000 + S + bs)
    blocks = 1500 // bs + 2
    cache = torch.randn(6, blocks * bs, 64, generator=g).to(torch.bfloat16)
    table = torch.randperm(blocks, generator=g)[: (S + bs - 1) // bs]
    qkv = (torch.randn(T, 15, 64, generator=g) / 4).to(torch.bfloat16)
    q = qkv[:, :9]
    out = paged_kernel.prefill_attention_kernel(q, cache, table, S, bs)
    rows = reference(q, cache, table.view(1, -1).expand(T, -1), torch.arange(S - T + 1, S + 1), bs)
    torch.testing.assert_close(out.double(), rows, atol=5e-3, rtol=3e-2)
    paged_kernel.set_attention_kernel("torch")
    expected = prefill_attention(q, cache, PrefillSeq(0, T, S, table), bs)
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)


@prefill_kernel
def test_prefill_kernel_peaked_scores_stay_finite() -> None:
    """Scores in the hundreds (a row's softmax nearly one-hot, exp of large negatives underflowing to 0):
    no inf or NaN, and the row picks its value."""
    g = torch.Generator().manual_seed(3)
    T = S = 70
    cache = torch.randn(6, 8 * 16, 64, generator=g).to(torch.bfloat16)
    table = torch.arange(5)
    q = (torch.randn(T, 9, 64, generator=g) * 20).to(torch.bfloat16)
    out = paged_kernel.prefill_attention_kernel(q, cache, table, S, 16)
    assert torch.isfinite(out).all()
    rows = reference(q, cache, table.view(1, -1).expand(T, -1), torch.arange(1, S + 1), 16)
    torch.testing.assert_close(out.double(), rows, atol=2e-2, rtol=3e-2)


@prefill_kernel
def test_prefill_kernel_rejects_contexts_outside_the_cache() -> None:
    cache = torch.zeros(6, 4 * 16, 64, dtype=torch.bfloat16)
    q = torch.zeros(8, 9, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="exceeds the block table"):
        paged_kernel.prefill_attention_kernel(q, cache, torch.arange(2), 40, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        paged_kernel.prefill_attention_kernel(q, cache, torch.tensor([0, 9]), 20, 16)
    with pytest.raises(RuntimeError, match="within its context"):
        paged_kernel.prefill_attention_kernel(q, cache, torch.arange(4), 4, 16)


@prefill_kernel
def test_a_mixed_step_with_the_prefill_kernel_equals_the_torch_path() -> None:
    """Decodes, a long fresh prompt, a short one and a long chunk after cached tokens in one bf16 step with
    prefill_kernel: the prompts and the chunk go through the prompt kernel, the decodes through the paged kernel;
    the output equals the torch path's to bf16's precision and the cache gets the step's K/V."""
    g = torch.Generator().manual_seed(11)
    bs, nkv, nh, hd = 16, 3, 9, 64
    cache0 = torch.randn(2 * nkv, 160 * bs, hd, generator=g).to(torch.bfloat16)
    order = torch.randperm(160, generator=g)
    dec_lens = [5, 40]
    dec_tables = order[:6].view(2, 3)
    start, prefills, used = len(dec_lens), [], 6
    for n, ctx in [(KERNEL_PROMPT_MAX + 40, KERNEL_PROMPT_MAX + 40), (9, 9), (KERNEL_PROMPT_MAX + 5, 900)]:
        table = order[used : used + (ctx + bs - 1) // bs]
        used += len(table)
        prefills.append(PrefillSeq(start, n, ctx, table))
        start += n
    slots = [int(dec_tables[d, (n - 1) // bs]) * bs + (n - 1) % bs for d, n in enumerate(dec_lens)]
    for s in prefills:
        slots += [
            int(s.block_table[t // bs]) * bs + t % bs
            for t in range(s.context_len - s.query_len, s.context_len)
        ]
    q = (torch.randn(start, nh, hd, generator=g) / 4).to(torch.bfloat16)
    kv = torch.randn(start, 2 * nkv, hd, generator=g).to(torch.bfloat16)

    def run(cpp: bool) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        lens = torch.tensor(dec_lens)
        mask = build_decode_mask(lens, 3 * bs, nkv, q.dtype)
        meta = step_metadata(
            torch.tensor(slots), prefills, bs, cpp, dec_tables, lens, mask, prefill_kernel=cpp
        )
        cache = cache0.clone()
        return paged_attention(q, kv, cache, meta), cache, meta

    out, cache, meta = run(True)
    assert meta.prefill_kernel and meta.row_tables is None
    expected, expected_cache, _ = run(False)
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)
    assert torch.equal(cache, expected_cache)


def test_a_step_of_draft_sized_chunks_stays_one_kernel_call() -> None:
    """Chunks under KERNEL_PROMPT_MIN tokens (a draft's verification rows) beside decodes: one paged-kernel call
    over every row, as without the prompt kernel."""
    dec_tables, dec_lens = torch.arange(6).view(2, 3), torch.tensor([20, 33])
    seq = PrefillSeq(2, KERNEL_PROMPT_MIN - 1, 60, torch.arange(6, 10))
    mask = build_decode_mask(dec_lens, 48, 3, torch.bfloat16)
    meta = step_metadata(
        torch.arange(2 + seq.query_len), [seq], 16, True, dec_tables, dec_lens, mask, prefill_kernel=True
    )
    assert meta.row_tables is not None and not meta.prefill_runs


def test_batch_invariant_steps_never_take_the_prefill_kernel() -> None:
    """The prompt kernel shares key blocks between 32 queries: batch-invariant mode keeps every row on the
    per-row kernel, whatever the runner asks."""
    table = torch.arange(40)
    seq = PrefillSeq(0, KERNEL_PROMPT_MAX + 1, KERNEL_PROMPT_MAX + 1, table)
    meta = step_metadata(
        torch.arange(seq.query_len), [seq], 16, True, batch_invariant=True, prefill_kernel=True
    )
    assert not meta.prefill_kernel and meta.row_tables is not None


@prefill_kernel
def test_real_model_prompt_on_the_prefill_kernel_scores_like_the_per_row_kernel(real_bf16) -> None:  # type: ignore[no-untyped-def]
    """The real model in bf16 as served, a ~500-token prompt in chunks of 128 after cached context: the
    log-probabilities of its tokens with prompt attention on the prompt kernel and on the per-row kernel (the
    same engine, the runner's switch flipped) differ by bf16 noise only."""
    from model.sampling_params import SamplingParams
    from server.engine.engine import LLMEngine
    from server.engine.runner import ModelRunner
    from server.engine.scheduler import Scheduler, SchedulerConfig

    model, tok = real_bf16
    model.prepare_for_serving(int4_small_batch="auto")
    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=128, max_model_len=1024, block_size=16,
                          num_blocks=64, eos_token_id=None)  # fmt: skip
    runner = ModelRunner(model, cfg.num_blocks, cfg.block_size)
    engine = LLMEngine(runner, Scheduler(cfg))
    assert runner.prefill_kernel
    text = (
        "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope, it was the winter of despair. "
    )
    ids = tok.encode(text * 6)
    assert 400 < len(ids) < 1000

    def prompt_logprobs(on_kernel: bool) -> torch.Tensor:
        runner.prefill_kernel = on_kernel
        engine.add_request(
            f"p{on_kernel}", ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        )
        got: list[float] = []
        while engine.has_unfinished():
            for out in engine.step():
                got += [p.logprob for p in out.prompt_logprobs or [] if p is not None]
        return torch.tensor(got)

    kernel_lp, row_lp = prompt_logprobs(True), prompt_logprobs(False)
    assert len(kernel_lp) == len(row_lp) == len(ids) - 1
    diff = (kernel_lp - row_lp).abs()
    assert diff.mean().item() < 0.03 and diff.max().item() < 0.5, (diff.mean().item(), diff.max().item())
    assert row_lp[len(ids) // 2 :].mean().item() > -1.0  # the repeated text is predicted: the model works
