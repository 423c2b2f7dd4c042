"""Batched sampler: one call per engine step turns the logits of every row that needs a token into tokens.

Order of operations (as vLLM v1):
  1. log-probabilities for the output are taken from the raw logits (log_softmax before any processing);
  2. logit_bias is added, banned tokens (min_tokens: eos + stop ids) are set to -inf;
     tokens a row's grammar forbids (structured output) are set to -inf, after the bias so none comes back;
  3. repetition penalty over prompt + output tokens (HF/vLLM: divide positive logits, multiply negative ones);
  4. presence / frequency penalties over output tokens only (OpenAI: logit -= freq * count + pres * [count > 0]);
  5. greedy rows take the argmax of the processed logits; random rows go on with
     temperature -> top-k -> top-p -> min-p, then draw one token.

Design choices driven by the 2-core CPU this runs on (see bench/sampling_bench.py):
  - Everything not used by any row of the batch is skipped; an all-greedy batch without processors is a
    single argmax.
  - Drawing: inverse CDF with ONE uniform per row (exp, cumsum, searchsorted, all in place). The race
    (argmax of logit + Gumbel noise, vLLM's exponential race) needs V random numbers per row; on this CPU
    that costs ~20x a softmax, so unseeded rows do not use it. Seeded rows do, from their own
    torch.Generator: every operation is row-wise, and the race only changes its token when float
    rounding (another batch composition) reorders the top two noisy scores, where an inverse-CDF draw
    moves whenever the shift of any CDF boundary covers the uniform (in float32 on the real model, a
    seeded request alone and in a batch of 7 parted at the 9th token that way).
  - top-k / top-p never sort the vocabulary when they can avoid it: one topk takes each such row's K=256
    best logits; a row whose top-k <= K, or whose nucleus ends inside those K, is finished (temperature,
    nucleus, min-p, draw) on the (R, K) candidates. The other rows try again among their 4,096 best
    (one wider topk); only rows with top-k > 4,096 or a nucleus wider than that (a near-uniform
    distribution) go to the full-vocabulary path, which sorts just those rows for top-p.
    Which path a row takes depends on its own logits and parameters alone (K is fixed), which keeps
    seeded rows batch-independent. min-p is a threshold in logit space (logit >= max + log(min_p)).
  - Penalties gather/scatter at the ids a row has seen ((B, P + L) lists), never build (B, V) counts.
  - sample() modifies the logits it is given in place (the runner makes them fresh every step): a fresh
    (64, 49152) tensor costs more in page faults than the arithmetic on it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from model import paged_kernel
from model.kernels import Kernels
from model.sampling_params import SamplingParams, TokenLogprob, clamp_top_k

# top-k / top-p rows are sampled among their 256 best logits when these hold the support, else among their
# 4,096 best; only a support wider than that (top-k > 4,096, a nucleus in a near-uniform distribution)
# sorts the vocabulary. SmolLM2-135M at temperature 1 needs more than 256 for a 0.95 nucleus in half of
# its steps (max ~3,100), and a sort of the vocabulary costs several times a topk of 4,096 (bench/NOTES.md).
_CANDIDATES = 256
_CANDIDATES_WIDE = 4096


@dataclass(slots=True)
class SamplingBatch:
    """Per-step tensors for the rows of one sample() call. Fields a batch does not use are None."""

    num_rows: int
    greedy_rows: torch.Tensor | None  # (G,) long row indices; None when no row is greedy
    random_rows: torch.Tensor | None  # (R,) long row indices; None when no row samples
    # Per random row (indexed in random_rows order):
    temperature: torch.Tensor | None  # (R, 1); None when every random row has temperature 1
    top_k: torch.Tensor | None  # (R,) long, 0 = off
    top_p: torch.Tensor | None  # (R,), 1.0 = off
    min_p: torch.Tensor | None  # (R, 1), 0.0 = off
    candidate_rows: (
        torch.Tensor | None
    )  # (C,) positions in random_rows with top-k or top-p (see _sample_random)
    seeded: list[tuple[int, torch.Generator]]  # (position in random_rows, generator)
    unseeded: torch.Tensor | None  # (U,) positions in random_rows drawn from the global generator
    # Per row (all rows):
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, values)
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) forced to -inf
    grammar_bias: tuple[torch.Tensor, torch.Tensor] | None  # (rows (S,), (S, V) of 0 / -inf): grammar masks
    # Penalties touch only the tokens a row has seen, so they work on (B, L) id lists, not (B, V) counts.
    # Lists are padded with the row's first id: a write through a pad repeats the write of a real entry.
    repetition_penalty: torch.Tensor | None  # (B, 1); 1 for rows with no tokens
    seen_ids: torch.Tensor | None  # (B, P + L) long: prompt + output ids
    presence_penalty: torch.Tensor | None  # (B, 1); 0 for rows with no output yet
    frequency_penalty: torch.Tensor | None  # (B, 1)
    output_ids: torch.Tensor | None  # (B, L) long: output ids
    output_mask: torch.Tensor | None  # (B, L) float: 1 for real entries, 0 for padding
    logprobs: list[int | None]  # requested top-N per row (None = no logprobs for that row)
    logprob_rows: torch.Tensor | None  # (L,) rows that asked for logprobs
    cpp_argmax: bool | None = None  # the C++ argmax for greedy rows (Kernels.cpp); None: if it is loaded

    @property
    def all_greedy(self) -> bool:
        return self.random_rows is None

    @property
    def needs_penalties(self) -> bool:
        return self.seen_ids is not None or self.output_ids is not None

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
        kernels: Kernels | None = None,
        grammar_bias: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SamplingBatch:
        """Gather the batch's parameters into tensors.

        `generators[i]` is the persistent generator of a seeded request (None if unseeded); the runner
        keeps it across steps (see make_generator). `banned_token_ids[i]` lists the tokens row i may not
        produce this step (eos + stop ids while fewer than min_tokens were generated). `grammar_bias`
        is (rows, (S, V) float32): 0 for the tokens those rows' grammars allow next, -inf for the others.
        """
        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]
        rand_params = [params[i] for i in rand]
        seen = [p + o for p, o in zip(prompt_token_ids, output_token_ids, strict=True)]
        rep = [p.repetition_penalty if s else 1.0 for p, s in zip(params, seen, strict=True)]
        pres = [p.presence_penalty if o else 0.0 for p, o in zip(params, output_token_ids, strict=True)]
        freq = [p.frequency_penalty for p in params]
        use_rep, use_out = any(r != 1.0 for r in rep), any(pres) or any(freq)
        logprobs = [p.logprobs for p in params]
        seeded = [(j, g) for j, i in enumerate(rand) if (g := generators[i]) is not None]
        unseeded = [j for j, i in enumerate(rand) if generators[i] is None]
        cand = [j for j, p in enumerate(rand_params) if clamp_top_k(p.top_k) > 0 or p.top_p < 1.0]
        out_ids, out_mask = _padded(output_token_ids, device) if use_out else (None, None)
        return cls(
            num_rows=len(params),
            greedy_rows=_index(greedy, device) if greedy else None,
            random_rows=_index(rand, device) if rand else None,
            temperature=_column([p.temperature for p in rand_params], 1.0, device),
            top_k=_top_k(rand_params, device),
            top_p=_row([p.top_p for p in rand_params], 1.0, device),
            min_p=_column([p.min_p for p in rand_params], 0.0, device),
            candidate_rows=_index(cand, device) if cand else None,
            seeded=seeded,
            unseeded=_index(unseeded, "cpu") if unseeded else None,
            logit_bias=_logit_bias(params, device),
            banned=_banned(banned_token_ids, device),
            grammar_bias=grammar_bias,
            repetition_penalty=_column(rep, 1.0, device),
            seen_ids=_padded(seen, device)[0] if use_rep else None,
            presence_penalty=_column(pres, 0.0, device),
            frequency_penalty=_column(freq, 0.0, device),
            output_ids=out_ids,
            output_mask=out_mask,
            logprobs=logprobs,
            logprob_rows=_index([i for i, n in enumerate(logprobs) if n is not None], device)
            if any(n is not None for n in logprobs)
            else None,
            cpp_argmax=None if kernels is None else kernels.cpp,
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
    ks = [max(clamp_top_k(p.top_k), 0) for p in params]  # 0: off
    return torch.tensor(ks, dtype=torch.long, device=device) if any(ks) else None


def _padded(seqs: list[list[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists -> ((B, W) long padded with each row's first id (0 if empty), (B, W) float mask)."""
    lengths = torch.tensor([len(seq) for seq in seqs], dtype=torch.long)
    flat = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)  # one C-level conversion
    width = max(1, int(lengths.max()) if len(seqs) else 0)
    mask = torch.arange(width) < lengths.view(-1, 1)  # (B, W)
    starts = (lengths.cumsum(0) - lengths).clamp(max=max(flat.numel() - 1, 0))
    first = torch.where(lengths > 0, flat[starts] if flat.numel() else 0, 0)
    ids = first.view(-1, 1).repeat(1, width)
    ids[mask] = flat  # row-major order of the mask matches the concatenation
    return ids.to(device), mask.float().to(device)


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
    """Pick one token per row of `logits` (B, V). Modifies `logits` in place. Logits in a narrower dtype
    (bf16 from the LM head's GEMM) are widened to float32 first, except for a batch of plain greedy rows
    (no processors, no logprobs), whose argmax is the same on the exact widening: a (64, 49152) float32
    copy costs ~2 ms a step on the 2-core CPU."""
    assert logits.shape[0] == batch.num_rows, (logits.shape, batch.num_rows)
    if logits.dtype != torch.float32:
        if batch.random_rows is None and batch.logprob_rows is None and not _has_processors(batch):
            return SamplerOutput(_argmax(logits, batch.cpp_argmax).tolist(), None)
        logits = logits.float()
    raw_logprobs = None
    if batch.logprob_rows is not None:
        every_row = batch.logprob_rows.numel() == batch.num_rows
        source = logits if every_row else logits.index_select(0, batch.logprob_rows)
        raw_logprobs = torch.log_softmax(source, dim=-1)  # (L, V)
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
    top_vals: list[list[float]] = [[] for _ in top_n]
    top_ids: list[list[int]] = [[] for _ in top_n]
    # One topk per distinct N, each row with its own: which of several equal values a topk keeps at its
    # edge depends on k, so a row's list cut from a larger N would change with the batch's other rows.
    for n in sorted(set(top_n) - {0}):
        rows = [i for i, want in enumerate(top_n) if want == n]
        source = (
            logprobs if len(rows) == len(top_n) else logprobs.index_select(0, _index(rows, logprobs.device))
        )
        vals, ids = source.topk(n, dim=-1)  # sorted, most likely first
        for i, v, t in zip(rows, vals.tolist(), ids.tolist(), strict=True):
            top_vals[i], top_ids[i] = v, t
    return [
        TokenLogprob(tid, lp, rank, list(zip(ids[:n], vals[:n], strict=True)))
        for tid, lp, rank, ids, vals, n in zip(
            token_ids.tolist(), chosen.view(-1).tolist(), ranks, top_ids, top_vals, top_n, strict=True
        )
    ]


