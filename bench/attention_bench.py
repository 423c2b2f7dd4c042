"""Decode attention over the paged KV cache: the torch path (gather, baddbmm, softmax, bmm) against the
fused C++ kernel (model/csrc/paged_attention.cpp), SmolLM2-135M shapes (9 query heads, 3 KV heads, hd 64).

    python -m bench.attention_bench [--batches 1,8,32,64] [--contexts 170,1000] [--dtype bfloat16]
                                    [--chunks 16x200,64x1000,256x1000,512x512,471x1495]

Each case lays out D sequences of a given context over scattered blocks (as the allocator does after some
traffic) in enough layer caches that their K/V exceed the L3 cache, and times one call per layer in turn,
as a decode step does; figures are microseconds per layer call. "GB/s" is the K/V bytes the kernel must
read over its time. A second table times prefill_attention for one chunk of T queries after S - T cached
tokens (chunked prefill, a prefix-cache hit): SDPA with a mask, the C++ kernel path, and where the CPU has
AVX512-BF16 or AMX tiles the kernel prompts take there (model/csrc/prefill_attention.cpp).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import time
from pathlib import Path

import torch

from model import paged_kernel
from model.attention import (
    AttentionMetadata,
    PrefillSeq,
    build_decode_mask,
    decode_attention,
    prefill_attention,
)

NH, NKV, HD, BS = 9, 3, 64, 16
L3_BYTES = 32 << 20


def make_case(D: int, ctx: int, dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    nb = (ctx + BS - 1) // BS
    num_blocks = D * nb + 8
    kv_bytes = D * ctx * 2 * NKV * HD * torch.empty((), dtype=dtype).element_size()
    layers = max(2, min(30, math.ceil(4 * L3_BYTES / kv_bytes)))
    caches = [torch.randn(2 * NKV, num_blocks * BS, HD, generator=g).to(dtype) for _ in range(layers)]
    tables = torch.randperm(num_blocks, generator=g)[: D * nb].view(D, nb)  # scattered, not shared
    lens = torch.full((D,), ctx, dtype=torch.long)
    lens[::2] -= torch.randint(0, BS, (len(lens[::2]),), generator=g)  # ragged last blocks
    q = (torch.randn(D, NH, HD, generator=g) / math.sqrt(HD)).to(dtype)
    mask = build_decode_mask(lens, nb * BS, NKV, dtype)
    meta = AttentionMetadata(torch.empty(0), D, tables, mask, [], BS, lens)
    return q, caches, meta, kv_bytes


def time_per_layer(q, caches, meta, mode: str, min_seconds: float = 0.3) -> float:  # type: ignore[no-untyped-def]
    paged_kernel.set_attention_kernel(mode)
    for c in caches:
        decode_attention(q, c, meta)
    calls, t0 = 0, time.perf_counter()
    while True:
        for c in caches:
            decode_attention(q, c, meta)
        calls += len(caches)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return elapsed / calls * 1e6


def time_chunk(T: int, S: int, dtype: torch.dtype, mode: str, min_seconds: float = 0.3) -> float:
    g = torch.Generator().manual_seed(T + S)
    nb = (S + BS - 1) // BS
    cache = torch.randn(2 * NKV, (nb + 8) * BS, HD, generator=g).to(dtype)
    seq = PrefillSeq(0, T, S, torch.randperm(nb + 8, generator=g)[:nb])
    q = (torch.randn(T, NH, HD, generator=g) / math.sqrt(HD)).to(dtype)
    paged_kernel.set_attention_kernel("cpp" if mode == "prompt" else mode)

    def call() -> object:
        if mode == "prompt":  # what the runner's prefill_kernel steps call
            return paged_kernel.prefill_attention_kernel(q, cache, seq.block_table, S, BS)
        return prefill_attention(q, cache, seq, BS)

    call()
    calls, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_seconds:
        call()
        calls += 1
    return elapsed / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--contexts", default="170,1000")
    ap.add_argument(
        "--chunks",
        default="16x200,64x1000,256x1000,512x512,471x1495",
        help="prefill chunks TxS ('' for none)",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--out", default="bench/results/attention_bench.md")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    assert paged_kernel.load(), "the C++ kernel did not build"
    build_s = time.perf_counter() - t0
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        for D in (int(b) for b in args.batches.split(",")):
            q, caches, meta, kv_bytes = make_case(D, ctx, dtype)
            t_torch = time_per_layer(q, caches, meta, "torch")
            t_cpp = time_per_layer(q, caches, meta, "cpp")
            rows.append((D, ctx, t_torch, t_cpp, kv_bytes / t_cpp / 1e3))
            print(f"D={D} ctx={ctx}: torch {t_torch:.0f} us, kernel {t_cpp:.0f} us", flush=True)
            del caches
    chunk_rows = []
    for spec in filter(None, args.chunks.split(",")):
        T, S = (int(x) for x in spec.split("x"))
        t_torch, t_cpp = time_chunk(T, S, dtype, "torch"), time_chunk(T, S, dtype, "cpp")
        prompt = dtype == torch.bfloat16 and paged_kernel.prefill_kernel_available()
        t_prompt = time_chunk(T, S, dtype, "prompt") if prompt else None
        chunk_rows.append((T, S, t_torch, t_cpp, t_prompt))
        print(
            f"chunk T={T} S={S}: torch {t_torch:.0f} us, kernel {t_cpp:.0f} us, prompt kernel {t_prompt or 0:.0f} us",
            flush=True,
        )
    paged_kernel.set_attention_kernel(None)
    lines = [
        f"# Decode attention per layer, torch path vs C++ kernel, {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"`python -m bench.attention_bench --batches {args.batches} --contexts {args.contexts} "
        f"--chunks {args.chunks} --dtype {args.dtype}`; {NH} query heads, {NKV} KV heads, hd {HD}, block size {BS}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; kernel load {build_s:.1f} s.",
        "",
        "| streams | context | torch path us | kernel us | speedup | kernel K/V GB/s |",
        "|---|---|---|---|---|---|",
    ]
    for D, ctx, t_torch, t_cpp, gbs in rows:
        lines.append(f"| {D} | {ctx} | {t_torch:.0f} | {t_cpp:.0f} | {t_torch / t_cpp:.1f}x | {gbs:.1f} |")
    if chunk_rows:
        lines += [
            "",
            "Prefill chunk of T queries after S - T cached tokens, one layer: prefill_attention in torch mode",
            "(SDPA + mask) and with the C++ kernels (the per-row kernel up to 256 queries, flash attention over",
            "the cache and the chunk beyond), and the prompt kernel (bf16 on CPUs with AVX512-BF16 or AMX tiles; - elsewhere):",
            "",
            "| T | S | torch path us | kernel path us | speedup | prompt kernel us | prompt kernel vs kernel path |",
            "|---|---|---|---|---|---|---|",
        ]
        for T, S, a, b, c in chunk_rows:
            prompt_cols = f"{c:.0f} | {b / c:.1f}x" if c else "- | -"
            lines.append(f"| {T} | {S} | {a:.0f} | {b:.0f} | {a / b:.1f}x | {prompt_cols} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
