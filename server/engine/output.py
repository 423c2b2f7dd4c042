"""The client side's output processor: n > 1 fan-out and merge, prompt-logprob assembly, aborts.

A caller's request with n choices becomes n core sequences "{id}-{i}" (one for n = 1, under the
caller's id). Each core step's `SeqOutput`s come back here and leave as one `RequestOutput` delta per
caller request. Prompt logprobs are asked of choice 0 alone (the prompt is the same for all), gathered
chunk by chunk, and sent with the first sampled token. An abort ends the choices here at once, with
finish_reason "abort"; whatever the core still sends for them is dropped.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from server.engine.messages import CoreRequest, SeqOutput
from server.engine.request import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob


@dataclass
class _Group:
    """A caller-visible request: its choices' core ids and the prompt logprobs gathered so far."""

    request_id: str
    core_ids: list[str]  # choice i -> core request id
    num_prompt_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None  # None when not asked for
    unfinished: set[int]  # choice indices still running
    prompt_logprobs_sent: bool = False
    queue_time_sent: bool = False
    num_cached_tokens: int = 0
    leader_has_output: bool = False
    pending_queue_time: float | None = None  # arrived, not yet sent

    @property
    def finished(self) -> bool:
        return not self.unfinished


class OutputProcessor:
    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}
        self._by_core_id: dict[str, tuple[_Group, int]] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    @property
    def num_sequences(self) -> int:
        return len(self._by_core_id)

    def add(
        self, request_id: str, prompt: list[int], params: SamplingParams, group_id: str | None = None
    ) -> list[CoreRequest]:
        """Register a caller request; return its core sequences (one per choice)."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already running")
        now = time.monotonic()
        requests = []
        for i in range(params.n):
            if params.n == 1:
                core_id, parent, child = request_id, None, dataclasses.replace(params)
            else:
                # Distinct seeds, or the n seeded choices would all be the same; prompt logprobs once.
                seed = None if params.seed is None else params.seed + i
                top = params.prompt_logprobs if i == 0 else None
                core_id, parent = f"{request_id}#{i}", request_id  # "#": no X-Request-Id holds one
                child = dataclasses.replace(params, n=1, seed=seed, prompt_logprobs=top)
            if core_id in self._by_core_id:
                raise ValueError(f"request id {core_id!r} is already running")
            requests.append(CoreRequest(core_id, prompt, child, now, parent, i, group_id))
        prompt_lp: list[TokenLogprob | None] | None = None if params.prompt_logprobs is None else [None]
        group = _Group(
            request_id, [r.request_id for r in requests], len(prompt), prompt_lp, set(range(params.n))
        )
        self._groups[request_id] = group
        for r in requests:
            self._by_core_id[r.request_id] = (group, r.index)
        return requests

    def abort(self, request_id: str, index: int | None = None) -> tuple[list[str], RequestOutput | None]:
        """End every choice of a request, or choice `index` alone (the others go on). Returns the core
        ids to abort and the output that ends them, or ([], None) if nothing was running."""
        group = self._groups.get(request_id)
        if group is None:
            return [], None
        indices = sorted(group.unfinished if index is None else group.unfinished & {index})
        if not indices:
            return [], None
        for i in indices:
            self._end(group, i)
        completions = [CompletionOutput(i, [], finish_reason="abort") for i in indices]
        return [group.core_ids[i] for i in indices], self._request_output(group, completions)

    def fail_all(self, reason: str) -> list[RequestOutput]:
        """End every request with an error (the core died): answered 503, as any request refused while the
        core restarts, so clients that retry on it (the openai SDK and most proxies do) send it again."""
        outputs = []
        for group in list(self._groups.values()):
            completions = [CompletionOutput(i, [], finish_reason="error") for i in sorted(group.unfinished)]
            for i in list(group.unfinished):
                self._end(group, i)
            out = self._request_output(group, completions)
            out.error, out.error_status = reason, 503
            outputs.append(out)
        return outputs

    def process(self, outputs: list[SeqOutput]) -> list[RequestOutput]:
        """One delta per caller request from one core step's outputs."""
        deltas: dict[str, tuple[_Group, list[CompletionOutput]]] = {}
        errors: dict[str, str] = {}
        for out in outputs:
            entry = self._by_core_id.get(out.request_id)
            if entry is None:  # aborted here already
                continue
            group, index = entry
            completions = deltas.setdefault(group.request_id, (group, []))[1]
            if index == 0:
                self._leader_output(group, out)
            if out.error is not None:
                errors[group.request_id] = out.error
            if not out.new_token_ids and out.finish_reason is None:
                continue
            completions.append(
                CompletionOutput(index, out.new_token_ids, out.logprobs, out.finish_reason, out.stop_token_id)
            )
            if out.finish_reason is not None:
                self._end(group, index)
        results = []
        for rid, (group, completions) in deltas.items():
            if not completions and rid not in errors:
                continue
            result = self._request_output(group, completions)
            result.error = errors.get(rid)
            results.append(result)
        return results

    def _leader_output(self, group: _Group, out: SeqOutput) -> None:
        if out.queue_time is not None and not group.queue_time_sent:
            group.pending_queue_time = out.queue_time
            group.num_cached_tokens = out.num_cached_tokens
        if out.new_token_ids:
            group.leader_has_output = True
        if group.prompt_logprobs is None or group.prompt_logprobs_sent:
            return
        if out.reset_prompt_logprobs:
            group.prompt_logprobs = [None]  # preempted: the prompt is recomputed from position 0
        if out.prompt_logprobs:
            room = group.num_prompt_tokens - len(group.prompt_logprobs)
            group.prompt_logprobs.extend(out.prompt_logprobs[:room])

    def _request_output(self, group: _Group, completions: list[CompletionOutput]) -> RequestOutput:
        prompt_logprobs = None
        if group.prompt_logprobs is not None and not group.prompt_logprobs_sent and group.leader_has_output:
            prompt_logprobs, group.prompt_logprobs_sent = group.prompt_logprobs, True
        queue_time = None
        if group.pending_queue_time is not None and not group.queue_time_sent:
            queue_time, group.queue_time_sent = group.pending_queue_time, True
        if group.finished:
            self._groups.pop(group.request_id, None)
        return RequestOutput(
            request_id=group.request_id,
            outputs=completions,
            finished=group.finished,
            num_prompt_tokens=group.num_prompt_tokens,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=group.num_cached_tokens,
            queue_time=queue_time,
        )

    def _end(self, group: _Group, index: int) -> None:
        group.unfinished.discard(index)
        self._by_core_id.pop(group.core_ids[index], None)


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One delta equal to `first` followed by `later` (for a consumer slower than the engine)."""
    by_index = {c.index: dataclasses.replace(c, new_token_ids=list(c.new_token_ids)) for c in first.outputs}
    for c in later.outputs:
        merged = by_index.get(c.index)
        if merged is None:
            by_index[c.index] = c
            continue
        merged.new_token_ids.extend(c.new_token_ids)
        if merged.logprobs is not None or c.logprobs is not None:
            merged.logprobs = (merged.logprobs or []) + (c.logprobs or [])
        merged.finish_reason = c.finish_reason or merged.finish_reason
        merged.stop_token_id = c.stop_token_id if c.stop_token_id is not None else merged.stop_token_id
    return dataclasses.replace(
        later,
        outputs=sorted(by_index.values(), key=lambda c: c.index),
        prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None else later.prompt_logprobs,
        error=later.error or first.error,
        queue_time=first.queue_time if first.queue_time is not None else later.queue_time,
    )
