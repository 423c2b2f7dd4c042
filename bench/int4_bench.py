"""Where the int4 GEMV stops beating the bf16 GEMM of PackedLinear (model.quant.INT4_MAX_ROWS).

    python -m bench.int4_bench [--rows 1,2,3,4,5,6,8,16] [--out bench/results]

Times the four layer linears of SmolLM2-135M (fused qkv 960x576, o 576x576, fused gate/up 3072x576, down
576x1536) over 30 layers' worth of distinct random weights, so they stream from memory as in a decode
step, for M input rows: PackedLinear's bf16 path (the C++ GEMM, else oneDNN) against the same weights as int4
(groups of 32).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import torch

from bench.report import save_table
from model.quant import Int4Weight, PackedLinear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K) per layer
LAYERS = 30


def time_layers(layers: list[list[tuple[PackedLinear, Int4Weight]]], m: int, use_int4: bool) -> float:
    """Best of 3 repeats of ms per pass over every layer's linears."""
    xs = {k: torch.randn(m, k).to(torch.bfloat16) for _, k in SHAPES}
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(5):
            for layer in layers:
                for (bf16, int4), (_, k) in zip(layer, SHAPES, strict=True):
                    (int4 if use_int4 else bf16)(xs[k])
        best = min(best, (time.perf_counter() - t) / 5 * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,4,5,6,8,16")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        weights = [(0.05 * torch.randn(n, k)).to(torch.bfloat16) for n, k in SHAPES]
        layers.append([(PackedLinear(w), Int4Weight.from_weight(w)) for w in weights])
    lines = [
        f"# int4 vs bf16 layer linears, {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"`python -m bench.int4_bench --rows {args.rows}`; {LAYERS} layers x 4 linears, ms per pass; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| rows | bf16 ms | int4 ms | int4 / bf16 |",
        "|---|---|---|---|",
    ]
    for m in (int(r) for r in args.rows.split(",")):
        t_bf16, t_int4 = time_layers(layers, m, False), time_layers(layers, m, True)
        lines.append(f"| {m} | {t_bf16:.2f} | {t_int4:.2f} | {t_int4 / t_bf16:.2f} |")
        print(lines[-1], flush=True)
    save_table(lines, Path(args.out) / f"int4-{dt.date.today()}.md")


if __name__ == "__main__":
    main()
