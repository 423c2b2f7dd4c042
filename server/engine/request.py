"""Request state owned by the engine, and what the engine hands back to its callers."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

from model.sampling_params import SamplingParams, StructuredKind, StructuredSpec, TokenLogprob

__all__ = [
    "CompletionOutput",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "SampleResult",
    "SamplingParams",
    "StructuredKind",
    "StructuredSpec",
    "TokenLogprob",
    "TokenMatcher",
]


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


class TokenMatcher(Protocol):
    """The engine's view of a grammar matcher (xgrammar's GrammarMatcher has this shape)."""

    def accept_token(self, token_id: int) -> bool: ...
    def is_terminated(self) -> bool: ...


@dataclass(slots=True)
class SampleResult:
    """What the runner produced for one scheduled sequence in one step.

    `token_id` is the sampled token; it is None only for a mid-prompt chunk that returns nothing but
    `prompt_logprobs`. `prompt_logprobs` holds the log-probabilities of the prompt tokens this chunk's
    logits predict: for the chunk [start, start+num_tokens), prompt positions start+1 ..
    min(start+num_tokens, num_prompt_tokens-1) (logits at position p predict token p+1). The engine
    concatenates the chunks (P-1 entries for a P-token prompt) and puts None for position 0.

    For a row that computed k draft tokens after its last token, `spec_token_ids` holds the model's
    token at each of the 1 + k positions (the first is `token_id`), and `spec_logprobs` their
    logprobs if asked; the scheduler keeps those the drafts lead to (server/engine/spec_decode.py).
    """

    token_id: int | None
    logprobs: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    spec_token_ids: list[int] | None = None
    spec_logprobs: list[TokenLogprob | None] | None = None


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
    error_status: int = 500  # the HTTP status the error is answered with: 503 for a server shutting down
    # or an engine core that died (the request can be sent again), 500 for a failure of this request
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
    group_id: str | None = None  # the HTTP request it belongs to (its running slots are capped)
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    first_scheduled_time: float | None = None
    stop_token_id: int | None = None
    first_output_sent: bool = False  # queue time and cached tokens go out once
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

    @property
    def slot_group(self) -> str:
        """The key under which running slots are counted: the HTTP request, else the caller's request."""
        return self.group_id if self.group_id is not None else self.output_id
