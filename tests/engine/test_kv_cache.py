"""BlockAllocator: allocation verbs, prefix-cache sharing, LRU eviction, integrity after each scenario."""

from __future__ import annotations

import pytest

from server.engine.kv_cache import BlockAllocator
from server.engine.request import Request, SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams())


def admit_and_compute(alloc: BlockAllocator, rid: str, tokens: list[int]) -> Request:
    """Admit with prefix hits, allocate the rest and pretend one step computed all of it."""
    req = make_request(rid, tokens)
    hits, num_cached = alloc.get_computed_blocks(tokens)
    req.num_computed_tokens = num_cached
    assert alloc.allocate_for(req, len(tokens) - num_cached, hits)
    req.num_computed_tokens = len(tokens)
    alloc.cache_full_blocks(req)
    alloc.check_integrity()
    return req


def test_allocate_covers_tokens_and_free_returns_blocks() -> None:
    alloc = BlockAllocator(8, BS)
    req = make_request("a", list(range(10)))
    assert alloc.allocate_for(req, 10)
    assert len(req.block_ids) == 3  # ceil(10 / 4)
    assert alloc.num_free_blocks == 5 and alloc.usage == pytest.approx(3 / 8)
    req.num_computed_tokens = 10
    assert alloc.allocate_for(req, 2)  # positions 10, 11 still fit in block 3
    assert len(req.block_ids) == 3
    req.num_computed_tokens = 12
    assert alloc.allocate_for(req, 1)
    assert len(req.block_ids) == 4
    alloc.check_integrity()
    alloc.free(req)
    assert req.block_ids == [] and alloc.num_free_blocks == 8 and alloc.usage == 0.0
    alloc.check_integrity()


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    alloc = BlockAllocator(4, BS)
    big = make_request("big", list(range(12)))
    assert alloc.allocate_for(big, 12)
    other = make_request("other", list(range(100, 108)))
    assert not alloc.can_allocate(2)
    assert not alloc.allocate_for(other, 8)
    assert other.block_ids == [] and alloc.num_free_blocks == 1
    alloc.check_integrity()


def test_prefix_hit_shares_blocks_and_counts_refs() -> None:
    alloc = BlockAllocator(16, BS)
    prompt = list(range(1, 11))  # 2 full blocks + 2 tokens
    a = admit_and_compute(alloc, "a", prompt)
    b = admit_and_compute(alloc, "b", prompt[:9] + [99, 98])
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert alloc._ref[a.block_ids[0]] == 2 and alloc._ref[a.block_ids[2]] == 1
    assert alloc.prefix_queries == 10 + 11 and alloc.prefix_hits == 8
    alloc.free(a)
    assert alloc._ref[b.block_ids[0]] == 1
    alloc.check_integrity()
    alloc.free(b)
    alloc.check_integrity()


