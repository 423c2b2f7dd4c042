"""Sampler cost per engine step: SamplingBatch.build + sample() for B rows of V=49152 logits.

    .venv/bin/python -m bench.sampling_bench                 # prints the table, saves bench/results/sampling_bench.md
    .venv/bin/python -m bench.sampling_bench --batch 1,32    # any subset

Logits are synthetic: N(0, 2^2) noise plus a few boosted tokens per row ("peaked", like a language model
that is fairly sure of the next token), or the noise alone ("flat", a high-entropy step: the top-p nucleus
then spans thousands of tokens and needs the full-sort fallback); the "SmolLM2" cases use the real
model's next-token logits along a fixed paragraph (teacher-forced, float32; needs the default GGUF).
At temperature 1 a 0.95 nucleus of those spans more than 256 tokens in about half the rows.
The figure is the median of the calls.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.sampling import SamplingBatch, make_generator, sample
from server.engine.request import SamplingParams

VOCAB = 49152
PROMPT_LEN, OUTPUT_LEN = 256, 128

CASES: dict[str, tuple[Callable[[int], SamplingParams], str]] = {
    # name: (params for row i, logits: peaked / flat / model)
    "all greedy": (lambda i: SamplingParams(temperature=0.0), "peaked"),
    "temperature only": (lambda i: SamplingParams(temperature=0.8), "peaked"),
    "temperature, seeded": (lambda i: SamplingParams(temperature=0.8, seed=i), "peaked"),
    "top_k=50 + top_p=0.9": (lambda i: SamplingParams(temperature=0.8, top_k=50, top_p=0.9), "peaked"),
    "top_p=0.9 (peaked)": (lambda i: SamplingParams(temperature=0.8, top_p=0.9), "peaked"),
    "top_p=0.9 (flat, full sort)": (lambda i: SamplingParams(temperature=0.8, top_p=0.9), "flat"),
    "T=1, top_p=0.95 (SmolLM2 logits)": (lambda i: SamplingParams(temperature=1.0, top_p=0.95), "model"),
    "T=1, top_p=0.95, seeded (SmolLM2)": (lambda i: SamplingParams(top_p=0.95, seed=i), "model"),
    "min_p=0.05": (lambda i: SamplingParams(temperature=0.8, min_p=0.05), "peaked"),
    "greedy + penalties": (
        lambda i: SamplingParams(
            temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5
        ),
        "peaked",
    ),
    "greedy + logprobs=5": (lambda i: SamplingParams(temperature=0.0, logprobs=5), "peaked"),
}

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening, carrying a lamp and a notebook. "
    "From the top he could see the fishing boats returning to the harbour, the gulls circling above "
    "the nets, and far to the west the dark line of the islands where his brother had once lived. "
    "He wrote down the weather, the ships that passed, and sometimes a few lines of a poem."
)


@functools.cache
def model_logits() -> torch.Tensor:
    """(T, V) float32 next-token logits of the default model along PARAGRAPH."""
    from model import Tokenizer
    from model.defaults import require_default_model
    from model.weights import load_model

    path = require_default_model()
    model = load_model(path, dtype=torch.float32)
    ids = torch.tensor([Tokenizer.from_file(path).encode(PARAGRAPH)])
    with torch.no_grad():
        return model(ids).logits[0, 8:].float()  # skip the first few positions (little context)


def make_logits(batch: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "model":
        rows = model_logits()
        return rows[torch.randint(0, rows.shape[0], (batch,), generator=gen)].clone()
    logits = torch.randn(batch, VOCAB, generator=gen) * 2.0
    if kind == "peaked":
        top = torch.randint(0, VOCAB, (batch, 5), generator=gen)
        logits.scatter_add_(1, top, torch.tensor([14.0, 12.0, 11.0, 10.0, 9.0]).expand(batch, -1))
    return logits


def time_case(batch: int, case: str, calls: int) -> tuple[float, float]:
    """Median milliseconds of (build, sample) over `calls` calls."""
    make_params, kind = CASES[case]
    gen = torch.Generator().manual_seed(batch)
    params = [make_params(i) for i in range(batch)]
    outputs = [torch.randint(0, VOCAB, (OUTPUT_LEN,), generator=gen).tolist() for _ in range(batch)]
    prompts = [torch.randint(0, VOCAB, (PROMPT_LEN,), generator=gen).tolist() for _ in range(batch)]
    generators = [None if p.seed is None else make_generator(p.seed) for p in params]
    build_ms, sample_ms = [], []
    for _ in range(calls + 1):  # the first call warms up
        logits = make_logits(batch, kind, gen)
        t0 = time.perf_counter()
        sb = SamplingBatch.build(params, outputs, prompts, generators, "cpu")
        t1 = time.perf_counter()
        sample(logits, sb)
        t2 = time.perf_counter()
        build_ms.append((t1 - t0) * 1e3)
        sample_ms.append((t2 - t1) * 1e3)
    return statistics.median(build_ms[1:]), statistics.median(sample_ms[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,32,64", help="comma-separated batch sizes")
    parser.add_argument("--calls", type=int, default=15, help="timed calls per cell")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sampling_bench.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    header = "| case | " + " | ".join(f"B={b} build / sample (ms)" for b in batches) + " |"
    lines = [header, "|---|" + "---|" * len(batches)]
    print(header, flush=True)
    for case in CASES:
        cells = [time_case(b, case, args.calls) for b in batches]
        line = f"| {case} | " + " | ".join(f"{bm:.2f} / {sm:.2f}" for bm, sm in cells) + " |"
        lines.append(line)
        print(line, flush=True)
    note = (
        f"\nV={VOCAB}, torch {torch.__version__}, {args.threads} threads, median of {args.calls} calls; "
        f"penalty rows carry {PROMPT_LEN} prompt + {OUTPUT_LEN} output tokens. "
        f"Run: `.venv/bin/python -m bench.sampling_bench`.\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Sampler cost per step\n\n" + "\n".join(lines) + "\n" + note)
    print(note.strip())


if __name__ == "__main__":
    main()
