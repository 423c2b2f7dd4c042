"""Batched sampler: each feature against its definition, on small vocabularies (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from model.sampling import (
    SamplingBatch,
    _apply_processors,
    _draw,
    _Noise,
    make_generator,
    prompt_logprobs,
    sample,
)
from model.sampling_params import SamplingParams

V = 50


def _batch(
    params: list[SamplingParams],
    outputs: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
    seeds: list[int | None] | None = None,
    banned: list[list[int]] | None = None,
) -> SamplingBatch:
    n = len(params)
    gens = [None if s is None else make_generator(s) for s in (seeds or [None] * n)]
    return SamplingBatch.build(
        params, outputs or [[] for _ in params], prompts or [[1] for _ in params], gens, "cpu", banned
    )


def _draw_many(
    logits: torch.Tensor, params: SamplingParams, draws: int, seeded: bool = False
) -> torch.Tensor:
    """Sample `draws` times from one row of logits (V,) as one batch -> (draws,) token ids; seeded: each
    row with its own seed (the race path)."""
    batch = _batch([params] * draws, seeds=list(range(draws)) if seeded else None)
    return torch.tensor(sample(logits.expand(draws, -1).clone(), batch).token_ids)


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 2


def test_greedy_is_argmax(logits: torch.Tensor) -> None:
    out = sample(logits.clone(), _batch([SamplingParams(temperature=0.0)] * 4))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(temperature=0.0)] * 4,
        [SamplingParams(temperature=0.0, logprobs=2)] * 4,
        [SamplingParams(temperature=0.0, repetition_penalty=1.3)] * 4,
        [SamplingParams(temperature=0.0, logit_bias={3: 5.0})] * 4,
        [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1)] * 2,
    ],
    ids=["greedy", "logprobs", "penalty", "bias", "mixed"],
)
def test_bf16_logits_give_what_their_float32_widening_gives(params: list[SamplingParams]) -> None:
    """The LM head hands bf16 logits over as they are: a plain greedy batch takes their argmax directly, any
    other is widened first; either way the tokens (and logprobs) are those of the float32 widening."""
    x = (torch.randn(4, V, generator=torch.Generator().manual_seed(3)) * 2).to(torch.bfloat16)
    outputs, prompts = [[1, 3, 3]] * 4, [[2, 3]] * 4
    seeds = [p.seed for p in params]
    got = sample(x.clone(), _batch(params, outputs, prompts, seeds))
    want = sample(x.float(), _batch(params, outputs, prompts, seeds))
    assert got.token_ids == want.token_ids
    assert got.logprobs == want.logprobs


def test_greedy_rows_mixed_with_random_rows(logits: torch.Tensor) -> None:
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5)] * 2
    for _ in range(20):
        out = sample(logits.clone(), _batch(params))
        assert [out.token_ids[0], out.token_ids[2]] == [logits[0].argmax().item(), logits[2].argmax().item()]


def test_top_k_one_is_greedy(logits: torch.Tensor) -> None:
    out = sample(logits.clone(), _batch([SamplingParams(temperature=1.0, top_k=1)] * 4))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_restricts_support(logits: torch.Tensor) -> None:
    row = logits[0]
    drawn = set(_draw_many(row, SamplingParams(temperature=2.0, top_k=5), 2000).tolist())
    assert drawn == set(row.topk(5).indices.tolist())  # only the top 5, and with T=2 all of them show up


def test_top_p_restricts_to_nucleus() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04] + [0.0] * (V - 5)) + 1e-9
    row = probs.log()
    # mass before token 2 is 0.7 < 0.75, before token 3 it is 0.9: the nucleus is {0, 1, 2}
    drawn = _draw_many(row, SamplingParams(top_p=0.75), 3000)
    assert set(drawn.tolist()) == {0, 1, 2}
    freq = torch.bincount(drawn, minlength=3)[:3].float() / len(drawn)
    assert torch.allclose(freq, torch.tensor([4 / 9, 3 / 9, 2 / 9]), atol=0.04)


def test_top_p_nucleus_beyond_candidates_falls_back_to_full_sort() -> None:
    vocab = 1000  # a slowly decaying distribution: the nucleus (~890 tokens) exceeds the 256 topk candidates
    row = torch.full((vocab,), -20.0)
    row[:900] = torch.linspace(0.0, -0.5, 900)
    probs = torch.softmax(row, -1)
    nucleus = set(torch.nonzero(probs.cumsum(-1) - probs < 0.99).view(-1).tolist())  # reference: sorted order
    assert 800 < len(nucleus) < 900
    drawn = set(_draw_many(row, SamplingParams(top_p=0.99), 4000).tolist())
    assert drawn <= nucleus
    assert len(drawn) > 0.9 * len(nucleus)  # tokens beyond the first 256 candidates are reachable


def test_wide_supports_take_the_second_candidate_stage_or_the_sort_and_stay_exact() -> None:
    """A real-sized vocabulary: nuclei of ~150 (first 256 candidates), ~2,000 (the 4,096-wide stage) and
    ~6,000 tokens (the sort), top-k 3,000 (wide stage) and 5,000 (sort), in one batch."""
    vocab, reps = 12000, 800
    row = torch.linspace(0.0, -3.0, vocab)  # p_i ~ exp(-3 i / V): the cumulative mass is known
    probs = torch.softmax(row, -1)

    def nucleus(top_p: float) -> int:
        return int((probs.cumsum(-1) - probs < top_p).sum())

    params = [
        SamplingParams(top_p=0.04),
        SamplingParams(top_p=0.41),
        SamplingParams(top_p=0.82),
        SamplingParams(top_k=3000),
        SamplingParams(top_k=5000),
    ]
    sizes = [nucleus(0.04), nucleus(0.41), nucleus(0.82), 3000, 5000]
    assert sizes[0] < 256 < sizes[1] < 4096 < sizes[2]
    batch = _batch(params * reps)
    tokens = torch.tensor(sample(row.expand(len(params) * reps, -1).clone(), batch).token_ids).view(reps, 5)
    for col, size in enumerate(sizes):
        assert tokens[:, col].max() < size and tokens[:, col].max() > 0.9 * size, (col, size)
    # the wide stage draws in proportion: 4 bins of the ~2,000-token nucleus against renormalised mass
    edges = torch.linspace(0, sizes[1], 5).long()
    mass = torch.stack([probs[a:b].sum() for a, b in zip(edges[:-1], edges[1:], strict=True)])
    expected = mass / mass.sum() * reps
    observed = (
        torch.bucketize(tokens[:, 1].contiguous(), edges[1:-1], right=True).bincount(minlength=4).float()
    )
    assert ((observed - expected) ** 2 / expected).sum().item() < 20.0  # 3 degrees of freedom


def test_top_k_and_top_p_together() -> None:
    row = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).log()
    # top_k=3 renormalises to 0.588/0.235/0.176; top_p=0.8 then keeps {0, 1}
    drawn = set(_draw_many(row, SamplingParams(top_k=3, top_p=0.8), 2000).tolist())
    assert drawn == {0, 1}


@pytest.mark.parametrize("top_k", [-1, 4])  # full-vocabulary path and candidate path
def test_min_p_removes_tokens_below_fraction_of_max(top_k: int) -> None:
    row = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).log()
    drawn = set(_draw_many(row, SamplingParams(min_p=0.25, top_k=top_k), 2000).tolist())  # keep p >= 0.125
    assert drawn == {0, 1, 2}


def test_rows_on_different_paths_in_one_batch_keep_their_own_support() -> None:
    vocab, reps = 1000, 600
    row = torch.linspace(0.0, -0.5, vocab)  # slowly decaying: top-p 0.95 spans ~940 tokens
    params = [
        SamplingParams(top_k=3),  # candidates
        SamplingParams(top_p=0.95),  # nucleus wider than the candidates: full sort
        SamplingParams(top_k=400),  # top-k above the candidates: full-vocabulary topk
        SamplingParams(temperature=0.5),  # no filter
        SamplingParams(temperature=0.0),
    ] * reps
    tokens = torch.tensor(sample(row.expand(len(params), -1).clone(), _batch(params)).token_ids).view(reps, 5)
    assert set(tokens[:, 0].tolist()) == {0, 1, 2}
    probs = torch.softmax(row, -1)
    nucleus_size = int((probs.cumsum(-1) - probs < 0.95).sum())
    assert tokens[:, 1].max() < nucleus_size and tokens[:, 1].max() > 700
    assert tokens[:, 2].max() < 400 and tokens[:, 2].max() > 300
    assert tokens[:, 3].max() > 900
    assert set(tokens[:, 4].tolist()) == {0}


@pytest.mark.parametrize(("u", "token"), [(0.0, 1), (0.49, 1), (0.5, 3), (1.0, 3)])
def test_draw_boundaries_never_pick_a_token_without_mass(u: float, token: int) -> None:
    row = torch.tensor([[-math.inf, 0.0, -math.inf, 0.0, -math.inf]])  # mass on 1 and 3 only
    assert _draw(row, _Noise(torch.tensor([[u]]), None, None)).item() == token  # u = 1: u * total rounds up


@pytest.mark.parametrize("seeded", [False, True])  # inverse CDF; the race of seeded rows
@pytest.mark.parametrize("top_k", [-1, 6])  # full-vocabulary path; candidate path (top_k = V keeps all)
def test_frequencies_match_softmax_of_tempered_logits(top_k: int, seeded: bool) -> None:
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws, temp = 20000, 0.7
    drawn = _draw_many(row, SamplingParams(temperature=temp, top_k=top_k), draws, seeded)
    expected = torch.softmax(row / temp, -1) * draws
    observed = torch.bincount(drawn, minlength=len(row)).float()
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0  # 5 degrees of freedom: p < 1e-4 of failing by chance


def test_seed_gives_same_tokens_whatever_the_batch(logits: torch.Tensor) -> None:
    seeded = SamplingParams(temperature=1.0, seed=7)
    gen_alone = make_generator(7)
    gen_mixed = make_generator(7)
    other = SamplingParams(temperature=1.3, top_k=10)
    alone, mixed = [], []
    for step in range(30):
        alone_batch = SamplingBatch.build([seeded], [[]], [[1]], [gen_alone], "cpu")
        alone.append(sample(logits[:1].clone(), alone_batch).token_ids[0])
        # same row at a different position, next to unseeded, greedy and other rows, which vary per step
        rows = torch.cat([logits[1:3], logits[:1], logits[3:]]) + torch.randn(4, V) * torch.tensor(
            [1.0, 1.0, 0.0, 1.0]
        ).view(-1, 1)
        params = [other, SamplingParams(temperature=0.0), seeded, other]
        gens = [None, None, gen_mixed, make_generator(step)]
        mixed.append(sample(rows, SamplingBatch.build(params, [[]] * 4, [[1]] * 4, gens, "cpu")).token_ids[2])
    assert alone == mixed
    assert len(set(alone)) > 1  # it really sampled


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.9, top_p=0.95)]
)
def test_seeded_draws_survive_float_rounding_of_the_logits(params: SamplingParams) -> None:
    """Another batch composition gives a request's hidden state float-rounding differences (logits off by
    ~1e-4, as measured in float32 on the real model). Over a real-sized vocabulary a seeded request must
    still draw the same tokens. With one inverse-CDF uniform per row the top-p case parted 1-2 times in
    60 steps here (near-equal candidates swap places in the sorted order); the race parts only at near-ties
    of the two best noisy scores."""
    g = torch.Generator().manual_seed(0)
    steps, vocab, hidden = 120, 49152, 64
    head = torch.randn(hidden, vocab, generator=g) * (1.5 / hidden**0.5)
    h = torch.randn(steps, hidden, generator=g)
    rounded = h * (1 + 1e-5 * torch.randn(steps, hidden, generator=g))
    runs = []
    for states in (h, rounded):
        gen, logits = make_generator(11), states @ head
        batches = (SamplingBatch.build([params], [[]], [[1]], [gen]) for _ in range(steps))
        runs.append([sample(logits[i : i + 1].clone(), b).token_ids[0] for i, b in enumerate(batches)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > steps // 2  # it really sampled a flat distribution


def test_different_seeds_differ(logits: torch.Tensor) -> None:
    params = SamplingParams(temperature=1.0)
    runs = []
    for seed in (1, 2):
        gen = make_generator(seed)
        runs.append(
            [
                sample(logits[:1].clone(), SamplingBatch.build([params], [[]], [[1]], [gen])).token_ids[0]
                for _ in range(30)
            ]
        )
    assert runs[0] != runs[1]


def _reference_penalties(
    row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]
) -> torch.Tensor:
    """Per-row, per-token loop written from the definitions."""
    out = row.clone()
    for tid in set(prompt) | set(output):
        val = out[tid].item()
        out[tid] = val / p.repetition_penalty if val > 0 else val * p.repetition_penalty
    for tid in set(output):
        out[tid] -= p.frequency_penalty * output.count(tid) + p.presence_penalty
    return out


def test_penalties_match_reference() -> None:
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, presence_penalty=0.7),
        SamplingParams(temperature=0.0, frequency_penalty=0.4, repetition_penalty=0.8),
        SamplingParams(temperature=0.0),  # no penalty: untouched
        SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.3),  # shorter lists: padded
        SamplingParams(
            temperature=0.0, presence_penalty=1.0, repetition_penalty=1.5
        ),  # nothing generated yet
    ]
    prompts = [[1, 2, 3], [4, 5], [6, 6, 7, 8], [9], [15], [16, 17]]
    outputs = [[3, 10, 10], [5, 11, 11, 11], [7, 12, 12, 13], [14, 14], [18], []]
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(1)) * 2
    processed = logits.clone()
    _apply_processors(processed, _batch(params, outputs, prompts))
    for i, p in enumerate(params):
        expected = _reference_penalties(logits[i], p, prompts[i], outputs[i])
        torch.testing.assert_close(processed[i], expected)


def test_penalty_changes_greedy_choice() -> None:
    row = torch.tensor([[3.0, 2.9, 0.0]])
    out = sample(row.clone(), _batch([SamplingParams(temperature=0.0, frequency_penalty=0.5)], outputs=[[0]]))
    assert out.token_ids == [1]


def test_logit_bias_forces_token(logits: torch.Tensor) -> None:
    least = logits.argmin(-1).tolist()
    params = [SamplingParams(temperature=1.0, logit_bias={t: 100.0}) for t in least[:2]]
    params += [SamplingParams(temperature=0.0, logit_bias={t: 100.0}) for t in least[2:]]
    for _ in range(10):
        assert sample(logits.clone(), _batch(params)).token_ids == least


def test_banned_tokens_never_sampled() -> None:
    row = torch.tensor([5.0, 4.0, 0.0, -1.0])
    banned = [[0, 1]] * 500
    params = [SamplingParams(temperature=1.0)] * 499 + [SamplingParams(temperature=0.0)]
    tokens = sample(row.expand(500, -1).clone(), _batch(params, banned=banned)).token_ids
    assert set(tokens) == {2, 3}
    assert tokens[-1] == 2


def test_logprobs_from_raw_logits(logits: torch.Tensor) -> None:
    params = [
        SamplingParams(temperature=1.0, logprobs=5, frequency_penalty=2.0, top_k=3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=0, logit_bias={0: 50.0}),
        SamplingParams(temperature=0.7, logprobs=3),
    ]
    out = sample(logits.clone(), _batch(params, outputs=[[1, 2], [], [], []]))
    assert out.logprobs is not None and out.logprobs[1] is None
    expected = torch.log_softmax(logits, -1)
    for i, n in [(0, 5), (2, 0), (3, 3)]:
        info = out.logprobs[i]
        assert info is not None and info.token_id == out.token_ids[i]
        assert info.logprob == pytest.approx(expected[i, info.token_id].item(), abs=1e-5)
        assert info.rank == int((expected[i] > expected[i, info.token_id]).sum()) + 1
        assert [t for t, _ in info.top] == expected[i].topk(n).indices.tolist()
        top_lps = [lp for _, lp in info.top]
        assert top_lps == sorted(top_lps, reverse=True)
        assert top_lps == pytest.approx(expected[i].topk(n).values.tolist(), abs=1e-5)
    assert out.token_ids[2] == 0 and out.logprobs[2].rank == int((logits[2] > logits[2, 0]).sum()) + 1


def test_a_rows_top_logprobs_do_not_depend_on_what_other_rows_ask() -> None:
    """bf16 logits tie often; which of several equal values a topk keeps at its edge depends on k, so a
    row's top-N must not be cut from the largest N in the batch (--batch-invariant promises the same
    output alone and in any batch)."""
    rows = torch.randn(16, 49152, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    straddled = 0  # rows whose tie at the edge a cut from the larger N would have resolved otherwise
    for n_alone, n_other in ((3, 5), (2, 8), (1, 20)):
        for row in rows:
            straddled += row.topk(n_other).indices[:n_alone].tolist() != row.topk(n_alone).indices.tolist()
            greedy = SamplingParams(temperature=0.0, logprobs=n_alone)
            alone = sample(row[None].clone(), _batch([greedy])).logprobs[0]  # type: ignore[index]
            mixed = sample(
                torch.stack([row, rows[0]]),
                _batch([greedy, SamplingParams(temperature=0.0, logprobs=n_other)]),
            ).logprobs[0]  # type: ignore[index]
            assert alone is not None and mixed is not None
            assert mixed.top == alone.top, (n_alone, n_other)
    assert straddled  # the case this test is about did occur


def test_prompt_logprobs(logits: torch.Tensor) -> None:
    targets = torch.tensor([3, 0, 7, 49])
    infos = prompt_logprobs(logits, targets, 2)
    expected = torch.log_softmax(logits, -1)
    for t, info in enumerate(infos):
        assert info.token_id == targets[t].item()
        assert info.logprob == pytest.approx(expected[t, targets[t]].item(), abs=1e-5)
        assert info.rank == int((expected[t] > expected[t, targets[t]]).sum()) + 1
        assert [tid for tid, _ in info.top] == expected[t].topk(2).indices.tolist()


def test_batch_builds_only_what_is_used() -> None:
    batch = _batch([SamplingParams(temperature=0.0)] * 3)
    assert batch.all_greedy and not batch.needs_penalties and batch.max_logprobs == -1
    assert batch.top_k is None and batch.top_p is None and batch.min_p is None and batch.temperature is None
    mixed = _batch([SamplingParams(temperature=0.0), SamplingParams(top_p=0.9, logprobs=2)])
    assert not mixed.all_greedy and mixed.top_p is not None and mixed.top_k is None
    assert mixed.max_logprobs == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_respects_params_like_cpu(logits: torch.Tensor) -> None:
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.2, logprobs=3),
        SamplingParams(top_k=3, top_p=0.9, seed=5),
        SamplingParams(top_p=0.5, min_p=0.1),
        SamplingParams(temperature=0.8, logit_bias={7: 100.0}),
    ]
    outputs, prompts = [[1, 2], [3], [4], [5]], [[6], [7], [8], [9]]
    gens = [None, make_generator(5, "cuda"), None, None]
    batch = SamplingBatch.build(params, outputs, prompts, gens, "cuda")
    out = sample(logits.cuda(), batch)
    ref = sample(logits.clone(), _batch(params, outputs, prompts))
    assert out.token_ids[0] == ref.token_ids[0] and out.token_ids[3] == 7
    assert out.token_ids[1] in logits[1].topk(3).indices.tolist()
    assert out.logprobs is not None and ref.logprobs is not None and out.logprobs[0] is not None
    (gpu_top, cpu_top) = (out.logprobs[0].top, ref.logprobs[0] and ref.logprobs[0].top)
    assert cpu_top is not None and [t for t, _ in gpu_top] == [t for t, _ in cpu_top]
    assert [lp for _, lp in gpu_top] == pytest.approx([lp for _, lp in cpu_top], abs=1e-4)


def test_row_with_every_token_banned_stays_in_range() -> None:
    from model.sampling import SamplingBatch, sample
    from model.sampling_params import SamplingParams

    logits = torch.full((2, 50), float("-inf"))
    logits[1, 7] = 0.0
    batch = SamplingBatch.build([SamplingParams(temperature=1.0)] * 2, [[], []], [[], []], [None, None])
    out = sample(logits, batch)
    assert 0 <= out.token_ids[0] < 50 and out.token_ids[1] == 7