def test_hit_needs_the_whole_prefix_not_just_the_block() -> None:
    alloc = BlockAllocator(16, BS)
    admit_and_compute(alloc, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    # Same second block, different first block: the chain hash differs, so no hit at all.
    assert alloc.get_computed_blocks([0, 2, 3, 4, 5, 6, 7, 8, 9]) == ([], 0)
    hits, n = alloc.get_computed_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert n == 8 and len(hits) == 2


def test_whole_prompt_is_never_reported_computed() -> None:
    alloc = BlockAllocator(16, BS)
    prompt = list(range(8))  # exactly 2 full blocks
    admit_and_compute(alloc, "a", prompt)
    hits, n = alloc.get_computed_blocks(prompt)
    assert n == 4 and len(hits) == 1  # the last token (in block 2) must be recomputed for its logits


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    alloc = BlockAllocator(6, BS)
    a = admit_and_compute(alloc, "a", list(range(0, 8)))  # blocks a0, a1 (full)
    a_blocks = list(a.block_ids)
    alloc.free(a)
    b = admit_and_compute(alloc, "b", list(range(100, 108)))
    alloc.free(b)  # freed later: more recently used than a's blocks
    assert alloc.num_free_blocks == 6 and alloc.num_cached_blocks == 4
    # A prefix hit after free revives the same blocks without recomputing them.
    hits, n = alloc.get_computed_blocks(list(range(0, 9)))
    assert hits == a_blocks and n == 8
    # Need 4 fresh blocks: 2 plain free ones, then evict the LRU cached ones: a's, tail first.
    c = make_request("c", list(range(200, 216)))
    assert alloc.allocate_for(c, 16)
    assert alloc.num_evictions == 2
    assert alloc.get_computed_blocks(list(range(0, 9))) == ([], 0)  # a's prefix is gone
    assert alloc.get_computed_blocks(list(range(100, 109)))[1] == 8  # b's is still there
    alloc.check_integrity()


def test_lru_evicts_tail_blocks_first() -> None:
    alloc = BlockAllocator(3, BS)
    a = admit_and_compute(alloc, "a", list(range(12)))  # 3 full blocks
    alloc.free(a)
    c = make_request("c", [500] * 4)
    assert alloc.allocate_for(c, 4)  # evicts one block: a's last, keeping the useful prefix
    assert alloc.get_computed_blocks(list(range(13)))[1] == 8
    alloc.check_integrity()


def test_revived_cached_blocks_count_against_free_pool() -> None:
    alloc = BlockAllocator(3, BS)
    a = admit_and_compute(alloc, "a", list(range(8)))
    alloc.free(a)
    hits, _ = alloc.get_computed_blocks(list(range(9)))
    b = make_request("b", list(range(8)) + [1] * 5)  # 13 tokens: 2 hits + 2 fresh blocks > 3 in pool
    assert not alloc.allocate_for(b, 5, hits)
    assert b.block_ids == [] and alloc.num_cached_blocks == 2
    alloc.check_integrity()


def test_duplicate_content_computed_twice_stays_consistent() -> None:
    alloc = BlockAllocator(8, BS)
    prompt = list(range(9))
    a, b = make_request("a", prompt), make_request("b", prompt)
    for req in (a, b):  # both admitted before either was cached
        assert alloc.allocate_for(req, 9)
    for req in (a, b):
        req.num_computed_tokens = 9
        alloc.cache_full_blocks(req)
    assert alloc.num_cached_blocks == 2
    alloc.check_integrity()
    alloc.free(a)
    alloc.free(b)
    alloc.check_integrity()
    assert alloc.num_free_blocks == 8


def test_prefix_caching_disabled() -> None:
    alloc = BlockAllocator(8, BS, enable_prefix_caching=False)
    a = admit_and_compute(alloc, "a", list(range(9)))
    assert alloc.get_computed_blocks(list(range(9))) == ([], 0)
    alloc.free(a)
    assert alloc.num_cached_blocks == 0 and alloc.num_free_blocks == 8
    alloc.check_integrity()


def test_integrity_check_catches_a_leak() -> None:
    alloc = BlockAllocator(4, BS)
    req = make_request("a", list(range(4)))
    assert alloc.allocate_for(req, 4)
    req.block_ids.clear()  # lose a block without freeing it
    with pytest.raises(AssertionError, match="ref 1 but 0 holders"):
        alloc.check_integrity()


def grow_one_token(alloc: BlockAllocator, req: Request) -> None:
    assert alloc.allocate_for(req, 1)
    req.num_computed_tokens += 1
    req.output_token_ids.append(7)


def test_requests_growing_in_lockstep_keep_consecutive_blocks() -> None:
    # The decode kernel reads a sequence's blocks in table order; consecutive ids read ~30-45% faster.
    alloc = BlockAllocator(64, BS)
    reqs = []
    for i in range(4):
        req = Request(f"r{i}", list(range(100 * i, 100 * i + 8)), SamplingParams(max_tokens=16))
        assert alloc.allocate_for(req, 8)
        req.num_computed_tokens = 8
        reqs.append(req)
    for _ in range(16):  # interleaved decode steps, one token each
        for req in reqs:
            grow_one_token(alloc, req)
    alloc.check_integrity()
    for req in reqs:
        assert len(req.block_ids) == 6
        assert req.block_ids == list(range(req.block_ids[0], req.block_ids[0] + 6))
    for req in reqs:
        alloc.free(req)
    alloc.check_integrity()
    assert alloc.num_free_blocks == 64


def test_reservations_never_refuse_an_allocation() -> None:
    alloc = BlockAllocator(8, BS)
    a = Request("a", [1, 2, 3, 4], SamplingParams(max_tokens=28))  # wants all 8 blocks
    assert alloc.allocate_for(a, 4)
    assert a.block_ids == [0] and alloc.num_free_blocks == 7
    b = Request("b", list(range(10, 22)), SamplingParams(max_tokens=4))
    assert alloc.can_allocate(3) and alloc.allocate_for(b, 12)  # takes a's reserved blocks
    assert len(b.block_ids) == 3 and not set(b.block_ids) & set(a.block_ids)
    a.num_computed_tokens = 4
    assert alloc.allocate_for(a, 16)  # grows where it can, anywhere
    assert len(a.block_ids) == 5 and alloc.num_free_blocks == 0
    alloc.check_integrity()
    alloc.free(b)
    alloc.free(a)
    alloc.check_integrity()
    assert alloc.num_free_blocks == 8


def test_placement_takes_old_cached_blocks_not_recent_ones() -> None:
    alloc = BlockAllocator(8, BS)
    old = admit_and_compute(alloc, "old", list(range(16)))  # 4 full blocks, cached when freed
    old_blocks = list(old.block_ids)
    alloc.free(old)
    new = admit_and_compute(alloc, "new", list(range(100, 116)))
    alloc.free(new)  # now 0 plain free blocks; old's 4 are the older half of the unused pool
    c = Request("c", list(range(200, 208)), SamplingParams(max_tokens=8))
    assert alloc.allocate_for(c, 8)
    assert set(c.block_ids) <= set(old_blocks)  # old's blocks, not new's
    assert c.block_ids == sorted(c.block_ids) and c.block_ids[-1] - c.block_ids[0] == 1
    assert alloc.get_computed_blocks(list(range(100, 117)))[1] == 16  # the recent prefix survives
    alloc.check_integrity()


@pytest.mark.parametrize("seed", range(4))
def test_random_traffic_keeps_the_books_and_never_refuses_what_fits(seed: int) -> None:
    """Admissions with prefix hits, growth, frees and cache resets in random order over a small pool, with
    prompts from a tiny alphabet so that prefixes repeat; the integrity check runs after every verb."""
    import random

    rng = random.Random(seed)
    alloc = BlockAllocator(24, BS)
    live: list[Request] = []
    for step in range(400):
        verb = rng.random()
        if verb < 0.35 or not live:  # admit
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 14))]
            req = Request(f"r{step}", prompt, SamplingParams(max_tokens=rng.choice([1, 4, 16, 64, None])))
            hits, num_cached = alloc.get_computed_blocks(prompt)  # as Scheduler._admit uses them
            need = _blocks_needed(len(prompt), BS) - len(hits) + sum(alloc._ref[b] == 0 for b in hits)
            fits = need <= alloc.num_free_blocks
            assert alloc.allocate_for(req, len(prompt) - num_cached, hits) == fits
            if fits:
                req.num_computed_tokens = len(prompt)
                alloc.cache_full_blocks(req)
                live.append(req)
        elif verb < 0.8:  # grow one running request by a few tokens
            req = rng.choice(live)
            n = rng.randrange(1, 6)
            fits = (
                _blocks_needed(req.num_computed_tokens + n, BS) - len(req.block_ids) <= alloc.num_free_blocks
            )
            assert alloc.allocate_for(req, n) == fits
            if fits:
                req.output_token_ids += [rng.randrange(3) for _ in range(n)]
                req.num_computed_tokens += n
                alloc.cache_full_blocks(req)
        elif verb < 0.98:  # finish one
            req = live.pop(rng.randrange(len(live)))
            alloc.free(req)
        else:
            alloc.reset_prefix_cache()
        alloc.check_integrity()
    for req in live:
        alloc.free(req)
    alloc.check_integrity()
    assert alloc.num_free_blocks == 24


def _blocks_needed(tokens: int, bs: int) -> int:
    return -(-tokens // bs)
