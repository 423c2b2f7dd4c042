"""Batched sampler: one call per engine step turns the logits of every row that needs a token into tokens.

Order of operations (as vLLM v1):
  1. log-probabilities for the output are taken from the raw logits (log_softmax before any processing);
  2. logit_bias is added, banned tokens (min_tokens: eos + stop ids) are set to -inf;
  3. repetition penalty over prompt + output tokens (HF/vLLM: divide positive logits, multiply negative ones);
  4. presence / frequency penalties over output tokens only (OpenAI: logit -= freq * count + pres * [count > 0]);
  5. greedy rows take the argmax of the processed logits; random rows go on with
     temperature -> top-k -> top-p -> min-p, then draw one token.

Design choices driven by the 2-core CPU this runs on (see bench/sampling_bench.py):
  - Everything not used by any row of the batch is skipped; an all-greedy batch without processors is a
    single argmax.
  - Drawing: inverse CDF with ONE uniform per row (softmax, cumsum, searchsorted). The exponential-race trick
    (argmax of probs / q, q ~ Exp(1)) needs V exponentials per row; on this CPU drawing those costs ~20x a
    softmax, so it would dominate the step. A seeded row draws its uniform from its own torch.Generator and
    every operation is row-wise, so a seeded request yields the same tokens whatever else is in the batch.
  - top-k uses torch.topk; top-p avoids sorting the whole vocabulary: it takes the top K candidates
    (K = max(256, largest top_k)) and only rows whose nucleus is not inside those candidates fall back
    to a full sort. min-p is a threshold in logit space (logit >= max_logit + log(min_p)), no softmax.
  - sample() modifies the logits it is given in place; the runner makes them fresh every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams, TokenLogprob

_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
_TOP_P_CANDIDATES = 256  # nucleus candidates taken with topk before falling back to a full sort


@dataclass(slots=True)
class SamplingBatch:
    """Per-step tensors for the rows of one sample() call. Fields a batch does not use are None."""

    num_rows: int
    greedy_rows: torch.Tensor | None  # (G,) long row indices; None when no row is greedy
    random_rows: torch.Tensor | None  # (R,) long row indices; None when no row samples
    # Per random row (indexed in random_rows order):
    temperature: torch.Tensor | None  # (R, 1); None when every random row has temperature 1
    top_k: torch.Tensor | None  # (R,) long, 0 = off
    max_top_k: int
    top_p: torch.Tensor | None  # (R,), 1.0 = off
    min_p: torch.Tensor | None  # (R, 1), 0.0 = off
    seeded: list[tuple[int, torch.Generator]]  # (position in random_rows, generator)
    unseeded: torch.Tensor | None  # (U,) positions in random_rows drawn from the global generator
    # Per row (all rows):
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, values)
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) forced to -inf
    repetition_penalty: torch.Tensor | None  # (B, 1)
    presence_penalty: torch.Tensor | None  # (B, 1)
    frequency_penalty: torch.Tensor | None  # (B, 1)
    output_ids: torch.Tensor | None  # (B, L) long, padded with -1; only when penalties are used
    prompt_ids: torch.Tensor | None  # (B, P) long, padded with -1; only for the repetition penalty
    logprobs: list[int | None]  # requested top-N per row (None = no logprobs for that row)
    logprob_rows: torch.Tensor | None  # (L,) rows that asked for logprobs

    @property
    def all_greedy(self) -> bool:
        return self.random_rows is None

    @property
    def needs_penalties(self) -> bool:
        return self.output_ids is not None

    @property
    def max_logprobs(self) -> int:
        """The largest top-N any row asked for; -1 when no row wants logprobs."""
        return max((n for n in self.logprobs if n is not None), default=-1)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        output_token_ids: list[list[int]],
        prompt_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        device: torch.device | str = "cpu",
        banned_token_ids: list[list[int]] | None = None,
    ) -> SamplingBatch:
        """Gather the batch's parameters into tensors.

        `generators[i]` is the persistent generator of a seeded request (None if unseeded); the runner
        keeps it across steps (see make_generator). `banned_token_ids[i]` lists the tokens row i may not
        produce this step (eos + stop ids while fewer than min_tokens were generated).
        """
        greedy = [i for i, p in enumerate(params) if p.temperature < _EPS]
        rand = [i for i, p in enumerate(params) if p.temperature >= _EPS]
        rand_params = [params[i] for i in rand]
        rep = [p.repetition_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        use_rep = any(r != 1.0 for r in rep)
        use_penalties = use_rep or any(pres) or any(freq)
        logprobs = [p.logprobs for p in params]
        seeded = [(j, g) for j, i in enumerate(rand) if (g := generators[i]) is not None]
        unseeded = [j for j, i in enumerate(rand) if generators[i] is None]
        return cls(
            num_rows=len(params),
            greedy_rows=_index(greedy, device) if greedy else None,
            random_rows=_index(rand, device) if rand else None,
            temperature=_column([p.temperature for p in rand_params], 1.0, device),
            top_k=_top_k(rand_params, device),
            max_top_k=max((p.top_k for p in rand_params), default=0),
            top_p=_row([p.top_p for p in rand_params], 1.0, device),
            min_p=_column([p.min_p for p in rand_params], 0.0, device),
            seeded=seeded,
            unseeded=_index(unseeded, "cpu") if unseeded else None,
            logit_bias=_logit_bias(params, device),
            banned=_banned(banned_token_ids, device),
            repetition_penalty=_column(rep, 1.0, device) if use_penalties else None,
            presence_penalty=_column(pres, 0.0, device) if use_penalties else None,
            frequency_penalty=_column(freq, 0.0, device) if use_penalties else None,
            output_ids=_padded(output_token_ids, device) if use_penalties else None,
            prompt_ids=_padded(prompt_token_ids, device) if use_rep else None,
            logprobs=logprobs,
            logprob_rows=_index([i for i, n in enumerate(logprobs) if n is not None], device)
            if any(n is not None for n in logprobs)
            else None,
        )


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None] | None  # per row; None when no row asked for logprobs


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator of a seeded request; create once per request and keep it across steps."""
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------- build helpers


