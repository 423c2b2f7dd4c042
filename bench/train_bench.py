"""Training throughput: this project's SmolLM2 against transformers' LlamaForCausalLM, same config.

One training step = forward with labels, backward, gradient clipping, AdamW step (the optimizer
``model.train`` builds: decay on 2-D weights only), on the spec's SmolLM2Config (135M parameters, random
init), batch B x T random tokens, in float32 and with bfloat16 autocast. Each row: warm-up steps, then the
mean of the timed steps. Prints a table and writes bench/results/train_bench.md (or --out).

    .venv/bin/python bench/train_bench.py [--batch 4] [--seq 256] [--steps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import SmolLM2Config  # noqa: E402
from model.modeling import SmolLM2ForCausalLM  # noqa: E402
from model.train import TrainConfig, make_optimizer  # noqa: E402


def hf_llama(config: SmolLM2Config) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        **{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    )
    hf._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf)


def time_steps(
    model: nn.Module, batch: torch.Tensor, amp: bool, warmup: int, steps: int, budget_s: float
) -> float:
    """Mean seconds per training step after `warmup` untimed ones: `steps` of them, or fewer (at least
    one) once `budget_s` seconds are spent, so a busy machine still finishes in bounded time."""
    device = batch.device
    model.train()
    opt = make_optimizer(model, TrainConfig(), device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(batch, labels=batch).loss
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    done = 0
    while done < steps and (done == 0 or time.perf_counter() - t0 < budget_s):
        step()
        _sync(device)
        done += 1
    return (time.perf_counter() - t0) / done


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> list[tuple[str, str, float, float]]:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # as model.train does on CUDA (no effect on CPU)
    config = SmolLM2Config()
    builders: dict[str, Callable[[SmolLM2Config], nn.Module]] = {
        "smollm2 (this repo)": SmolLM2ForCausalLM,
        "transformers Llama": hf_llama,
    }
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    rows = []
    for name, build in builders.items():
        torch.manual_seed(0)
        with device:
            model = build(config)
        for label, amp in (("fp32", False), ("bf16 autocast", True)):
            sec = time_steps(model, batch, amp, args.warmup, args.steps, args.budget_s)
            tok_s = args.batch * args.seq / sec
            rows.append((name, label, sec, tok_s))
            print(f"{name:20s} {label:14s} {sec * 1000:9.0f} ms/step {tok_s:9.0f} tok/s", flush=True)
            args.out.write_text(table(rows, args))  # after each row: a timeout still leaves the rows so far
        del model
        gc.collect()
    return rows


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def table(rows: list[tuple[str, str, float, float]], args: argparse.Namespace) -> str:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Training throughput (bench/train_bench.py)",
        "",
        f"SmolLM2Config defaults (135M), batch {args.batch} x {args.seq} tokens, forward + backward + clip +",
        f"AdamW, {args.warmup} warm-up + up to {args.steps} timed steps ({args.budget_s:.0f} s budget).",
        f"Device: {args.device} ({device}), torch {torch.__version__}, {torch.get_num_threads()} threads,",
        f"1-minute load average when written: {load:.1f} (the machine is shared: high load = slow steps).",
        "",
        "| model | precision | ms/step | tokens/s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {p} | {s * 1000:.0f} | {t:,.0f} |" for n, p, s, t in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--budget-s", type=float, default=60.0, help="stop timing a row after this many seconds")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_bench.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = table(run(args), args)
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
