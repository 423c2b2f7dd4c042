"""Offline engine throughput on the real model, next to transformers' generate in the same command.

    python -m bench.engine_bench [--concurrency 1,8,32,64] [--dtype bfloat16] [--out bench/results]

Each concurrency level submits that many requests at once (64-token prompts, 128 new tokens, greedy,
ignore_eos) and steps the engine until all finish; tok/s counts generated tokens over wall time,
prefill included. The baseline is transformers' LlamaForCausalLM.generate on the same weights in
float32 with a static batch of the same size (the figure the issue quotes, ~236 tok/s at 32).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import torch

from model.defaults import require_default_model
from model.weights import load_model
from server.engine.engine import LLMEngine
from server.engine.request import SamplingParams
from server.engine.runner import ModelRunner, num_blocks_for_memory
from server.engine.scheduler import Scheduler, SchedulerConfig

PROMPT_LEN, NEW_TOKENS = 64, 128
ROOFLINE_TOK_S = 2300.0  # bf16 GEMM ceiling at 32 streams (shared/PERF-NOTES.md)


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(n)]


def build_engine(dtype: torch.dtype, max_num_seqs: int, device: str) -> LLMEngine:
    model = load_model(require_default_model(), dtype=dtype, device=device)
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


def run_ours(engine: LLMEngine, n: int, vocab: int) -> tuple[float, float]:
    """(output tok/s, mean decode step ms)."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine.scheduler.allocator.reset_prefix_cache()
    for i, p in enumerate(prompts(n, vocab)):
        engine.add_request(f"b{n}-{i}", p, params)
    produced, steps, t0 = 0, 0, time.perf_counter()
    t_decode = None
    while engine.has_unfinished():
        for out in engine.step():
            produced += sum(len(c.new_token_ids) for c in out.outputs)
        steps += 1
        if t_decode is None and produced >= n:  # every prompt is in: from here on it is pure decode
            t_decode, decode_from = time.perf_counter(), steps
    wall = time.perf_counter() - t0
    assert t_decode is not None
    step_ms = (time.perf_counter() - t_decode) / max(steps - decode_from, 1) * 1000
    return produced / wall, step_ms


def run_transformers(n: int, vocab: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = load_model(require_default_model(), dtype=torch.float32)
    hf = LlamaForCausalLM(LlamaConfig(**ours.config.to_hf_dict())).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    ids = torch.tensor(prompts(n, vocab))
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
    wall = time.perf_counter() - t0
    return (out.shape[1] - PROMPT_LEN) * n / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--baseline", default="32", help="concurrencies to run transformers at ('' for none)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    base_levels = {int(c) for c in args.baseline.split(",") if c}
    dtype = getattr(torch, args.dtype)
    engine = build_engine(dtype, max(levels), args.device)
    vocab = engine.runner.model.config.vocab_size
    run_ours(engine, 2, vocab)  # warm-up
    rows = []
    for n in levels:
        tok_s, step_ms = run_ours(engine, n, vocab)
        base = run_transformers(n, vocab) if n in base_levels and args.device == "cpu" else None
        rows.append((n, tok_s, step_ms, base))
        print(
            f"c={n}: ours {tok_s:.0f} tok/s ({step_ms:.1f} ms/decode step)"
            + (f", transformers fp32 {base:.0f} tok/s, ratio {tok_s / base:.2f}x" if base else ""),
            flush=True,
        )
    lines = [
        f"# Engine offline throughput, {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"`python -m bench.engine_bench --concurrency {args.concurrency} --dtype {args.dtype} "
        f"--device {args.device}`; {PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, greedy; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| concurrency | ours tok/s | decode step ms | transformers fp32 tok/s | ratio | roofline fraction |",
        "|---|---|---|---|---|---|",
    ]
    for n, tok_s, step_ms, base in rows:
        ratio = f"{tok_s / base:.2f}x" if base else "-"
        lines.append(
            f"| {n} | {tok_s:.0f} | {step_ms:.1f} | {f'{base:.0f}' if base else '-'} | {ratio} | "
            f"{tok_s / ROOFLINE_TOK_S:.0%} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine-{args.device}-{dt.date.today()}.md"
    path.write_text(table)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
