"""A step's decoder layers run from C++ (smollm2::decode_layers) against the Python layer loop, in the engine,
alternating in one run.

    python -m bench.layer_loop_ab [--rounds 3] [--streams 1,8,32,64] [--out bench/results]

One engine serves the default model as the server does (bf16, int4/int8 copies, GEMMs on every core, small
ops on one); its model's cpp_layers switches between the two loops, which run the same ops (bit-identical,
tests/model/test_decode_layers.py). Rows: the median decode step of N streams of 64-token prompts (12 steps
each, after their prompts), median over the rounds, and the tokens per second that step time allows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
from pathlib import Path

import torch

from bench.gemm_ab import build, decode_step_s
from bench.report import save_table
from model import paged_kernel
from model.defaults import require_default_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", default="1,8,32,64")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    if not paged_kernel.load():
        print("the C++ kernels do not build here: nothing to compare")
        return 1
    torch.set_num_threads(1)
    engine = build(str(require_default_model()), True, 512)
    inner = engine.runner.model.model
    rng = random.Random(0)
    streams = [int(n) for n in args.streams.split(",")]
    modes = {"C++": True, "Python": False}
    for flag in modes.values():  # warm-up
        inner.cpp_layers = flag
        decode_step_s(engine, [[rng.randrange(100, 40000) for _ in range(64)] for _ in range(4)], steps=4)
    results: dict[str, dict[int, list[float]]] = {name: {n: [] for n in streams} for name in modes}
    for _ in range(args.rounds):
        for n in streams:
            prompts = [[rng.randrange(100, 40000) for _ in range(64)] for _ in range(n)]
            for name, flag in modes.items():
                inner.cpp_layers = flag
                results[name][n].append(decode_step_s(engine, prompts))
    inner.cpp_layers = True
    lines = [
        f"# Decoder layers from C++ vs the Python loop ({dt.datetime.now():%Y-%m-%d %H:%M}, median of "
        f"{args.rounds} alternating rounds; decode steps of N streams, 64-token prompts)",
        "",
        "| streams | C++ step ms | Python step ms | C++ / Python | C++ tok/s | Python tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for n in streams:
        a, b = (statistics.median(results[name][n]) * 1000 for name in modes)
        lines.append(f"| {n} | {a:.2f} | {b:.2f} | {a / b:.2f} | {n * 1000 / a:.0f} | {n * 1000 / b:.0f} |")
    save_table(lines, Path(args.out) / f"layer-loop-ab-{dt.datetime.now():%Y-%m-%d-%H%M}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
