"""Constrained decoding with xgrammar: compiled grammars (cached), per-sequence matchers, batch masks.

Both processes use this module: the server compiles a request's grammar before queueing it, so a bad
schema is a 400 and not a failed step; the engine process compiles it again (its own cache) on a thread of
its own before the sequence's first step, while the other sequences go on decoding (EngineCore.add). Per
step, `StructuredOutputs.grammar_bias` fills the token bitmasks of every constrained row in one xgrammar
call and turns them into a (S, V) bias of 0 / -inf that the sampler adds after taking the raw
log-probabilities (OpenAI's logprobs describe the model, not the constraint). The scheduler advances each
sequence's matcher as it appends the token (`Request.grammar`), and finishes the sequence with "stop" once
the matcher has terminated (the grammar is complete and EOS was drawn).

JSON is generated with bounded whitespace (`any_whitespace=False`: xgrammar's ", " / ": " separators and
no newlines), so a schema whose strings and arrays are bounded completes within a bounded length.
See bench/NOTES.md for why xgrammar rather than llguidance.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import xgrammar as xgr

from model.tokenizer import Tokenizer
from server.engine.request import Request, StructuredSpec

# Distinct grammars kept compiled in the engine. A JSON schema compiles for this vocabulary to ~0.05-1 MB,
# but an enum of 15,000 short values to 24 MB (12,000: 0.9 MB): the bytes are bounded too.
CACHE_ENTRIES = 128
CACHE_BYTES = 256 * 2**20
# Largest compiled grammar a request may bring (the server refuses a larger one with a 400): up to 64
# sequences can hold one each while they run.
MAX_GRAMMAR_BYTES = 16 * 2**20
_XGR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # "[13:01:52] /project/cpp/x.cc:94: " in messages


class StructuredError(ValueError):
    """The spec does not compile (bad JSON schema, regex or grammar); the message says why."""


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int | None = None) -> xgr.TokenizerInfo:
    """xgrammar's view of our byte-level BPE vocabulary; `vocab_size` is the model's (logit columns).
    A model with fewer logit columns than the tokenizer has tokens (a test's tiny model) sees only the
    first `vocab_size` tokens."""
    size = tokenizer.vocab_size if vocab_size is None else min(vocab_size, tokenizer.vocab_size)
    vocab = [tokenizer._backend.id_to_token(i) or "" for i in range(size)]
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    return xgr.TokenizerInfo(
        vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size or len(vocab), stop_token_ids=stop
    )


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of `choices` (JSON string escapes are also EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCache:
    """Compiles each distinct spec once; least recently used entries go first past CACHE_ENTRIES entries or
    CACHE_BYTES of compiled grammars (xgrammar's own count of each one's memory).

    Thread-safe: the server compiles in worker threads. Two threads missing on the same spec both
    compile it (same result); the lock is not held while compiling, which can take seconds.
    """

    def __init__(
        self, info: xgr.TokenizerInfo, max_entries: int = CACHE_ENTRIES, threads: int = 2,
        max_bytes: int = CACHE_BYTES,
    ) -> None:  # fmt: skip
        self.info = info
        # xgrammar's own cache is off: ours is keyed by the spec and bounded by entries and bytes
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self._cache: OrderedDict[StructuredSpec, xgr.CompiledGrammar] = OrderedDict()
        self._max = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._lock = threading.Lock()
        self.misses = 0

    def get(self, spec: StructuredSpec) -> xgr.CompiledGrammar:
        with self._lock:
            grammar = self._cache.get(spec)
            if grammar is not None:
                self._cache.move_to_end(spec)
                return grammar
        grammar = self.compile(spec)
        with self._lock:
            self.misses += 1
            if spec not in self._cache:
                self._cache[spec] = grammar
                self._bytes += grammar.memory_size_bytes
            while self._cache and (len(self._cache) > self._max or self._bytes > self._max_bytes):
                _, old = self._cache.popitem(last=False)
                self._bytes -= old.memory_size_bytes
        return grammar

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def compile(self, spec: StructuredSpec) -> xgr.CompiledGrammar:
        """`spec` compiled, not kept; StructuredError (a ValueError) saying why if it does not compile."""
        try:
            return self._compile_unchecked(spec)
        except StructuredError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError with a C++ location prefix
            raise StructuredError(_XGR_PREFIX.sub("", str(e)).strip()) from e

    def _compile_unchecked(self, spec: StructuredSpec) -> xgr.CompiledGrammar:
        c = self._compiler
        if spec.kind == "json":
            json.loads(spec.source)  # a JSONDecodeError (a ValueError) names the position
            return c.compile_json_schema(spec.source, any_whitespace=False)
        if spec.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if spec.kind == "regex":
            return c.compile_regex(spec.source)
        if spec.kind == "choice":
            choices = json.loads(spec.source)
            if not choices or not all(isinstance(x, str) for x in choices):
                raise StructuredError("choice must be a non-empty list of strings")
            return c.compile_grammar(choice_grammar(choices))
        if spec.kind == "grammar":
            return c.compile_grammar(spec.source)
        raise StructuredError(f"unknown structured output kind {spec.kind!r}")


@dataclass(slots=True)
class GrammarBias:
    """The step's constraint: rows (S,) of the sampling batch, and (S, V) float32 added to their logits:
    0 where the grammar allows the token, -inf where it does not."""

    rows: torch.Tensor
    bias: torch.Tensor


def _byte_table() -> torch.Tensor:
    """(256, 8) float32: row b holds 0 where bit j of b is set, -inf elsewhere."""
    bits = (torch.arange(256).view(-1, 1) >> torch.arange(8)) & 1
    return torch.where(bits.bool(), 0.0, -math.inf).float()


class StructuredOutputs:
    """Engine side: matchers for constrained sequences and the batch's allowed-token mask."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None) -> None:
        # one compiling thread: it runs beside the steps (EngineCore compiles before a request's first
        # step), and a second would take the core the steps' other GEMM thread runs on
        self.cache = GrammarCache(tokenizer_info(tokenizer, vocab_size), threads=1)
        self.vocab_size = self.cache.info.vocab_size
        # one thread: handing a call to a 2-thread pool cost up to ~4 ms on the 2-core box, while one
        # thread fills 32 rows in ~0.02 ms (bench/grammar_bench.py)
        self._batch = xgr.BatchGrammarMatcher(max_threads=1)
        self._table = _byte_table()

    def matcher(self, request: Request) -> xgr.GrammarMatcher:
        """The request's matcher, built at its first sample; output tokens it already has (none, unless
        it was built elsewhere first) are replayed, so it always stands after the last output token."""
        if request.grammar is None:
            spec = request.params.structured
            assert spec is not None
            matcher = xgr.GrammarMatcher(self.cache.get(spec))
            for token_id in request.output_token_ids:
                matcher.accept_token(token_id)
            request.grammar = matcher
        return request.grammar  # type: ignore[return-value]

    def grammar_bias(self, requests: list[Request], device: torch.device | str = "cpu") -> GrammarBias | None:
        """The grammar bias of the constrained requests among `requests` (the sampling rows, in order)."""
        rows = [i for i, r in enumerate(requests) if r.params.structured is not None]
        if not rows:
            return None
        matchers = [self.matcher(requests[i]) for i in rows]
        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)  # (S, ceil(V / 32)) int32
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)
        return GrammarBias(torch.tensor(rows, device=device), self.bias_from_bitmask(bitmask).to(device))

    def bias_from_bitmask(self, bitmask: torch.Tensor) -> torch.Tensor:
        """(S, W) int32, bit j of word k = token 32k + j -> (S, V) float32 of 0 / -inf.

        One table lookup per byte (little-endian: byte b of word k holds tokens 32k + 8b ..): at 32 rows
        ~0.8 ms, plus ~0.7 ms to add it to the logits, where shifting the bits out and a masked_fill
        took ~2.5 + ~9 ms on the 2-core box (bench/NOTES.md)."""
        rows = bitmask.shape[0]
        table = self._table.index_select(0, bitmask.contiguous().view(torch.uint8).view(-1).long())
        return table.view(rows, -1)[:, : self.vocab_size].contiguous()
