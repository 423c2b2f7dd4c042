"""Where the int4 GEMV stops beating the bf16 GEMM of PackedLinear (model.quant.INT4_MAX_ROWS).

    python -m bench.int4_bench [--rows 1,2,3,4,5,6,8,16] [--out bench/results]

Times the four layer linears of SmolLM2-135M (fused qkv 960x576, o 576x576, fused gate/up 3072x576, down
576x1536) over 30 layers' worth of distinct random weights, so they stream from memory as in a decode
step, for M input rows: PackedLinear's bf16 paths (oneDNN's GEMM and, where the CPU has AVX512-BF16, ours)
against the same weights as int4 (groups of 32) in torch's int4 kernel and, where it is built, in ours
(model/csrc/int4_gemm.cpp). Which bf16 GEMM serving uses is Kernels.detect's choice (oneDNN on CPUs with
AMX); the int4 copies take the rows up to the crossover with it (model.quant.int4_max_rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import torch

from bench.report import save_table
from model.kernels import Kernels, has_bf16_gemm
from model.quant import Int4Weight, PackedLinear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K) per layer
LAYERS = 30


Variant = PackedLinear | Int4Weight


def time_layers(layers: list[list[tuple[Variant | None, ...]]], m: int, variant: int) -> float:
    """Best of 3 repeats of ms per pass over every layer's linears, each through layer[i][variant]."""
    xs = {k: torch.randn(m, k).to(torch.bfloat16) for _, k in SHAPES}
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(5):
            for layer in layers:
                for linear, (_, k) in zip(layer, SHAPES, strict=True):
                    fn = linear[variant]
                    assert fn is not None
                    fn(xs[k])
        best = min(best, (time.perf_counter() - t) / 5 * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,4,5,6,8,16")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    kernels = Kernels.detect(torch.device("cpu"))
    gemm = has_bf16_gemm()
    onednn, tiles = Kernels(cpp=kernels.cpp), Kernels(cpp=kernels.cpp, bf16_gemm=gemm)
    layers = []
    for _ in range(LAYERS):
        weights = [(0.05 * torch.randn(n, k)).to(torch.bfloat16) for n, k in SHAPES]
        layers.append(
            [
                (
                    PackedLinear(w, kernels=onednn),
                    PackedLinear(w, kernels=tiles) if gemm else None,
                    Int4Weight.from_weight(w),
                    Int4Weight.from_weight(w, kernels),
                )
                for w in weights
            ]
        )
    ours = layers[0][0][3].tiles
    lines = [
        f"# int4 vs bf16 layer linears, {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"`python -m bench.int4_bench --rows {args.rows}`; {LAYERS} layers x 4 linears, ms per pass; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        f"Serving's bf16 GEMM here: {'ours' if kernels.bf16_gemm else 'oneDNN'}; our bf16 GEMM: "
        f"{'built' if gemm else 'not on this CPU'}; our int4 GEMM: {'built' if ours else 'not on this CPU'}.",
        "",
        "| rows | oneDNN bf16 ms | our bf16 ms | torch int4 ms | our int4 ms | our int4 / oneDNN | our int4 / our bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for m in (int(r) for r in args.rows.split(",")):
        t = [time_layers(layers, m, v) if layers[0][0][v] is not None else nan for v in range(4)]
        if not ours:
            t[3] = nan
        lines.append(
            f"| {m} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | {t[3]:.2f} | {t[3] / t[0]:.2f} | {t[3] / t[1]:.2f} |"
        )
        print(lines[-1], flush=True)
    save_table(lines, Path(args.out) / f"int4-{dt.date.today()}.md")


if __name__ == "__main__":
    main()
