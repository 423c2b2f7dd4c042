"""Offline engine throughput on the real model, next to transformers' generate in the same command.

    python -m bench.engine_bench [--concurrency 1,8,32,64] [--dtype bfloat16] [--int4-small-batch off,auto]
                                 [--int8-lm-head auto]
                                 [--profile-decode 20] [--out bench/results]

Each concurrency level submits that many requests at once (64-token prompts, 128 new tokens, greedy,
ignore_eos) and steps the engine until all finish; tok/s counts generated tokens over wall time,
prefill included. The baseline is transformers' LlamaForCausalLM.generate on the same weights in
float32 with a static batch of the same size (the figure the issue quotes, ~236 tok/s at 32). At the
baseline levels ours and transformers run --repeat times, alternating, and the table gives the median of
each and the median of the pairs' ratios: on a shared box either side's figure moves 10-25% from run to run.

--int4-small-batch runs every level once per listed mode of prepare_for_serving(int4_small_batch=...)
on the same engine. --profile-decode N prints torch.profiler's top ops over N decode steps of
--profile-streams streams (1),
per mode.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from pathlib import Path

import torch

from bench.ceilings import Ceilings, measure
from bench.report import save_table
from model.defaults import require_default_model
from model.quant import INT4_MODES
from model.threads import usable_cpus
from model.weights import load_model
from server.engine.engine import LLMEngine
from server.engine.request import SamplingParams
from server.engine.runner import ModelRunner, num_blocks_for_memory
from server.engine.scheduler import Scheduler, SchedulerConfig

PROMPT_LEN, NEW_TOKENS = 64, 128
ROOFLINE_TOK_S = 2300.0  # bf16 GEMM ceiling at 32 streams (the figure, a Zen 5 host)


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(n)]


def model_source(arg: str | None) -> str:
    """--model, else $SMOLLM2_MODEL, else the default GGUF (an error naming the fetch command if absent)."""
    return arg or os.environ.get("SMOLLM2_MODEL") or str(require_default_model())


def build_engine(source: str, dtype: torch.dtype, max_num_seqs: int, device: str) -> LLMEngine:
    model = load_model(source, dtype=dtype, device=device)
    blocks = num_blocks_for_memory(model, 1 << 30, 16, dtype)
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=2048,
        max_model_len=2048,
        block_size=16,
        num_blocks=blocks,
        eos_token_id=model.config.eos_token_id,
    )
    return LLMEngine(ModelRunner(model, blocks, 16), Scheduler(cfg))


def run_ours(engine: LLMEngine, n: int, vocab: int) -> tuple[float, float, float]:
    """(output tok/s, mean and median decode step ms). The median shrugs off other jobs on a shared box."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine.scheduler.allocator.reset_prefix_cache()
    for i, p in enumerate(prompts(n, vocab)):
        engine.add_request(f"b{n}-{i}", p, params)
    produced, t0 = 0, time.perf_counter()
    decode_steps: list[float] | None = None  # seconds per step once every prompt is in
    while engine.has_unfinished():
        t = time.perf_counter()
        for out in engine.step():
            produced += sum(len(c.new_token_ids) for c in out.outputs)
        if decode_steps is not None:
            decode_steps.append(time.perf_counter() - t)
        elif produced >= n:  # every prompt is in: from here on it is pure decode
            decode_steps = []
    wall = time.perf_counter() - t0
    assert decode_steps
    return produced / wall, statistics.fmean(decode_steps) * 1000, statistics.median(decode_steps) * 1000


def profile_decode(engine: LLMEngine, vocab: int, steps: int, streams: int = 1) -> str:
    """torch.profiler's top ops (by self CPU time) over `steps` decode steps of `streams` streams."""
    from torch.profiler import ProfilerActivity, profile

    engine.scheduler.allocator.reset_prefix_cache()
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts(streams, vocab)):
        engine.add_request(f"profile-{i}", prompt, params)
    while engine.scheduler.waiting or not all(r.output_token_ids for r in engine.scheduler.running):
        engine.step()  # the prefills
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def run_transformers(source: str, n: int, vocab: int, device: str) -> float:
    """transformers as a user runs it: torch's default threads (every core), whatever ours uses."""
    ours_threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return _run_transformers(source, n, vocab, device)
    finally:
        torch.set_num_threads(ours_threads)


def _run_transformers(source: str, n: int, vocab: int, device: str) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = load_model(source, dtype=torch.float32)
    hf = LlamaForCausalLM(LlamaConfig(**ours.config.to_hf_dict())).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.to(device)
    ids = torch.tensor(prompts(n, vocab), device=device)
    if device != "cpu":  # one untimed run: CUDA context, cuBLAS handles, kernel selection
        with torch.inference_mode():
            hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0
            )
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    if device != "cpu":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return (out.shape[1] - PROMPT_LEN) * n / wall


