"""Speculative decoding without a draft model: n-gram (prompt-lookup) drafting, as vLLM v1's ngram proposer.

A decode step that computes the last sampled token can as well compute k more positions, if it knows
which tokens to put there. When a text repeats itself (quoting, editing, code with recurring names),
the tokens that followed the latest earlier occurrence of the context's last n tokens are a good guess.
The scheduler plans 1 + k tokens for such a request, the runner draws the model's token at each of the
1 + k positions, and `accept` keeps the drafts up to the first one the model disagrees with, plus the
model's own token there: 1 to k + 1 tokens per step, exactly those plain decoding would produce (for
greedy requests, the only ones drafted for; see `NgramProposer.eligible`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.sampling_params import SamplingParams


@dataclass(frozen=True)
class SpecConfig:
    num_speculative_tokens: int = 0  # k, the most draft tokens per request and step; 0: off
    ngram_min: int = 2  # shortest context suffix looked up (one token matches too often to pay)
    ngram_max: int = 4
    # draft only while at most this many sequences run: a bigger CPU step is compute-bound, so each
    # draft row costs about what a decode row does, and a rejected one is pure loss
    max_num_seqs: int = 4

    def validate(self) -> None:
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")

    @property
    def enabled(self) -> bool:
        return self.num_speculative_tokens > 0


class NgramProposer:
    def __init__(self, config: SpecConfig) -> None:
        config.validate()
        self.config = config

    @staticmethod
    def eligible(params: SamplingParams, num_output_tokens: int) -> bool:
        """Requests whose token at a position depends on nothing but the logits there. Sampled requests
        decode plainly (verifying their drafts would need rejection sampling to keep the distribution);
        penalties and min_tokens depend on the tokens before each position, a grammar on its state."""
        return (
            params.greedy
            and params.structured is None
            and params.repetition_penalty == 1.0
            and not params.presence_penalty
            and not params.frequency_penalty
            and num_output_tokens >= params.min_tokens
        )

    def propose(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens that followed the latest earlier occurrence of the longest suffix of
        `token_ids` of ngram_min..ngram_max tokens; [] when there is none."""
        k = min(self.config.num_speculative_tokens, max_tokens)
        if k <= 0 or len(token_ids) <= self.config.ngram_min:
            return []
        ids = np.asarray(token_ids, dtype=np.int64)
        last = len(ids) - 1
        # ends[i]: where an earlier window matching the suffix ends; a token must follow it, so < last
        ends = np.flatnonzero(ids[:last] == ids[last])
        best = ends if self.config.ngram_min <= 1 else None
        for n in range(2, min(self.config.ngram_max, last) + 1):
            ends = ends[ends >= n - 1]
            ends = ends[ids[ends - (n - 1)] == ids[last - (n - 1)]]
            if ends.size == 0:
                break
            if n >= self.config.ngram_min:
                best = ends
        if best is None or best.size == 0:
            return []
        start = int(best[-1]) + 1
        return ids[start : start + k].tolist()


def accept(draft_token_ids: Sequence[int], model_token_ids: Sequence[int]) -> list[int]:
    """The tokens a verified row produces: the drafts up to the first the model disagrees with, then
    the model's own token there. model_token_ids[i] is the model's token after drafts[:i]."""
    n = 0
    while n < len(draft_token_ids) and draft_token_ids[n] == model_token_ids[n]:
        n += 1
    return list(model_token_ids[: n + 1])
