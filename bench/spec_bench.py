"""Speculative decoding with n-gram drafts (`--speculative-ngram K`) against plain decoding, offline.

    python -m bench.spec_bench [--k 3] [--streams 1,32] [--workloads quote,free] [--max-tokens 192]
                               [--repeat 3] [--out bench/results]

Two engines over the same prepared model (the server's: bf16, int4/int8 copies where lossless, the
server's thread setup), one plain, one with n-gram drafts; everything else equal. Workloads, greedy:
  quote  the chat model is asked to repeat a given paragraph word for word (the repetitive case);
  free   it is asked to write about a topic (drafts are rarely right: the cost of trying).
At 1 stream the workload's prompts run one after another, each alone; at N streams, N requests (the
prompts cycled) run at once. tok/s counts generated tokens over wall time, prefill included; plain and
speculative runs alternate --repeat times and the table gives medians. "same" says whether both
engines produced identical tokens for every request.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.engine_bench import model_source
from bench.report import save_table
from model.prepared import load_prepared
from model.threads import usable_cpus
from model.tokenizer import Tokenizer
from server.app import make_core
from server.engine.engine import LLMEngine
from server.engine.request import SamplingParams
from server.settings import Settings

PARAGRAPHS = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a "
    "folded cloth. He polished the great lens until it shone, trimmed the wick, and struck a match. "
    "Ships far out at sea saw the beam sweep across the water and knew that the rocks were near. In "
    "winter the storms shook the tower, but the light never failed, and the keeper wrote each night in "
    "his logbook the hour, the wind, and the names of the ships that passed.",
    "To make a simple loaf of bread, mix five hundred grams of flour with ten grams of salt and seven "
    "grams of dried yeast. Add three hundred and fifty millilitres of warm water and stir until a rough "
    "dough forms. Knead it on a floured table for ten minutes, until it is smooth and elastic. Leave it "
    "in a covered bowl for an hour, shape it into a loaf, let it rise again, and bake it at two hundred "
    "and twenty degrees for thirty minutes.",
    "Our library is open from nine in the morning until eight in the evening on weekdays, and from ten "
    "until four on Saturdays. Members may borrow up to six books at a time for three weeks. Books can be "
    "renewed twice online or at the front desk, unless another member has reserved them. Please return "
    "books to the drop box by the main entrance when the library is closed. Lost cards can be replaced "
    "at the desk for a small fee.",
    "The river begins as a spring high in the mountains, where snow melts slowly through the summer. It "
    "runs down through pine forests and narrow valleys, gathering streams along the way, until it "
    "reaches the plain. There it slows and widens, winding past farms and villages, and finally it "
    "flows through the old city, under seven stone bridges, before it meets the sea in a wide and "
    "quiet estuary full of birds.",
]
TOPICS = ["a trip to the mountains", "how computers work", "your favourite meal", "the history of tea"]


def prompts(tokenizer: Tokenizer, workload: str) -> list[list[int]]:
    if workload == "quote":
        texts = [f"Repeat the following paragraph word for word.\n\n{p}" for p in PARAGRAPHS]
    else:
        texts = [f"Write a few paragraphs about {t}." for t in TOPICS]
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}])) for t in texts]


def build(model: torch.nn.Module, tokenizer: Tokenizer, k: int, max_num_seqs: int) -> LLMEngine:
    settings = Settings(
        speculative_ngram=k, speculative_max_num_seqs=max_num_seqs, kv_cache_memory=256 * 1024**2,
        max_model_len=2048,
    )  # fmt: skip
    core = make_core(model, tokenizer.eos_token_id, settings, tokenizer)
    return LLMEngine(core.runner, core.scheduler, core.config)


def run(engine: LLMEngine, batches: list[list[list[int]]], max_tokens: int) -> tuple[float, list, int]:
    """(tok/s, tokens per request, steps): each batch's prompts run together, batches one after another."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    engine.scheduler.allocator.reset_prefix_cache()
    outputs: list[list[int]] = []
    steps, t0 = 0, time.perf_counter()
    for b, batch in enumerate(batches):
        got: dict[str, list[int]] = {}
        for i, prompt in enumerate(batch):
            engine.add_request(f"b{b}-{i}", prompt, params)
            got[f"b{b}-{i}"] = []
        while engine.has_unfinished():
            steps += 1
            for out in engine.step():
                got[out.request_id].extend(out.outputs[0].new_token_ids)
        outputs.extend(got.values())
    elapsed = time.perf_counter() - t0
    return sum(len(o) for o in outputs) / elapsed, outputs, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=3, help="draft tokens per step (--speculative-ngram)")
    ap.add_argument("--streams", default="1,32")
    ap.add_argument("--workloads", default="quote,free")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--max-num-seqs", type=int, default=4, help="--speculative-max-num-seqs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (0: as the server, cores - 1 for small ops, GEMMs on all)",
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    cores = usable_cpus()
    torch.set_num_threads(args.threads or max(1, cores - 1))  # as the server's engine runs
    source = model_source(args.model)
    model = load_prepared(source, "bfloat16", "cpu", "auto", "auto")
    model.use_compute_threads(args.threads or cores)
    tokenizer = Tokenizer.from_file(source)
    plain = build(model, tokenizer, 0, args.max_num_seqs)
    spec = build(model, tokenizer, args.k, args.max_num_seqs)
    run(plain, [prompts(tokenizer, "quote")[:1]], 16)  # warm-up
    run(spec, [prompts(tokenizer, "quote")[:1]], 16)
    rows = []
    for workload in args.workloads.split(","):
        ps = prompts(tokenizer, workload)
        for n in (int(s) for s in args.streams.split(",")):
            batches = [[p] for p in ps] if n == 1 else [[ps[i % len(ps)] for i in range(n)]]
            rates: dict[str, list[float]] = {"plain": [], "spec": []}
            sched = spec.scheduler
            drafted0, accepted0 = sched.num_draft_tokens, sched.num_accepted_tokens
            same, steps = True, {}
            for _ in range(args.repeat):
                rate_p, out_p, steps["plain"] = run(plain, batches, args.max_tokens)
                rate_s, out_s, steps["spec"] = run(spec, batches, args.max_tokens)
                rates["plain"].append(rate_p)
                rates["spec"].append(rate_s)
                same = same and out_p == out_s
            drafted = sched.num_draft_tokens - drafted0
            accepted = sched.num_accepted_tokens - accepted0
            p, s = statistics.median(rates["plain"]), statistics.median(rates["spec"])
            tokens = sum(len(o) for o in out_s)
            print(
                f"{workload} x{n}: plain {p:.0f} tok/s, spec {s:.0f} tok/s ({s / p:.2f}x), "
                f"acceptance {accepted / max(drafted, 1):.2f}, same {same}",
                flush=True,
            )
            rows.append(
                f"| {workload} | {n} | {args.k} | {tokens} | {p:.0f} | {s:.0f} | {s / p:.2f}x | "
                f"{accepted / max(drafted, 1):.0%} | {steps['plain'] / max(steps['spec'], 1):.2f} | "
                f"{'yes' if same else 'no'} |"
            )
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    lines = [
        f"# Speculative decoding (n-gram drafts), {stamp}",
        "",
        f"`python -m bench.spec_bench {' '.join(sys.argv[1:])}`; bf16 on CPU, {cores} cores, "
        f"{args.threads or 'server'} threads, greedy, "
        f"up to {args.max_tokens} new tokens, median of {args.repeat} alternating runs.",
        "",
        "| workload | streams | k | tokens | plain tok/s | spec tok/s | speedup | drafts accepted | "
        "steps saved (plain/spec) | same output |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    save_table(lines, Path(args.out) / f"spec-{stamp}.md")


if __name__ == "__main__":
    main()