def _has_processors(batch: SamplingBatch) -> bool:
    """Whether _apply_processors touches the batch's logits (the conditions it tests)."""
    return (
        batch.logit_bias is not None
        or batch.banned is not None
        or batch.needs_penalties
        or batch.grammar_bias is not None
    )


def _apply_processors(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Logit bias, banned tokens and penalties, in place; these apply to greedy and random rows alike."""
    if batch.logit_bias is not None:
        rows, tids, biases = batch.logit_bias
        logits.index_put_((rows, tids), biases, accumulate=True)
    if batch.banned is not None:
        logits.index_put_(batch.banned, torch.tensor(-math.inf, device=logits.device))
    if batch.needs_penalties:
        _apply_penalties(logits, batch)
    if batch.grammar_bias is not None:  # last: no logit_bias or penalty lifts a forbidden token back
        rows, bias = batch.grammar_bias
        if rows.numel() == batch.num_rows:
            logits.add_(bias)  # an add: a masked_fill with the (S, V) mask was ~6x slower on CPU
        else:
            logits.index_add_(0, rows, bias)


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place, touching only the (B, L) seen ids: duplicate ids write identical values."""
    if batch.repetition_penalty is not None and batch.seen_ids is not None:
        vals = logits.gather(1, batch.seen_ids)
        penalty = batch.repetition_penalty
        logits.scatter_(1, batch.seen_ids, torch.where(vals > 0, vals / penalty, vals * penalty))
    if batch.output_ids is None or batch.output_mask is None:
        return
    if batch.frequency_penalty is not None:  # every occurrence subtracts the penalty once
        logits.scatter_add_(1, batch.output_ids, batch.output_mask * -batch.frequency_penalty)
    if batch.presence_penalty is not None:  # once per distinct token
        vals = logits.gather(1, batch.output_ids)
        logits.scatter_(1, batch.output_ids, vals - batch.presence_penalty)


def _choose(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.random_rows is None:
        return _argmax(logits, batch.cpp_argmax)
    if batch.greedy_rows is None:
        return _sample_random(logits, batch)
    tokens = torch.empty(batch.num_rows, dtype=torch.long, device=logits.device)
    tokens[batch.greedy_rows] = _argmax(logits.index_select(0, batch.greedy_rows), batch.cpp_argmax)
    tokens[batch.random_rows] = _sample_random(logits.index_select(0, batch.random_rows), batch)
    return tokens


def _argmax(x: torch.Tensor, cpp: bool | None = None) -> torch.Tensor:
    """First maximum of each row (NaN counts as the maximum). On CPU the C++ kernel (cpp; None: when it is
    loaded) is ~10x faster than ATen's reduction over 49,152 logits (bench/NOTES.md); otherwise
    max(dim).indices, about twice as fast as argmax."""
    if cpp is None:
        cpp = paged_kernel.ready(x.device)
    if cpp and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16) and x.shape[1] > 0:
        return torch.ops.smollm2.argmax_rows(x.contiguous())
    return x.max(dim=-1).indices


def _sample_random(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """x (R, V): processed logits of the random rows -> (R,) sampled token ids.

    Rows with top-k <= K or a nucleus inside their K best logits are sampled among those K candidates
    (one topk over the vocabulary, the rest on (R, K)), first with K = 256, then 4,096; the others take the
    full-vocabulary path. A row's path depends on its own logits and parameters only, so seeded rows stay
    batch-independent.
    """
    noise = _Noise.draw(batch, x.shape[0], x.shape[1], x.device)
    if batch.temperature is not None:
        x.div_(batch.temperature)  # in place: a fresh (R, V) tensor costs more than the division here
    cand = batch.candidate_rows
    if cand is None:
        return _sample_full(x, batch, None, noise)
    R = x.shape[0]
    tokens, covered = _sample_candidates(
        x if cand.shape[0] == R else x.index_select(0, cand), batch, cand, noise.take(cand), _CANDIDATES
    )
    if cand.shape[0] == R and bool(covered.all()):
        return tokens
    out = torch.empty(R, dtype=torch.long, device=x.device)
    out[cand] = tokens
    todo = cand[~covered]  # nucleus (or top-k) wider than the first candidates
    if todo.numel() > 0 and min(_CANDIDATES_WIDE, x.shape[1]) > min(_CANDIDATES, x.shape[1]):
        tokens, covered = _sample_candidates(
            x.index_select(0, todo), batch, todo, noise.take(todo), _CANDIDATES_WIDE
        )
        out[todo] = tokens
        todo = todo[~covered]
    full = torch.ones(R, dtype=torch.bool, device=x.device)
    full[cand] = False
    full[todo] = True
    rows = full.nonzero().view(-1)
    if rows.numel() > 0:
        out[rows] = _sample_full(x.index_select(0, rows), batch, rows, noise.take(rows))
    return out


@dataclass(slots=True)
class _Noise:
    """The randomness of one step's random rows.

    Unseeded rows draw one U[0, 1) each (an inverse-CDF draw: one number, the cheapest). Seeded rows
    draw a Gumbel variate per vocabulary entry from their own generator and take argmax(logit + noise),
    the exponential race vLLM's sampler uses: a logit that moves by float rounding (another batch
    composition, another GEMM path) then changes the token only at a near-tie of the top two scores,
    where an inverse-CDF draw moves at the boundary of every token in the support (bench/NOTES.md).
    A seeded row consumes V numbers a step whatever its path, so its stream stays batch-independent.
    """

    u: torch.Tensor  # (R, 1) uniforms; unused in raced rows
    gumbel: torch.Tensor | None  # (R, V), or (R, K) once gathered for candidates; zeros in unseeded rows
    raced: torch.Tensor | None  # (R,) bool: seeded rows

    @classmethod
    def draw(cls, batch: SamplingBatch, num_rows: int, vocab: int, device: torch.device) -> _Noise:
        u = torch.full((num_rows, 1), 0.5, dtype=torch.float32)
        if batch.unseeded is not None:
            u[batch.unseeded] = torch.rand(batch.unseeded.shape[0], 1)
        if not batch.seeded:
            return cls(u.to(device), None, None)
        gumbel = torch.zeros(num_rows, vocab, dtype=torch.float32, device=device)
        raced = torch.zeros(num_rows, dtype=torch.bool)
        for pos, gen in batch.seeded:
            uniform = torch.rand(vocab, generator=gen, device=gen.device)
            gumbel[pos] = uniform.to(device).log_().neg_().log_().neg_()  # -log(-log u)
            raced[pos] = True
        return cls(u.to(device), gumbel, raced.to(device))

    def take(self, rows: torch.Tensor) -> _Noise:
        if self.gumbel is None or self.raced is None:
            return _Noise(self.u[rows], None, None)
        return _Noise(self.u[rows], self.gumbel.index_select(0, rows), self.raced[rows])

    def at(self, ids: torch.Tensor) -> _Noise:
        """The noise of candidate columns: ids (R, K) token ids per row."""
        return self if self.gumbel is None else _Noise(self.u, self.gumbel.gather(1, ids), self.raced)


def _take(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or rows is None else t.index_select(0, rows)


def _sample_candidates(
    x: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor, noise: _Noise, num: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample rows of x (C, V) among their `num` best logits -> (tokens (C,), covered (C,) bool).

    Where covered is False the row's nucleus extends past the candidates and its token must be redrawn.
    """
    top_k, top_p = _take(batch.top_k, rows), _take(batch.top_p, rows)
    num = min(num, x.shape[1])
    vals, ids = x.topk(num, dim=-1)  # (C, K) descending
    covered = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if top_k is not None:
        covered = (top_k > 0) & (top_k <= num)  # the whole support is among the candidates
        position = torch.arange(num, device=x.device)
        vals.masked_fill_(covered.view(-1, 1) & (position >= top_k.view(-1, 1)), -math.inf)
    if top_p is not None:
        # the nucleus is a share of the mass of the whole support: over the candidates if they hold it all
        lse = torch.logsumexp(vals, dim=-1, keepdim=True)  # (C, 1)
        rest = (~covered).nonzero().view(-1)
        if rest.numel() == x.shape[0]:
            lse = torch.logsumexp(x, dim=-1, keepdim=True)
        elif rest.numel() > 0:
            lse[rest] = torch.logsumexp(x.index_select(0, rest), dim=-1, keepdim=True)
        num_kept, inside = _nucleus(vals, lse, top_p)
        covered |= inside
        vals.masked_fill_(torch.arange(num, device=x.device) >= num_kept, -math.inf)
    _apply_min_p(vals, vals[:, :1], _take(batch.min_p, rows))
    return ids.gather(1, _draw(vals, noise.at(ids)).view(-1, 1)).view(-1), covered


def _sample_full(
    x: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor | None, noise: _Noise
) -> torch.Tensor:
    """Sample rows of x (F, V), tempered, over the whole vocabulary (in place); rows index batch's tensors."""
    top_k, top_p = _take(batch.top_k, rows), _take(batch.top_p, rows)
    if top_k is not None and bool((top_k > 0).any()):
        kth = x.topk(int(top_k.max()), dim=-1).values.gather(1, (top_k.clamp(min=1) - 1).view(-1, 1))
        x.masked_fill_((top_k.view(-1, 1) > 0) & (x < kth), -math.inf)
    if top_p is not None and bool((top_p < 1.0).any()):
        p_rows = (top_p < 1.0).nonzero().view(-1)
        sub = x.index_select(0, p_rows)
        desc = sub.sort(dim=-1, descending=True).values
        num_kept, _ = _nucleus(desc, torch.logsumexp(sub, dim=-1, keepdim=True), top_p[p_rows])
        x[p_rows] = sub.masked_fill_(sub < desc.gather(1, num_kept - 1), -math.inf)
    min_p = _take(batch.min_p, rows)
    if min_p is not None:
        _apply_min_p(x, x.amax(dim=-1, keepdim=True), min_p)
    return _draw(x, noise)


def _apply_min_p(x: torch.Tensor, row_max: torch.Tensor, min_p: torch.Tensor | None) -> None:
    """p >= min_p * p_max  <=>  logit >= max_logit + log(min_p); log(0) = -inf keeps every token."""
    if min_p is not None:
        x.masked_fill_(x < row_max + min_p.log(), -math.inf)


def _nucleus(desc: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest prefix of desc (R, K) (logits, descending) whose mass reaches top_p, at least one token.

    lse (R, 1) normalises over the row's whole support. Returns (tokens kept (R, 1) long, whether the
    nucleus ends inside desc (R,) bool). Rows with top_p >= 1 keep all of desc.
    """
    probs = (desc - lse).exp()
    mass_before = probs.cumsum(dim=-1) - probs  # a token is kept when the mass before it is below top_p
    num_kept = (mass_before < top_p.view(-1, 1)).sum(dim=-1, keepdim=True).clamp(min=1)
    off = top_p.view(-1, 1) >= 1.0
    num_kept = torch.where(off, desc.shape[1], num_kept)
    inside = (num_kept < desc.shape[1]) | (desc[:, -1:] == -math.inf)
    return num_kept, (inside & ~off).view(-1)


def _draw(x: torch.Tensor, noise: _Noise) -> torch.Tensor:
    """One column per row of x (R, N) logits (destroyed): an inverse-CDF draw with noise.u (R, 1), or in
    raced rows the argmax of logit + Gumbel noise -> (R,)."""
    race = None
    if noise.gumbel is not None:
        race = (x + noise.gumbel).argmax(dim=-1)  # -inf logits (masked tokens) stay out
    u = noise.u
    cdf = x.sub_(x.amax(dim=-1, keepdim=True)).exp_().cumsum_(dim=-1)  # unnormalised, in place
    total = cdf[:, -1:]
    cols = torch.searchsorted(cdf, u * total, right=True).view(-1)  # first column whose cdf exceeds u * total
    overflow = cols >= x.shape[1]  # u * total rounded up to total: ~2^-24 chance per row
    if bool(overflow.any()):  # take the last column with mass: where the cdf first reaches its total
        cols = torch.where(overflow, torch.searchsorted(cdf, total.contiguous()).view(-1), cols)
    if race is not None:
        cols = torch.where(noise.raced, race, cols)  # type: ignore[arg-type]
    # a row with no finite logit (every token banned; the engine refuses such input) has a NaN cdf:
    # keep its id in range rather than crash the step
    return cols.clamp_(max=x.shape[1] - 1)
