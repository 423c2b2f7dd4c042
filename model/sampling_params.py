"""What a request asks of the sampler (SamplingParams) and what it gets back per token (TokenLogprob).

They live in the model layer because the sampler (model/sampling.py) reads them; the engine re-exports
them from server.engine.request. The helpers below are the one place where greedy, an effective top-k and
the tokens banned before min_tokens are decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


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
                # Logits are divided by it: a tiny penalty overflows them to inf (NaN after softmax).
                0.01 <= self.repetition_penalty <= 2.0,
                f"repetition_penalty must be in [0.01, 2], got {self.repetition_penalty}",
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
        """The one definition of greedy: a temperature below GREEDY_EPS takes the argmax."""
        return self.temperature < GREEDY_EPS


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one token (sampled or prompt) and the top-N alternatives at its position."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # (token_id, logprob), most likely first; len = requested N


def clamp_top_k(top_k: int | None, vocab_size: int | None = None) -> int:
    """top_k as SamplingParams keeps it: -1 (off) for None, <= 0, or >= vocab_size, which keeps every
    token (the same as off, and torch.topk cannot take more than the vocabulary)."""
    if top_k is None or top_k <= 0 or (vocab_size is not None and top_k >= vocab_size):
        return -1
    return top_k


def banned_before_min_tokens(
    params: SamplingParams, eos_token_id: int | None, num_output_tokens: int = 0
) -> set[int]:
    """The tokens a sequence may not draw while it has fewer than params.min_tokens output tokens: its stop
    token ids and EOS (unless ignore_eos). Empty once min_tokens are reached."""
    if num_output_tokens >= params.min_tokens:
        return set()
    banned = set(params.stop_token_ids)
    if eos_token_id is not None and not params.ignore_eos:
        banned.add(eos_token_id)
    return banned
