"""Request state owned by the engine, and what the engine hands back to its callers."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()  # EOS or a stop token id
    FINISHED_LENGTH = enum.auto()  # max_tokens or the context limit
    FINISHED_ABORTED = enum.auto()  # client went away, stop string found by the caller, shutdown
    FINISHED_ERROR = enum.auto()  # the engine failed while this request was in it

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS  # a dict lookup: `.value` comparisons are slow, and this runs per step

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    """A constraint on the output, small and picklable: the grammar itself is compiled where it is used
    (server/engine/structured.py), since compiled grammars and matchers do not cross processes.

    kind "json": `source` is a JSON schema (text); "json_object": any JSON object (`source` empty);
    "regex": a regular expression; "choice": a JSON list of the allowed strings; "grammar": EBNF (GBNF).
    """

    kind: StructuredKind
    source: str = ""


class TokenMatcher(Protocol):
    """The engine's view of a grammar matcher (xgrammar's GrammarMatcher has this shape)."""

    def accept_token(self, token_id: int) -> bool: ...
    def is_terminated(self) -> bool: ...


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # <= 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N log-probabilities of each sampled token (0 = just the token's)
    prompt_logprobs: int | None = None  # same for the prompt tokens
    structured: StructuredSpec | None = None  # constrained decoding (JSON schema, regex, choice, grammar)

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the bad field; the HTTP layer turns it into a 400."""
        checks: list[tuple[bool, str]] = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens must be at least 1, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (0.0 <= self.temperature <= 2.0, f"temperature must be in [0, 2], got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (
                self.top_k == -1 or self.top_k >= 0,
                f"top_k must be -1 (off) or non-negative, got {self.top_k}",
            ),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                0.0 < self.repetition_penalty <= 2.0,
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}",
            ),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= 20,
                f"logprobs must be in [0, 20], got {self.logprobs}",
            ),
            (
                self.seed is None or -(2**63) <= self.seed < 2**63,
                f"seed must be a signed 64-bit integer, got {self.seed}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for tid in self.stop_token_ids:
            if not 0 <= tid < vocab_size:
                raise ValueError(f"stop_token_ids contains {tid}, outside the vocabulary [0, {vocab_size})")
        for tid, bias in (self.logit_bias or {}).items():
            if not 0 <= tid < vocab_size:
                raise ValueError(f"logit_bias names token {tid}, outside the vocabulary [0, {vocab_size})")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias for token {tid} must be in [-100, 100], got {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one token (sampled or prompt) and the top-N alternatives at its position."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # (token_id, logprob), most likely first; len = requested N


@dataclass(slots=True)
class SampleResult:
    """What the runner produced for one scheduled sequence in one step.

    `token_id` is the sampled token; it is None only for a mid-prompt chunk that returns nothing but
    `prompt_logprobs`. `prompt_logprobs` holds the log-probabilities of the prompt tokens this chunk's
    logits predict: for the chunk [start, start+num_tokens), prompt positions start+1 ..
    min(start+num_tokens, num_prompt_tokens-1) (logits at position p predict token p+1). The engine
    concatenates the chunks (P-1 entries for a P-token prompt) and puts None for position 0.
    """

    token_id: int | None
    logprobs: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class CompletionOutput:
    """What one sequence produced since the last output (a delta)."""

    index: int  # which of the request's n choices
    new_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_token_id: int | None = None  # the token that stopped it, if a stop token did


@dataclass(slots=True)
class RequestOutput:
    """One delta for a (possibly n>1) request. Yielded by AsyncEngine.generate."""

    request_id: str
    outputs: list[CompletionOutput]
    finished: bool  # all n choices finished
    num_prompt_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only; None for token 0
    num_cached_tokens: int = 0
    error: str | None = None
    # Seconds from arrival in the engine to first scheduled; on the first output after that only.
    queue_time: float | None = None


@dataclass(eq=False)
class Request:
    """One sequence in the engine. n>1 requests are fanned out into one Request per choice."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    parent_id: str | None = None  # the caller-visible request id when fanned out (n > 1)
    index: int = 0  # choice index within the parent
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    stop_token_id: int | None = None
    # The grammar state of a structured request, built by the runner at its first sample; it has
    # accepted every output token, which a preemption keeps, so a recompute needs no rollback.
    grammar: TokenMatcher | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def output_id(self) -> str:
        return self.parent_id if self.parent_id is not None else self.request_id