def _index(rows: list[int], device: torch.device | str) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _row(values: list[float], neutral: float, device: torch.device | str) -> torch.Tensor | None:
    if all(v == neutral for v in values):
        return None
    return torch.tensor(values, dtype=torch.float32, device=device)


def _column(values: list[float], neutral: float, device: torch.device | str) -> torch.Tensor | None:
    row = _row(values, neutral, device)
    return None if row is None else row.unsqueeze(1)


def _top_k(params: list[SamplingParams], device: torch.device | str) -> torch.Tensor | None:
    ks = [max(p.top_k, 0) for p in params]
    return torch.tensor(ks, dtype=torch.long, device=device) if any(ks) else None


def _padded(seqs: list[list[int]], device: torch.device | str) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), max(width, 1)), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def _logit_bias(
    params: list[SamplingParams], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    entries = [(i, tid, b) for i, p in enumerate(params) for tid, b in (p.logit_bias or {}).items()]
    if not entries:
        return None
    rows, tids, biases = zip(*entries, strict=True)
    return _index(list(rows), device), _index(list(tids), device), torch.tensor(biases, device=device)


def _banned(
    banned: list[list[int]] | None, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    entries = [(i, tid) for i, tids in enumerate(banned or []) for tid in tids]
    if not entries:
        return None
    rows, tids = zip(*entries, strict=True)
    return _index(list(rows), device), _index(list(tids), device)


# ---------------------------------------------------------------------------------------------- sampling


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Pick one token per row of `logits` (B, V) float32. Modifies `logits` in place."""
    assert logits.shape[0] == batch.num_rows, (logits.shape, batch.num_rows)
    raw_logprobs = None
    if batch.logprob_rows is not None:
        raw_logprobs = torch.log_softmax(logits.index_select(0, batch.logprob_rows), dim=-1)  # (L, V)
    _apply_processors(logits, batch)
    tokens = _choose(logits, batch)  # (B,) long
    token_list = tokens.tolist()
    if raw_logprobs is None:
        return SamplerOutput(token_list, None)
    assert batch.logprob_rows is not None
    rows = batch.logprob_rows.tolist()
    top_n = [batch.logprobs[r] or 0 for r in rows]
    infos = _token_logprobs(raw_logprobs, tokens.index_select(0, batch.logprob_rows), top_n)
    out: list[TokenLogprob | None] = [None] * batch.num_rows
    for r, info in zip(rows, infos, strict=True):
        out[r] = info
    return SamplerOutput(token_list, out)


def prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, n: int) -> list[TokenLogprob]:
    """Log-probabilities of `target_ids` (T,) under `logits` (T, V), with the top-n alternatives each."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return _token_logprobs(logprobs, target_ids, [n] * logits.shape[0])


def _token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, top_n: list[int]) -> list[TokenLogprob]:
    """logprobs (L, V) normalised; token_ids (L,); top_n[i] alternatives for row i."""
    chosen = logprobs.gather(1, token_ids.view(-1, 1))  # (L, 1)
    ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
    max_n = max(top_n, default=0)
    top_vals: list[list[float]] = [[] for _ in top_n]
    top_ids: list[list[int]] = [[] for _ in top_n]
    if max_n > 0:
        vals, ids = logprobs.topk(max_n, dim=-1)  # sorted, most likely first
        top_vals, top_ids = vals.tolist(), ids.tolist()
    return [
        TokenLogprob(tid, lp, rank, list(zip(ids[:n], vals[:n], strict=True)))
        for tid, lp, rank, ids, vals, n in zip(
            token_ids.tolist(), chosen.view(-1).tolist(), ranks, top_ids, top_vals, top_n, strict=True
        )
    ]


def _apply_processors(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Logit bias, banned tokens and penalties, in place; these apply to greedy and random rows alike."""
    if batch.logit_bias is not None:
        rows, tids, biases = batch.logit_bias
        logits.index_put_((rows, tids), biases, accumulate=True)
    if batch.banned is not None:
        logits.index_put_(batch.banned, torch.tensor(-math.inf, device=logits.device))
    if batch.output_ids is not None:
        _apply_penalties(logits, batch)


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    assert batch.output_ids is not None
    vocab = logits.shape[1]
    counts = _token_counts(batch.output_ids, vocab)  # (B, V) float
    if batch.repetition_penalty is not None and batch.prompt_ids is not None:
        seen = (counts > 0) | (_token_counts(batch.prompt_ids, vocab) > 0)
        penalty = batch.repetition_penalty.expand_as(logits)
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        torch.where(seen, scaled, logits, out=logits)
    if batch.frequency_penalty is not None:
        logits.sub_(counts * batch.frequency_penalty)
    if batch.presence_penalty is not None:
        logits.sub_((counts > 0).float() * batch.presence_penalty)


def _token_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """ids (B, L) padded with -1 -> (B, V) float occurrence counts."""
    slot = torch.where(ids < 0, vocab, ids)  # padding goes to a spare column that is dropped
    counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.float32))
    return counts[:, :vocab]


def _choose(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.random_rows is None:
        return logits.argmax(dim=-1)
    if batch.greedy_rows is None:
        return _sample_random(logits, batch)
    tokens = torch.empty(batch.num_rows, dtype=torch.long, device=logits.device)
    tokens[batch.greedy_rows] = logits.index_select(0, batch.greedy_rows).argmax(dim=-1)
    tokens[batch.random_rows] = _sample_random(logits.index_select(0, batch.random_rows), batch)
    return tokens


def _sample_random(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """x (R, V): processed logits of the random rows, modified in place -> (R,) sampled token ids."""
    if batch.temperature is not None:
        x.div_(batch.temperature)
    row_max = None
    if batch.top_k is not None or batch.top_p is not None:
        row_max = _apply_top_k_top_p(x, batch.top_k, batch.max_top_k, batch.top_p)
    if batch.min_p is not None:
        # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p); log(0) = -inf keeps every token
        if row_max is None:
            row_max = x.amax(dim=-1, keepdim=True)
        x.masked_fill_(x < row_max + batch.min_p.log(), -math.inf)
    return _draw(x, batch)


def _apply_top_k_top_p(
    x: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask x (R, V) in place outside each row's top-k and nucleus. Returns the row maxima (R, 1)."""
    vocab = x.shape[1]
    num_candidates = min(vocab, max(max_top_k, _TOP_P_CANDIDATES if top_p is not None else 1))
    cand = x.topk(num_candidates, dim=-1).values  # (R, K) descending
    if top_k is not None:
        kth = cand.gather(1, (top_k.clamp(1, num_candidates) - 1).view(-1, 1))  # (R, 1)
        kth = torch.where(top_k.view(-1, 1) > 0, kth, -math.inf)
        x.masked_fill_(x < kth, -math.inf)
        cand.masked_fill_(cand < kth, -math.inf)
    if top_p is not None:
        _apply_top_p(x, cand, top_p)
    return cand[:, :1]


def _apply_top_p(x: torch.Tensor, cand: torch.Tensor, top_p: torch.Tensor) -> None:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one token).

    cand (R, K) holds each row's K largest logits; a row whose nucleus may extend past them is sorted in full.
    """
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (R, 1) over the support left by top-k
    threshold, covered = _nucleus_threshold(cand, lse, top_p)
    if not bool(covered.all()):
        rows = (~covered).nonzero().view(-1)
        full = x.index_select(0, rows).sort(dim=-1, descending=True).values
        threshold[rows] = _nucleus_threshold(full, lse[rows], top_p[rows])[0]
    x.masked_fill_(x < threshold, -math.inf)


def _nucleus_threshold(
    desc: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """desc (R, K) logits in descending order -> (threshold logit (R, 1), nucleus-within-desc (R,))."""
    probs = (desc - lse).exp()
    mass_before = probs.cumsum(dim=-1) - probs  # a token is kept when the mass before it is below top_p
    num_kept = (mass_before < top_p.view(-1, 1)).sum(dim=-1, keepdim=True).clamp(min=1)  # (R, 1)
    threshold = desc.gather(1, num_kept - 1)
    off = top_p.view(-1, 1) >= 1.0
    threshold = torch.where(off, -math.inf, threshold)
    # The nucleus ends inside desc if desc's last token is dropped, or desc already ends the support.
    covered = (num_kept < desc.shape[1]) | (desc[:, -1:] == -math.inf) | off
    return threshold, covered.view(-1)


def _draw(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Inverse-CDF draw of one token per row of x (R, V) with one uniform per row."""
    cdf = torch.softmax(x, dim=-1).cumsum_(dim=-1)  # (R, V)
    u = torch.empty(x.shape[0], 1, dtype=torch.float32)
    if batch.unseeded is not None:
        u[batch.unseeded] = torch.rand(batch.unseeded.shape[0], 1)
    for pos, gen in batch.seeded:
        u[pos] = torch.rand(1, generator=gen, device=gen.device).cpu()
    u = u.to(x.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).view(-1)  # first token whose cdf exceeds u
    overflow = tokens >= x.shape[1]  # u rounded up to the total mass: ~2^-24 chance per row
    if bool(overflow.any()):
        tokens = torch.where(overflow, x.argmax(dim=-1), tokens)
    return tokens
