"""A deterministic stand-in for ModelRunner that exercises the block tables like real paged attention.

It keeps a fake KV pool holding token ids instead of K/V vectors: each step writes the chunk's tokens
into the slots its block table names, and checks that every earlier position already holds the right
token (so a wrong prefix-cache hit, a block shared by mistake or a lost block fails loudly). The next
token is a function of the whole context read back from the pool, so outputs are checkable against
`reference_tokens` and change if any position is wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from server.engine.request import Request, SampleResult, SamplingParams, TokenLogprob
from server.engine.scheduler import SchedulerOutput


def next_token(context: Sequence[int], vocab_size: int) -> int:
    """The 'model': position-weighted sum of the context, mixed, mod vocab."""
    acc = 0
    for position, token in enumerate(context):
        acc = (acc * 31 + token * (position + 1)) % 1_000_003
    return (acc * 7 + 1) % vocab_size


def repeating_token(context: Sequence[int], vocab_size: int) -> int:
    """A 'model' that mostly repeats itself, so n-gram drafts are often right and sometimes wrong: the
    token 5 back, bumped by one at every 13th position."""
    if len(context) < 5:
        return next_token(context, vocab_size)
    return (context[-5] + (len(context) % 13 == 0)) % vocab_size


FakeModel = Callable[[Sequence[int], int], int]


def fake_logprob(token_id: int, top_n: int) -> TokenLogprob:
    lp = -(token_id % 10) / 10
    return TokenLogprob(token_id, lp, 1, [(token_id, lp) for _ in range(top_n)])  # distinct, as real ones


def reference_tokens(
    prompt: Sequence[int],
    params: SamplingParams,
    vocab_size: int,
    eos_token_id: int | None = None,
    max_model_len: int = 1 << 30,
    model: FakeModel = next_token,
) -> list[int]:
    """What the engine must produce for `prompt` with the fake model (stop tokens, EOS, lengths)."""
    context, out = list(prompt), []
    while True:
        token = model(context, vocab_size)
        context.append(token)
        out.append(token)
        stops = token in params.stop_token_ids or (token == eos_token_id and not params.ignore_eos)
        if stops and len(out) >= params.min_tokens:
            return out
        if (params.max_tokens is not None and len(out) >= params.max_tokens) or len(context) >= max_model_len:
            return out


class FakeRunner:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        vocab_size: int = 1000,
        step_delay: float = 0.0,
        fail_at_step: int | None = None,
        hang_on_token: int | None = None,
        model: FakeModel = next_token,
    ) -> None:
        self.block_size = block_size
        self.model = model
        self.hang_on_token = hang_on_token  # a step holding a prompt with this token never ends
        self.vocab_size = vocab_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.step_delay = step_delay
        self.fail_at_step = fail_at_step
        self.num_steps = 0
        self.batch_sizes: list[int] = []  # sequences per step
        self.batched_tokens: list[int] = []  # tokens per step
        self.finished_ids: list[str] = []  # what plans reported as gone

    def execute(self, plan: SchedulerOutput) -> dict[str, SampleResult]:
        self.num_steps += 1
        if self.fail_at_step is not None and self.num_steps >= self.fail_at_step:
            raise RuntimeError("fake runner failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.hang_on_token is not None and any(
            self.hang_on_token in s.request.prompt_token_ids for s in plan.scheduled
        ):
            time.sleep(3600)
        self.batch_sizes.append(len(plan.scheduled))
        self.batched_tokens.append(sum(seq.num_tokens for seq in plan.scheduled))
        self.finished_ids.extend(plan.finished_ids)
        results: dict[str, SampleResult] = {}
        for seq in plan.scheduled:
            result = self._run_one(seq.request, seq.start, seq.num_tokens, seq.sample, seq.draft_token_ids)
            if result is not None:
                results[seq.request.request_id] = result
        return results

    def _slot(self, block_ids: list[int], position: int) -> tuple[int, int]:
        return block_ids[position // self.block_size], position % self.block_size

    def _run_one(
        self, request: Request, start: int, num_tokens: int, sample: bool, drafts: list[int]
    ) -> SampleResult | None:
        tokens = request.all_token_ids + drafts
        assert start + num_tokens <= len(tokens)
        assert not drafts or start + num_tokens == len(tokens), "drafts follow the last known token"
        assert len(request.block_ids) * self.block_size >= start + num_tokens, "block table too short"
        for position in range(start):  # what attention would read from earlier steps / the prefix cache
            block, offset = self._slot(request.block_ids, position)
            assert self.kv[block][offset] == tokens[position], (
                f"{request.request_id}: KV slot for position {position} holds the wrong token"
            )
        for position in range(start, start + num_tokens):
            block, offset = self._slot(request.block_ids, position)
            self.kv[block][offset] = tokens[position]
        prompt_lps = self._prompt_logprobs(request, start, num_tokens)
        if not sample:
            return SampleResult(None, prompt_logprobs=prompt_lps) if prompt_lps else None
        context = [
            self.kv[b][o] for b, o in (self._slot(request.block_ids, p) for p in range(start + num_tokens))
        ]
        first = start + num_tokens - len(drafts)  # the context of the first drawn token
        drawn = [self.model(context[: first + i], self.vocab_size) for i in range(1 + len(drafts))]  # type: ignore[arg-type]
        top_n = request.params.logprobs
        lps = [fake_logprob(t, top_n) if top_n is not None else None for t in drawn]
        result = SampleResult(drawn[0], lps[0], prompt_lps)
        if drafts:
            result.spec_token_ids, result.spec_logprobs = drawn, lps
        return result

    def _prompt_logprobs(self, request: Request, start: int, num_tokens: int) -> list[TokenLogprob] | None:
        top_n = request.params.prompt_logprobs
        if top_n is None:
            return None
        # Logits at positions start .. start+num_tokens-1 predict the tokens one further on.
        end = min(start + num_tokens + 1, request.num_prompt_tokens)
        return [fake_logprob(request.prompt_token_ids[p], top_n) for p in range(start + 1, end)]
