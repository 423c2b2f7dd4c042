"""The typed messages that cross the boundary between the server's asyncio client and the engine core.

The core may live in a child process (pickled over pipes) or in a thread of the server (passed
through queues); the messages are the same plain dataclasses either way. Client -> core:
`AddRequests`, `AbortRequests`, `Shutdown`. Core -> client: `CoreReady` once, then one `StepOutputs`
after every loop turn (it doubles as the watchdog's heartbeat), and `CoreDead` if the core fails.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from model.sampling_params import SamplingParams, TokenLogprob, banned_before_min_tokens, clamp_top_k


@dataclass(slots=True)
class CoreRequest:
    """One sequence for the core (n > 1 requests are fanned out by the client, one per choice)."""

    request_id: str  # unique in the core: "{parent}-{index}" for fanned-out choices
    prompt_token_ids: list[int]
    params: SamplingParams  # n == 1
    arrival_time: float  # time.monotonic() when the client accepted it (the clock is system-wide)
    parent_id: str | None = None  # the caller-visible request id when fanned out
    index: int = 0  # choice index within the parent
    group_id: str | None = None  # the HTTP request it belongs to: caps the slots one request holds


@dataclass(slots=True)
class AddRequests:
    requests: list[CoreRequest]
    seq: int  # increasing; StepOutputs.last_add_seq says which adds the stats already count


@dataclass(slots=True)
class AbortRequests:
    request_ids: list[str]  # core request ids; unknown or finished ids are ignored


@dataclass(slots=True)
class Shutdown:
    """Stop the core loop after this message (the client has already drained or aborted)."""


@dataclass(slots=True)
class SeqOutput:
    """What one core sequence produced in one step (a delta)."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error"
    stop_token_id: int | None = None
    # Prompt logprobs this step's chunk produced (prompt positions in order, position 0 excluded);
    # reset_prompt_logprobs: the sequence was preempted and its prompt is recomputed from position 0.
    prompt_logprobs: list[TokenLogprob] | None = None
    reset_prompt_logprobs: bool = False
    num_cached_tokens: int = 0
    queue_time: float | None = None  # arrival to first scheduled, on the first output after that
    error: str | None = None


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks in use
    num_preemptions: int = 0  # total since start
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found
    num_prompt_tokens: int = 0  # total, of prompts done (their first token out)
    num_generation_tokens: int = 0  # total sampled
    num_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    num_steps: int = 0
    num_kv_blocks_used: int = 0
    spec_decode_num_draft_tokens: int = 0  # n-gram drafts verified, total
    spec_decode_num_accepted_tokens: int = 0  # drafts the model agreed with, total
    healthy: bool = True
    num_engine_restarts: int = 0
    compute_threads: int = 0  # CPU threads the steps run on now (fewer while other processes hold the CPUs)


@dataclass(slots=True)
class StepOutputs:
    outputs: list[SeqOutput]
    stats: EngineStats
    last_add_seq: int  # the newest AddRequests the core has taken in


@dataclass(frozen=True)
class RequestChecker:
    """What a request must satisfy before it may enter a step; built from the core's configuration so
    the client validates requests once, before they cross the boundary."""

    max_model_len: int
    max_waiting: int
    vocab_size: int | None
    eos_token_id: int | None
    max_num_seqs: int = 0  # the running batch's room: sequences that start at once do not wait

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Raise ValueError for any input that could fail inside a step; return the params to run.

        A step runs every request together, so one bad request must never reach it: an exception there
        kills the loop for all.
        """
        max_len = self.max_model_len
        if not 0 < len(prompt_token_ids) <= max_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; it must have 1 to {max_len}")
        if params.n > self.max_waiting:
            raise ValueError(f"n={params.n} is more than the engine can queue ({self.max_waiting})")
        if self.vocab_size is None:
            return params
        params.validate(self.vocab_size)
        low, high = min(prompt_token_ids), max(prompt_token_ids)
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"the prompt holds token id {bad}, outside the vocabulary [0, {self.vocab_size})"
            )
        if len(banned_before_min_tokens(params, self.eos_token_id)) >= self.vocab_size:
            raise ValueError(
                "stop_token_ids (with EOS) hold every token: none could be drawn before min_tokens"
            )
        top_k = clamp_top_k(params.top_k, self.vocab_size)
        return params if top_k == params.top_k else dataclasses.replace(params, top_k=top_k)


@dataclass(frozen=True)
class CoreInfo:
    """What the client needs to know about a core, sent once when it is ready."""

    checker: RequestChecker
    max_model_len: int
    num_blocks: int
    block_size: int
    kv_cache_bytes: int = 0
    compute_threads: int = 0


@dataclass(slots=True)
class CoreReady:
    info: CoreInfo


@dataclass(slots=True)
class CoreDead:
    """The core failed (a step raised, it could not start, or its process went away)."""

    reason: str


CoreInput = AddRequests | AbortRequests | Shutdown
CoreOutput = StepOutputs | CoreReady | CoreDead
