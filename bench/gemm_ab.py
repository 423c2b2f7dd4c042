"""Our bf16 GEMM (AVX512-BF16, or the AMX tile unit where the CPU has one) against oneDNN's for the serving
linears, in the engine, alternating in one run.

    python -m bench.gemm_ab [--rounds 3] [--prompt-tokens 1500] [--out bench/results]

Both engines serve the default model in bfloat16 (int4/int8 copies as the server's defaults); one has its
linears packed for model/csrc/bf16_gemm.cpp, the other for oneDNN (`_linear_pointwise`, which uses AMX
where the CPU has it). Rows: one long prompt's prefill (max_tokens 1, prefix cache reset) and the median
decode step at 1 / 8 / 32 / 64 streams (64-token prompts). Kernels.detect picks ours wherever it runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import time
from pathlib import Path

import torch

from bench.report import save_table
from model import paged_kernel
from model.defaults import require_default_model
from model.kernels import Kernels, cpu_has_amx, has_bf16_gemm
from model.weights import load_model
from server.engine.engine import LLMEngine
from server.engine.request import SamplingParams
from server.engine.runner import ModelRunner, num_blocks_for_memory
from server.engine.scheduler import Scheduler, SchedulerConfig

STREAMS = (1, 8, 32, 64)


def build(source: str, bf16_gemm: bool, batched_tokens: int) -> LLMEngine:
    if not paged_kernel.load():
        raise SystemExit("the C++ kernels did not build (see the warning above)")
    model = load_model(source, dtype=torch.bfloat16)
    kernels = Kernels(cpp=True, bf16_gemm=bf16_gemm)
    model.prepare_for_serving(int4_small_batch="auto", int8_lm_head="auto", kernels=kernels)
    model.drop_unpacked_weights()
    model.use_compute_threads(os.cpu_count() or 1)  # as the server: GEMMs on every core, small ops on one
    blocks = num_blocks_for_memory(model, 1 << 30, 16, torch.bfloat16)
    cfg = SchedulerConfig(
        max_num_seqs=64, max_num_batched_tokens=batched_tokens, max_model_len=2048, block_size=16,
        num_blocks=blocks, eos_token_id=model.config.eos_token_id,
    )  # fmt: skip
    return LLMEngine(ModelRunner(model, blocks, 16), Scheduler(cfg))


def prefill_s(engine: LLMEngine, ids: list[int]) -> float:
    engine.scheduler.allocator.reset_prefix_cache()
    engine.add_request(f"p{time.monotonic_ns()}", ids, SamplingParams(max_tokens=1, temperature=0.0))
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def decode_step_s(engine: LLMEngine, prompts: list[list[int]], steps: int = 12) -> float:
    engine.scheduler.allocator.reset_prefix_cache()
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    for ids in prompts:
        engine.add_request(f"d{time.monotonic_ns()}", ids, params)
    while engine.scheduler.num_waiting or not engine.scheduler.running:
        engine.step()
    engine.step()  # the last prompts' first token
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[:-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    if not has_bf16_gemm():
        print("this CPU has no AVX512-BF16 GEMM of ours: nothing to compare")
        return 1
    torch.set_num_threads(1)
    source = str(require_default_model())
    engines = {"ours": build(source, True, args.max_num_batched_tokens),
               "oneDNN": build(source, False, args.max_num_batched_tokens)}  # fmt: skip
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    for engine in engines.values():  # warm-up: first-call costs of both paths
        prefill_s(engine, tokens(256))
        decode_step_s(engine, [tokens(64) for _ in range(8)], 4)
    results: dict[str, dict[str, list[float]]] = {name: {} for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            results[name].setdefault("prefill", []).append(prefill_s(engine, tokens(args.prompt_tokens)))
            for n in STREAMS:
                step = decode_step_s(engine, [tokens(64) for _ in range(n)])
                results[name].setdefault(f"decode {n}", []).append(step)
    lines = [
        f"# Linears: our bf16 GEMM vs oneDNN ({dt.datetime.now():%Y-%m-%d %H:%M}, AMX: {cpu_has_amx()}, "
        f"median of {args.rounds} alternating rounds)",
        "",
        "| measure | ours ms | oneDNN ms | ours / oneDNN |",
        "|---|---|---|---|",
    ]
    for key in results["ours"]:
        a, b = (statistics.median(results[n][key]) * 1000 for n in ("ours", "oneDNN"))
        chunks = f"prefill {args.prompt_tokens} tokens (chunks of {args.max_num_batched_tokens})"
        label = chunks if key == "prefill" else f"{key}-stream step"
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    save_table(lines, Path(args.out) / f"gemm-ab-{dt.datetime.now():%Y-%m-%d-%H%M}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
