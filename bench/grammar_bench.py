"""Grammar engines on this vocabulary (SmolLM2, 49,152 tokens): xgrammar against llguidance.

    .venv/bin/python -m bench.grammar_bench               # prints the table, saves bench/results/grammar_bench.md
    .venv/bin/python -m bench.grammar_bench --batch 1,8

For each constraint, a fixed valid answer is tokenized and replayed token by token (teacher-forced) in B
matchers at once; a step is "fill the B rows' token bitmasks in one call" (xgrammar's
BatchGrammarMatcher with 1 or 2 threads, llguidance's LLExecutor with 2) and then one accepted token per matcher. Figures: compile
time of the grammar (cold, once), and the median fill and accept time per step. Both engines produce the
same compact JSON (", " and ": " separators, no free whitespace). Needs the default GGUF (tokenizer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llguidance
import llguidance.torch
import torch
import xgrammar as xgr

from model.defaults import require_default_model
from model.tokenizer import Tokenizer
from server.engine.structured import tokenizer_info

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
FAMILY = {
    "type": "object",
    "properties": {
        "surname": {"type": "string"},
        "members": {"type": "array", "items": PERSON, "maxItems": 4},
        "pet": {
            "anyOf": [{"type": "null"}, {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}}]
        },
    },
    "required": ["surname", "members", "pet"],
}
# constraint name -> (kind, source, a valid answer)
CASES: dict[str, tuple[str, Any, str]] = {
    "json schema (flat)": ("json", PERSON, '{"name": "Ada Lovelace", "age": 36}'),
    "json schema (nested)": (
        "json",
        FAMILY,
        '{"surname": "Curie", "members": [{"name": "Marie", "age": 66}, {"name": "Pierre", "age": 46}], '
        '"pet": {"kind": "cat"}}',
    ),
    "json object": ("json", {"type": "object"}, '{"city": "Paris", "population": 2102650, "capital": true}'),
    "regex": ("regex", r"[A-Z][a-z]+ [0-9]{3}-[0-9]{4}", "Alice 555-0199"),
}


class Engine:
    """compile(kind, source) -> grammar; matchers(grammar, n); fill(matchers, bitmask); accept(matchers, t)."""

    name: str
    compile: Callable[[str, Any], Any]
    matchers: Callable[[Any, int], list[Any]]
    fill: Callable[[list[Any], torch.Tensor], None]
    accept: Callable[[list[Any], int], None]


def xgrammar_engine(tokenizer: Tokenizer, threads: int) -> Engine:
    """threads: BatchGrammarMatcher's pool; with 2 on this 2-core box, each call's hand-off to the pool
    costs up to ~4 ms whatever the work, while one thread fills 32 rows in ~0.02 ms."""
    info = tokenizer_info(tokenizer)
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    batch = xgr.BatchGrammarMatcher(max_threads=threads)
    e = Engine()
    e.name = f"xgrammar ({threads} thread{'s' * (threads > 1)})"

    def compile_(kind: str, source: Any) -> Any:
        if kind == "json":
            return compiler.compile_json_schema(json.dumps(source), any_whitespace=False)
        return compiler.compile_regex(source)

    e.compile = compile_
    e.matchers = lambda g, n: [xgr.GrammarMatcher(g) for _ in range(n)]
    e.fill = lambda ms, bitmask: batch.batch_fill_next_token_bitmask(ms, bitmask)
    e.accept = lambda ms, t: [m.accept_token(t) for m in ms] and None
    return e


def llguidance_engine(tokenizer: Tokenizer) -> Engine:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tokenizer._backend.save(str(path))
        lltok = llguidance.LLTokenizer(str(path), eos_token=tokenizer.eos_token_id)
    executor = llguidance.LLExecutor(num_threads=2)
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    e = Engine()
    e.name = "llguidance"

    def compile_(kind: str, source: Any) -> Any:
        if kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(source, overrides=options)  # type: ignore[arg-type]
        else:
            grammar = llguidance.LLMatcher.grammar_from_regex(source)
        llguidance.LLMatcher(lltok, grammar)  # compiling happens when the first matcher is built
        return grammar

    e.compile = compile_
    e.matchers = lambda g, n: [llguidance.LLMatcher(lltok, g) for _ in range(n)]
    e.fill = lambda ms, bitmask: llguidance.torch.fill_next_token_bitmask_par(
        executor, [(m, i) for i, m in enumerate(ms)], bitmask
    )
    e.accept = lambda ms, t: [m.consume_token(t) for m in ms] and None
    return e


def measure(engine: Engine, tokens: list[int], kind: str, source: Any, batch: int) -> dict[str, float]:
    t0 = time.perf_counter()
    grammar = engine.compile(kind, source)
    compile_ms = (time.perf_counter() - t0) * 1e3
    matchers = engine.matchers(grammar, batch)
    bitmask = xgr.allocate_token_bitmask(batch, 49152)
    fills, accepts = [], []
    for t in tokens:
        t0 = time.perf_counter()
        engine.fill(matchers, bitmask)
        t1 = time.perf_counter()
        engine.accept(matchers, t)
        fills.append(t1 - t0)
        accepts.append(time.perf_counter() - t1)
    return {
        "compile_ms": compile_ms,
        "fill_ms": statistics.median(fills) * 1e3,
        "fill_max_ms": max(fills) * 1e3,
        "accept_ms": statistics.median(accepts) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", default="1,8,32", help="matchers filled per call")
    parser.add_argument("--out", default="bench/results/grammar_bench.md")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(require_default_model())
    engines = [xgrammar_engine(tokenizer, 1), xgrammar_engine(tokenizer, 2), llguidance_engine(tokenizer)]
    header = (
        "| constraint | B | engine | compile ms | fill ms/step (median) | fill ms (max) | accept ms/step |"
    )
    lines = [header, "|" + "---|" * 7]
    for name, (kind, source, answer) in CASES.items():
        tokens = tokenizer.encode(answer) + [tokenizer.eos_token_id]
        for batch in (int(b) for b in args.batch.split(",")):
            for engine in engines:
                r = measure(engine, tokens, kind, source, batch)
                lines.append(
                    f"| {name} | {batch} | {engine.name} | {r['compile_ms']:.1f} | {r['fill_ms']:.3f} | "
                    f"{r['fill_max_ms']:.2f} | {r['accept_ms']:.3f} |"
                )
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    note = (
        f"SmolLM2 vocabulary (49,152 tokens), {torch.get_num_threads()} torch threads, 2 grammar threads.\n\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("# grammar_bench\n\n" + note + table + "\n")
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