def write_table(args: argparse.Namespace, rows: list[tuple], machine: Ceilings | None) -> None:
    # the server's engine process runs with huge-page malloc (server/engine/process.py): say if this did
    tunables = f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']} " if os.environ.get("GLIBC_TUNABLES") else ""
    lines = [
        f"# Engine offline throughput, {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"`{tunables}python -m bench.engine_bench --concurrency {args.concurrency} --dtype {args.dtype} "
        f"--device {args.device}{f' --model {args.model}' if args.model else ''} --int4-small-batch {args.int4_small_batch} --int8-lm-head {args.int8_lm_head} --repeat {args.repeat}`; "
        f"{PROMPT_LEN}-token prompts, "
        f"{NEW_TOKENS} new tokens, greedy; torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        f"At the baseline levels: medians of {max(1, args.repeat)} alternating ours / transformers runs, and the "
        "median of their ratios.",
        "",
        "| int4 small batch | concurrency | ours tok/s | decode step ms | median step ms "
        "| transformers fp32 tok/s | ratio | roofline fraction | this machine's ceiling fraction |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, active, n, tok_s, step_ms, median_ms, base, pair_ratio in rows:
        ratio = f"{pair_ratio:.2f}x" if pair_ratio else "-"
        roof = f"{tok_s / ROOFLINE_TOK_S:.0%}" if args.device == "cpu" else "-"  # the CPU's roofline
        lines.append(
            f"| {mode}{' (active)' if active else ''} | {n} | {tok_s:.0f} | {step_ms:.1f} | {median_ms:.1f} | "
            f"{f'{base:.0f}' if base else '-'} | {ratio} | {roof} | "
            f"{f'{tok_s / machine.decode_tok_s_at_32:.0%}' if machine else '-'} |"
        )
    lines += [
        "",
        f"Roofline: the issue's {ROOFLINE_TOK_S:,.0f} tok/s at 32 streams on the CPU (a Zen 5 host).",
    ]
    if machine:
        lines.append(f"Measured before the runs: {machine.describe()}.")
    save_table(lines, Path(args.out) / f"engine-{args.device}-{dt.date.today()}.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--model", default=None, help="GGUF or HF folder (default: $SMOLLM2_MODEL, else the default GGUF)"
    )
    ap.add_argument("--baseline", default="32", help="concurrencies to run transformers at ('' for none)")
    ap.add_argument("--repeat", type=int, default=3, help="ours/transformers pairs at the baseline levels")
    ap.add_argument(
        "--int4-small-batch",
        default="auto",
        help="comma-separated modes of off, auto, on (the server's: auto)",
    )
    ap.add_argument("--int8-lm-head", default="auto", choices=INT4_MODES, help="the LM head's int8 copy")
    ap.add_argument("--profile-decode", type=int, default=0, help="decode steps to profile")
    ap.add_argument("--profile-streams", type=int, default=1, help="streams in the profiled steps")
    ap.add_argument(
        "--threads",
        default="server",
        choices=["server", "all"],
        help="server: as the server runs its engine (cores-1 threads for small ops, GEMMs on every "
        "core); all: torch's default everywhere",
    )
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    server_threads = args.threads == "server" and args.device == "cpu"
    if server_threads:
        torch.set_num_threads(max(1, usable_cpus() - 1))
    modes = args.int4_small_batch.split(",")
    if not set(modes) <= set(INT4_MODES):
        ap.error(f"--int4-small-batch: modes are {', '.join(INT4_MODES)}")
    levels = [int(c) for c in args.concurrency.split(",")]
    base_levels = {int(c) for c in args.baseline.split(",") if c}
    dtype = getattr(torch, args.dtype)
    machine = measure() if args.device == "cpu" else None  # before the engine: a quiet machine
    if machine:
        print(machine.describe(), flush=True)
    source = model_source(args.model)
    engine = build_engine(source, dtype, max(levels), args.device)
    if server_threads:
        engine.runner.model.use_compute_threads(usable_cpus())
    vocab = engine.runner.model.config.vocab_size
    rows, bases = [], {}
    for mode in modes:
        model = engine.runner.model
        model.prepare_for_serving(int4_small_batch=mode, int8_lm_head=args.int8_lm_head)
        run_ours(engine, 2, vocab)  # warm-up
        print(
            f"int4_small_batch={mode}: int4 active {model.int4_active}, error {model.int4_error}; "
            f"int8 LM head active {model.int8_head_active}, error {model.int8_head_error}",
            flush=True,
        )
        for n in levels:
            runs, ratios = [], []
            for _ in range(max(1, args.repeat) if n in base_levels else 1):
                runs.append(run_ours(engine, n, vocab))
                if n in base_levels:  # alternating, so a slow spell of the box hits both sides
                    bases.setdefault(n, []).append(run_transformers(source, n, vocab, args.device))
                    ratios.append(runs[-1][0] / bases[n][-1])
                print(
                    f"c={n}: ours {runs[-1][0]:.0f} tok/s ({runs[-1][1]:.1f} ms/decode step, median "
                    f"{runs[-1][2]:.1f})"
                    + (
                        f", transformers fp32 {bases[n][-1]:.0f} tok/s, ratio {ratios[-1]:.2f}x"
                        if ratios
                        else ""
                    ),
                    flush=True,
                )
            tok_s, step_ms, median_ms = (statistics.median(r[i] for r in runs) for i in range(3))
            base = statistics.median(bases[n]) if n in bases else None
            ratio = statistics.median(ratios) if ratios else None
            if len(runs) > 1:
                print(
                    f"c={n}: medians of {len(runs)}: ours {tok_s:.0f}, transformers {base:.0f}, ratio {ratio:.2f}x"
                )
            rows.append((mode, model.int4_active, n, tok_s, step_ms, median_ms, base, ratio))
        if args.profile_decode:
            print(profile_decode(engine, vocab, args.profile_decode, args.profile_streams), flush=True)
    write_table(args, rows, machine)


if __name__ == "__main__":
    main()
