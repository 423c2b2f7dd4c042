"""Continuous-batching scheduler: each step is a plan of (request, number of tokens to compute).

There are no prefill or decode phases (vLLM v1): a request carries `num_computed_tokens`, and each
step computes min(tokens it still lacks, budget left). Long prompts thus chunk across steps while
running decodes keep their one token a step; while nothing is decoding, the budget may be larger
(`idle_batched_tokens`), since no stream waits on the step. The budget is for prompt tokens (and draft
tokens): a decode's one row rides on top of it (as SGLang's chunked-prefill size), so a prompt's chunk
does not shrink as streams grow, and no stream waits a step because prompts took the budget; `max_num_seqs`
bounds those rows. Running requests go first (FCFS), then waiting ones while the token budget,
`max_num_seqs` and the block pool allow. When a running request needs a
block and none is left, the newest running request is preempted: its blocks are freed and it goes
back to the front of the queue to be recomputed (prompt + outputs so far), which leaves its output
unchanged. Its full blocks usually come back from the prefix cache.

Speculative decoding (`SchedulerConfig.speculative`, off by default): a greedy decode may be planned
with k n-gram draft tokens after its last token (1 + k tokens, KV slots for all). `update` appends the
drafts the model agreed with plus the model's next token, one by one through the stop checks, and counts
as computed only the positions before the first rejected draft.

n > 1: the engine adds n child requests. Child 0 leads; its siblings are held in the queue until
the leader's prompt is computed, so that the prompt's full blocks are in the prefix cache and the
siblings share them (ref counts) instead of recomputing them. Only the partial last block and at
least one token are recomputed per sibling. With prefix caching off, siblings are not held.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from server.engine.kv_cache import BlockAllocator
from server.engine.request import Request, RequestStatus, SampleResult
from server.engine.spec_decode import NgramProposer, SpecConfig, accept


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # > max_num_batched_tokens: the budget of a step in which no sequence has output yet (no stream
    # waits on the step), so a long prompt arriving alone is prefilled in fewer, larger chunks
    idle_batched_tokens: int = 0
    max_model_len: int = 8192
    block_size: int = 16
    num_blocks: int = 1024
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = 0  # > 0: at most this many prompt tokens per request per step
    eos_token_id: int | None = None
    # > 0: at most this many running sequences per HTTP request (its n x prompts), so one request
    # cannot hold every slot; its other sequences wait without blocking later requests.
    max_seqs_per_request: int = 0
    speculative: SpecConfig = field(default_factory=SpecConfig)  # n-gram drafts for greedy decodes

    def validate(self) -> None:
        if self.num_blocks * self.block_size < self.max_model_len:
            # Otherwise one request at full length could never fit, even alone.
            raise ValueError(
                f"KV pool of {self.num_blocks} blocks x {self.block_size} tokens is smaller than "
                f"max_model_len={self.max_model_len}"
            )
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.speculative.validate()


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    num_tokens: int  # tokens to compute this step, starting at `start` (1 + the drafts for a draft row)
    # guesses of the tokens after the last known one, computed after it this step and verified
    draft_token_ids: list[int] = field(default_factory=list)
    start: int = field(init=False)  # request.num_computed_tokens when planned
    sample: bool = field(init=False)  # the chunk reaches the end of the known tokens: sample one
    new_token_ids: list[int] = field(init=False, default_factory=list)  # what update() appended

    def __post_init__(self) -> None:
        self.start = self.request.num_computed_tokens
        self.sample = self.start + self.num_tokens >= self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # running requests first, then newly admitted
    preempted: list[Request] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # left since the last plan: drop their state


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator | None = None) -> None:
        config.validate()
        self.config = config
        self.allocator = allocator or BlockAllocator(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._leaders: dict[str, Request] = {}  # parent id -> child 0 of an n > 1 request
        self._finished_ids: list[str] = []
        self._running_per_group: dict[str, int] = {}
        self.num_preemptions = 0
        spec = config.speculative
        self.proposer = NgramProposer(spec) if spec.enabled else None
        self.num_draft_tokens = 0  # drafts verified, since start
        self.num_accepted_tokens = 0  # drafts the model agreed with

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler")
        if not 0 < request.num_tokens <= self.config.max_model_len:
            raise ValueError(f"{request.num_tokens} prompt tokens; the limit is {self.config.max_model_len}")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        if request.parent_id is not None and request.index == 0:
            self._leaders[request.parent_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self._count_running(request, -1)
        else:
            self.waiting.remove(request)
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    # ---- planning ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        if self.config.idle_batched_tokens > budget and not any(r.output_token_ids for r in self.running):
            budget = self.config.idle_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Request] = []
        budget = self._schedule_running(budget, scheduled, preempted)
        if not preempted:  # blocks are short: admitting more would only preempt again
            self._schedule_waiting(budget, scheduled)
        finished_ids: list[str] = []
        if scheduled:  # an empty plan is not run, so keep the ids for the next one
            finished_ids, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(scheduled, preempted, finished_ids)

    def _chunk(self, request: Request, budget: int, num_computed: int | None = None) -> int:
        if num_computed is None:
            num_computed = request.num_computed_tokens
        remaining = request.num_tokens - num_computed
        threshold = self.config.long_prefill_token_threshold
        if threshold > 0 and remaining > 1:
            remaining = min(remaining, threshold)
        return min(remaining, budget)

    def _schedule_running(self, budget: int, scheduled: list[ScheduledSeq], preempted: list[Request]) -> int:
        i = 0
        while i < len(self.running):
            request = self.running[i]
            decode = request.num_tokens - request.num_computed_tokens == 1  # one row, outside the budget
            if not decode and budget <= 0:  # a chunk waits for the next step; the decodes after it do not
                i += 1
                continue
            num_tokens = 1 if decode else self._chunk(request, budget)
            drafts = self._drafts(request, budget)
            # drafts are a bonus: with no room for their slots the request decodes plainly
            if drafts and self.allocator.allocate_for(request, 1 + len(drafts)):
                num_tokens = 1 + len(drafts)
            else:
                drafts = []
                while not self.allocator.allocate_for(request, num_tokens):
                    victim = self.running.pop()  # the newest; everything before index i is already planned
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is request:
                        return budget
            scheduled.append(ScheduledSeq(request, num_tokens, drafts))
            budget -= num_tokens - 1 if decode else num_tokens
            i += 1
        return budget

    def _drafts(self, request: Request, budget: int) -> list[int]:
        """Draft tokens for a decoding request, no more than plain decoding could still produce (the
        last draft's position gets a token too)."""
        if self.proposer is None or request.num_computed_tokens != request.num_tokens - 1:
            return []
        if len(self.running) > self.proposer.config.max_num_seqs:
            return []
        params = request.params
        if not self.proposer.eligible(params, request.num_output_tokens):
            return []
        room = min(
            budget, self.config.max_model_len - request.num_tokens - 1
        )  # the row itself is not budgeted
        if params.max_tokens is not None:
            room = min(room, params.max_tokens - request.num_output_tokens - 1)
        return self.proposer.propose(request.all_token_ids, room)

    def _schedule_waiting(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        held: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self._is_held(request) or self._is_capped(request):
                held.append(self.waiting.popleft())
                continue
            if not self._admit(request, budget, scheduled):
                break  # FCFS: later requests do not overtake one that does not fit
            self.waiting.popleft()
            budget -= scheduled[-1].num_tokens
        self.waiting.extendleft(reversed(held))
        return budget

    def _admit(self, request: Request, budget: int, scheduled: list[ScheduledSeq]) -> bool:
        hits: list[int] = []
        num_cached = 0
        if request.params.prompt_logprobs is None:  # cached positions would have no prompt logprobs
            hits, num_cached = self.allocator.get_computed_blocks(request.all_token_ids)
        num_tokens = self._chunk(request, budget, num_cached)
        if not self.allocator.allocate_for(request, num_tokens, hits):
            return False
        request.num_computed_tokens = num_cached
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            request.num_cached_tokens = num_cached
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self._count_running(request, 1)
        scheduled.append(ScheduledSeq(request, num_tokens))
        return True

    def _is_capped(self, request: Request) -> bool:
        cap = self.config.max_seqs_per_request
        return cap > 0 and self._running_per_group.get(request.slot_group, 0) >= cap

    def _count_running(self, request: Request, delta: int) -> None:
        group = request.slot_group
        count = self._running_per_group.get(group, 0) + delta
        if count:
            self._running_per_group[group] = count
        else:
            del self._running_per_group[group]

    def _is_held(self, request: Request) -> bool:
        if request.parent_id is None or request.index == 0 or not self.config.enable_prefix_caching:
            return False
        leader = self._leaders.get(request.parent_id)
        return leader is not None and leader.num_computed_tokens < leader.num_prompt_tokens

    def _preempt(self, request: Request) -> None:
        self._count_running(request, -1)
        self.allocator.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ---- after the step ------------------------------------------------------------------------
    def update(self, output: SchedulerOutput, sampled: dict[str, SampleResult]) -> list[Request]:
        """Advance the plan's requests by what was computed and sampled; return those that finished.

        A draft row appends its verified tokens one at a time, each checked for a stop as plain decoding
        would; the positions of rejected drafts are not counted as computed (their KV slots are written
        again by later steps)."""
        finished: list[Request] = []
        for seq in output.scheduled:
            request = seq.request
            if request.is_finished:
                continue
            if not seq.sample:
                request.num_computed_tokens += seq.num_tokens
                self.allocator.cache_full_blocks(request)
                continue
            token_ids = self._verified(seq, sampled[request.request_id])
            status: RequestStatus | None = None
            for token_id in token_ids:
                request.output_token_ids.append(token_id)
                seq.new_token_ids.append(token_id)
                status = self._status_after(request, token_id)
                if status is not None:
                    break
            rejected = len(seq.draft_token_ids) - (len(seq.new_token_ids) - 1)
            request.num_computed_tokens += seq.num_tokens - rejected
            self.allocator.cache_full_blocks(request)
            if status is not None:
                self.running.remove(request)
                self._count_running(request, -1)
                self._finish(request, status)
                finished.append(request)
        return finished

    def _verified(self, seq: ScheduledSeq, result: SampleResult) -> list[int]:
        """The tokens the step produced for `seq`: one, or for a draft row the accepted drafts + one."""
        if not seq.draft_token_ids:
            assert result.token_id is not None, f"runner sampled nothing for {seq.request.request_id}"
            return [result.token_id]
        assert result.spec_token_ids is not None, f"runner verified nothing for {seq.request.request_id}"
        token_ids = accept(seq.draft_token_ids, result.spec_token_ids)
        self.num_draft_tokens += len(seq.draft_token_ids)
        self.num_accepted_tokens += len(token_ids) - 1
        return token_ids

    def _status_after(self, request: Request, token_id: int) -> RequestStatus | None:
        if request.grammar is not None and not request.grammar.accept_token(token_id):
            # the mask allowed only grammar tokens, so only a grammar no token can continue gets here
            return RequestStatus.FINISHED_ERROR
        return self._stop_status(request, token_id)

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.params
        if request.grammar is not None and request.grammar.is_terminated():
            return RequestStatus.FINISHED_STOPPED  # the grammar is complete (and its EOS was drawn)
        if request.num_output_tokens >= params.min_tokens:
            if token_id == self.config.eos_token_id and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_token_id = token_id
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.allocator.free(request)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)
        if request.parent_id is not None and self._leaders.get(request.parent_id) is request:
            del self._leaders[request.parent_id]
