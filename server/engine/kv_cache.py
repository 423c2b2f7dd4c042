"""Paged-KV block bookkeeping in plain integers: free list, ref counts and the prefix cache.

The KV tensors live elsewhere (model/attention.py); this module only decides which block ids a
request's tokens occupy. A block is in exactly one of three states:

- free: ref count 0, no hash, marked in `_is_free`;
- cached: ref count 0 but holding a full block of known tokens, in the LRU `_evictable`; a prefix
  hit revives it, and it is evicted (hash dropped) when a fresh block is needed: the oldest first
  when no block is free, or one in the older half of the unused pool that a placement picks;
- in use: ref count > 0 (the number of live requests whose block table holds it).

Placement: the decode attention kernel reads a sequence's blocks in table order, and scattered blocks
cost it ~30-45% more time than consecutive ones (bench/NOTES.md). So a request's next block is the
one after its last when that one can be taken, and a request admitted with nothing of its own yet
starts at the head of a run of takeable blocks long enough for its prompt plus max_tokens (first
fit, else the longest run); the rest of that run is marked reserved, so that other admissions start
elsewhere. Reservations are soft: any request takes a reserved block when nothing else is left.

Prefix cache keys chain: key(i) = (hash(key(i-1)), tokens of block i), for FULL blocks only, so a
block is shared only when the whole prefix before it matches. The dict compares the token tuple
too, so a hit never rests on a bare hash.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np

from server.engine.request import Request

BlockKey = tuple[int, tuple[int, ...]]  # (parent chain hash, this block's token ids)
_ROOT_HASH = 0
MAX_RESERVED_BLOCKS = 128  # the longest run an admission looks for (2,048 tokens at block size 16)
_WINDOW = 4096  # blocks per placement scan window
_MAX_WINDOWS = 16  # windows an admission scans for a long enough run before it takes the longest seen


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._key: list[BlockKey | None] = [None] * num_blocks
        self._is_free = np.ones(num_blocks, dtype=bool)
        self._num_free = num_blocks
        self._reserved = np.zeros(num_blocks, dtype=bool)  # kept for a running request's growth
        self._reservations: dict[str, tuple[int, int]] = {}  # request id -> its reserved range
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._evicted_at = np.full(num_blocks, -1, dtype=np.int64)  # tick it became evictable, -1 if not
        self._tick = 0
        self._cursor = 0  # where placement scans start: after the last placed run (next fit)
        self._cached: dict[BlockKey, int] = {}
        self._holders: dict[str, Request] = {}  # requests holding blocks, for check_integrity
        self._chain: dict[str, list[int]] = {}  # request id -> chain hash of each registered full block
        self.prefix_queries = 0  # tokens looked up at admission
        self.prefix_hits = 0  # tokens found in the cache
        self.num_evictions = 0

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a request could take now: free plus cached-but-unused (evictable)."""
        return self._num_free + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest cached prefix of `token_ids` in full blocks: (block ids, number of tokens).

        The last token is never counted: it must be recomputed so the step yields its logits.
        Pure lookup: nothing changes until `allocate_for` takes the blocks.
        """
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        hits: list[int] = []
        parent = _ROOT_HASH
        for i in range((len(token_ids) - 1) // bs):
            key = (parent, tuple(token_ids[i * bs : (i + 1) * bs]))
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
            parent = hash(key)
        return hits, len(hits) * bs

    # ---- verbs ---------------------------------------------------------------------------------
    def allocate_for(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Grow `request.block_ids` to cover num_computed + len(computed_blocks)*block_size + new tokens.

        `computed_blocks` (prefix hits from `get_computed_blocks`) are only passed at admission, when
        the request holds no blocks. Returns False and changes nothing when the pool is too small.
        """
        assert not computed_blocks or not request.block_ids, "prefix hits only at admission"
        num_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_fresh = _cdiv(num_tokens, self.block_size) - len(request.block_ids) - len(computed_blocks)
        num_revived = sum(1 for b in computed_blocks if self._ref[b] == 0)  # they leave the free pool
        if num_fresh + num_revived > self.num_free_blocks:
            return False
        if not request.block_ids:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += len(computed_blocks) * self.block_size
            self._chain[request.request_id] = [hash(self._key[b]) for b in computed_blocks]
        for block in computed_blocks:
            if self._ref[block] == 0:
                del self._evictable[block]
                self._evicted_at[block] = -1
            self._ref[block] += 1
            request.block_ids.append(block)
        if num_fresh > 0 and len(request.block_ids) == len(computed_blocks):  # none of its own yet
            num_fresh -= self._place(request, num_fresh, len(computed_blocks))
        for _ in range(max(num_fresh, 0)):
            request.block_ids.append(self._take_fresh(request.block_ids[-1] if request.block_ids else -1))
        self._holders[request.request_id] = request
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the blocks that became full of computed tokens since the last call."""
        if not self.enable_prefix_caching:
            return
        chain = self._chain.setdefault(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if num_full <= len(chain):
            return
        tokens = request.all_token_ids  # one copy per newly full block batch, not per step
        bs = self.block_size
        for i in range(len(chain), num_full):
            key = (chain[-1] if chain else _ROOT_HASH, tuple(tokens[i * bs : (i + 1) * bs]))
            chain.append(hash(key))
            block = request.block_ids[i]
            # The same content computed twice (two requests admitted before either was cached): keep the
            # first copy registered; this one stays unhashed and returns to the plain free list.
            if key not in self._cached and self._key[block] is None:
                self._cached[key] = block
                self._key[block] = key

    def free(self, request: Request) -> None:
        """Drop the request's references. Tail blocks are released first so LRU evicts them first."""
        for block in reversed(request.block_ids):
            self._ref[block] -= 1
            assert self._ref[block] >= 0, f"block {block} freed twice"
            if self._ref[block] == 0:
                if self._key[block] is not None:
                    self._evictable[block] = None
                    self._evicted_at[block] = self._tick
                    self._tick += 1
                else:
                    self._release(block)
        request.block_ids = []
        self._holders.pop(request.request_id, None)
        self._chain.pop(request.request_id, None)
        if (span := self._reservations.pop(request.request_id, None)) is not None:
            self._reserved[span[0] : span[1]] = False

    def reset_prefix_cache(self) -> None:
        """Forget every cached-but-unused block (e.g. after the weights change)."""
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._evicted_at[block] = -1
            self._forget(block)
            self._release(block)

    # ---- placement -----------------------------------------------------------------------------
    # Scans go window by window from a rotating cursor, so their cost does not grow with the pool
    # (a GPU pool holds ~10^5 blocks; a whole-pool scan cost ~4 ms an admission there).
    def _old_threshold(self) -> int:
        """Cached blocks with an eviction tick <= this are in the older half of the unused pool, plain free
        blocks counting as the oldest (as in an LRU over the whole pool); -1: none are. Ticks rise by one
        per block made evictable, so the k oldest have ticks <= the LRU head's + k - 1, or fewer when
        some were revived since (then fewer count as old, never younger ones)."""
        k = (self._num_free + len(self._evictable)) // 2 - self._num_free
        if k <= 0:
            return -1
        return int(self._evicted_at[next(iter(self._evictable))]) + k - 1

    def _takeable(self, lo: int, hi: int, threshold: int) -> np.ndarray:
        """Blocks lo..hi-1 a placement may take: free ones and the older half of the cached ones."""
        ticks = self._evicted_at[lo:hi]
        return self._is_free[lo:hi] | ((ticks >= 0) & (ticks <= threshold))

    def _windows(self) -> Iterator[tuple[int, int]]:
        """(lo, hi) windows covering the pool from the cursor to its end, then from its start; adjacent
        windows overlap by MAX_RESERVED_BLOCKS so that a run of that length is whole in one of them."""
        n, cursor = self.num_blocks, self._cursor
        for lo in [*range(cursor, n, _WINDOW), *range(0, cursor, _WINDOW)]:
            yield lo, min(n, lo + _WINDOW + MAX_RESERVED_BLOCKS)

    def _place(self, request: Request, num_fresh: int, num_held: int) -> int:
        """Start an admitted request's own blocks at the head of a long enough run (module docstring);
        returns how many blocks it took (0 or 1)."""
        if num_held and self._next_is_takeable(request.block_ids[-1], -1):
            return 0  # a prefix hit whose next block is free: grow from there
        max_tokens = request.params.max_tokens
        expected = request.num_prompt_tokens + (max_tokens if max_tokens is not None else 1 << 30)
        want = max(min(_cdiv(expected, self.block_size) - num_held, MAX_RESERVED_BLOCKS), num_fresh)
        threshold = self._old_threshold()
        best = (0, 0)  # (length, start) of the longest run seen
        for scanned, (lo, hi) in enumerate(self._windows()):
            if scanned == _MAX_WINDOWS and best[0]:
                break  # a fragmented pool: the longest run of the first windows will do
            avail = self._takeable(lo, hi, threshold) & ~self._reserved[lo:hi]
            edges = np.diff(avail.view(np.int8), prepend=np.int8(0), append=np.int8(0))
            starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
            if not starts.size:
                continue
            lengths = ends - starts
            fits = np.flatnonzero(lengths >= want)
            i = int(fits[0]) if fits.size else int(np.argmax(lengths))
            best = max(best, (int(lengths[i]), lo + int(starts[i])))
            if fits.size:
                break
        length, start = best
        if not length:
            return 0  # every takeable block is reserved: _take_fresh falls back
        end = start + min(length, want)
        request.block_ids.append(self._take(start))
        self._cursor = end % self.num_blocks
        if num_fresh < end - start:
            self._reserved[start + num_fresh : end] = True
            self._reservations[request.request_id] = (start + num_fresh, end)
        return 1

    def _next_is_takeable(self, last: int, threshold: int) -> bool:
        nxt = last + 1
        if not 0 < nxt < self.num_blocks:
            return False
        return bool(self._is_free[nxt]) or 0 <= self._evicted_at[nxt] <= threshold

    def _take_fresh(self, after: int) -> int:
        """The block after `after` when it can be taken, else a free one (unreserved first), else the LRU's."""
        if after >= 0 and self._next_is_takeable(after, self._old_threshold()):
            return self._take(after + 1)
        if self._num_free:
            for mask in (
                lambda lo, hi: self._is_free[lo:hi] & ~self._reserved[lo:hi],
                lambda lo, hi: self._is_free[lo:hi],
            ):
                for lo, hi in self._windows():
                    hit = mask(lo, hi)
                    if hit.any():
                        return self._take(lo + int(np.argmax(hit)))
        block = next(iter(self._evictable))
        return self._take(block)

    def _take(self, block: int) -> int:
        if self._is_free[block]:
            self._is_free[block] = False
            self._num_free -= 1
        else:
            del self._evictable[block]
            self._evicted_at[block] = -1
            self._forget(block)
            self.num_evictions += 1
        self._reserved[block] = False
        self._ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._is_free[block] = True
        self._num_free += 1

    def _forget(self, block: int) -> None:
        key = self._key[block]
        if key is not None:
            del self._cached[key]
            self._key[block] = None

    # ---- invariants ----------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Assert the bookkeeping is consistent; tests call it after every scenario."""
        holders: dict[int, int] = {}
        for request in self._holders.values():
            assert not request.is_finished, f"{request.request_id} finished but still holds blocks"
            assert len(set(request.block_ids)) == len(request.block_ids), (
                f"{request.request_id} repeats a block"
            )
            for block in request.block_ids:
                holders[block] = holders.get(block, 0) + 1
        free, evictable = set(np.flatnonzero(self._is_free).tolist()), set(self._evictable)
        assert len(free) == self._num_free, f"{len(free)} free blocks but the count says {self._num_free}"
        assert not free & evictable, "a block is both free and cached-evictable"
        assert all((self._evicted_at[b] >= 0) == (b in evictable) for b in range(self.num_blocks)), (
            "an eviction tick disagrees with the LRU"
        )
        for block in range(self.num_blocks):
            in_use = self._ref[block] > 0
            states = int(block in free) + int(block in evictable) + int(in_use)
            assert states == 1, f"block {block} is in {states} states (free/evictable/in use)"
            assert self._ref[block] == holders.get(block, 0), (
                f"block {block}: ref {self._ref[block]} but {holders.get(block, 0)} holders"
            )
            if block in free:
                assert self._key[block] is None, f"free block {block} still has a hash"
            if block in evictable:
                assert self._key[block] is not None, f"evictable block {block} has no hash"
        for key, block in self._cached.items():
            assert self._key[block] == key, f"hash map points at block {block} which has another key"
        assert sum(k is not None for k in self._key) == len(self._cached), "a hashed block is not in the map"
