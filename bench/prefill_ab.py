"""Prompt attention in the prompt kernel (model/csrc/prefill_attention.cpp: AMX tiles, else AVX512-BF16)
against the path it replaced, in the engine, alternating in one run.

    python -m bench.prefill_ab [--rounds 3] [--prompt-tokens 64,256,512,1500,2000]
                               [--max-num-batched-tokens 512] [--out bench/results]

One engine serves the default model as the server does (bf16, int4/int8 copies, GEMMs on every core); its
runner's prefill_kernel switches between the prompt kernel and the earlier path (the per-row paged kernel up to
KERNEL_PROMPT_MAX tokens, torch's flash attention over the cache and the chunk, merged, beyond). Rows: the
time from adding one prompt (prefix cache reset) to its first token, median over the rounds; the same for
a 1,500-token prompt beside 31 decoding streams, and the median step meanwhile. Needs a CPU with
AVX512-BF16.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import time
from pathlib import Path

import torch

from bench.gemm_ab import build, prefill_s
from bench.report import save_table
from model import paged_kernel
from model.defaults import require_default_model
from server.engine.engine import LLMEngine
from server.engine.request import SamplingParams


def mixed_s(engine: LLMEngine, prompts: list[list[int]], long: list[int]) -> tuple[float, float]:
    """(time from adding `long` to its first token, the median step meanwhile), beside len(prompts)
    decoding streams."""
    engine.scheduler.allocator.reset_prefix_cache()
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    ids = [f"m{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, params)
    while engine.scheduler.num_waiting or not engine.scheduler.running:
        engine.step()
    engine.step()
    long_id = f"l{time.monotonic_ns()}"
    engine.add_request(long_id, long, SamplingParams(max_tokens=1, temperature=0.0))
    times: list[float] = []
    done = False
    while not done:
        t0 = time.perf_counter()
        done = any(out.request_id == long_id for out in engine.step())  # its first token
        times.append(time.perf_counter() - t0)
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()
    return sum(times), statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", default="64,256,512,1500,2000")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    if not paged_kernel.prefill_kernel_available():
        print("this CPU has neither AVX512-BF16 nor AMX tiles: nothing to compare")
        return 1
    torch.set_num_threads(1)
    engine = build(str(require_default_model()), True, args.max_num_batched_tokens)
    runner = engine.runner
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    sizes = [int(n) for n in args.prompt_tokens.split(",")]
    modes = {"kernel": True, "before": False}
    for on in modes.values():  # warm-up: first-call costs of both paths
        runner.prefill_kernel = on
        prefill_s(engine, tokens(600))
    results: dict[str, dict[str, list[float]]] = {name: {} for name in modes}
    for _ in range(args.rounds):
        for name, on in modes.items():
            runner.prefill_kernel = on
            for n in sizes:
                results[name].setdefault(f"prompt {n}", []).append(prefill_s(engine, tokens(n)))
            ttft, step = mixed_s(engine, [tokens(64) for _ in range(31)], tokens(1500))
            results[name].setdefault("mixed ttft", []).append(ttft)
            results[name].setdefault("mixed step", []).append(step)
    runner.prefill_kernel = paged_kernel.prefill_kernel_available()
    lines = [
        f"# Prompt attention: the prompt kernel vs before ({dt.datetime.now():%Y-%m-%d %H:%M}, median of "
        f"{args.rounds} alternating rounds, chunks of {args.max_num_batched_tokens} tokens)",
        "",
        "| measure | kernel ms | before ms | kernel / before |",
        "|---|---|---|---|",
    ]
    for key in results["kernel"]:
        a, b = (statistics.median(results[n][key]) * 1000 for n in modes)
        labels = {
            "mixed ttft": "first token of a 1,500-token prompt beside 31 decoding streams",
            "mixed step": "median step meanwhile (its chunk and the 31 decodes)",
        }
        label = labels.get(key, f"first token of one {key.split()[-1]}-token prompt")
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    save_table(lines, Path(args.out) / f"prefill-ab-{dt.datetime.now():%Y-%m-%d-%H%M}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
