"""Paged-KV block bookkeeping in plain integers: free list, ref counts and the prefix cache.

The KV tensors live elsewhere (model/attention.py); this module only decides which block ids a
request's tokens occupy. A block is in exactly one of three states:

- free: ref count 0, no hash, in `_free` (handed out first);
- cached: ref count 0 but holding a full block of known tokens, in the LRU `_evictable`; a prefix
  hit revives it, and it is evicted (hash dropped) only when a fresh block is needed and `_free` is
  empty;
- in use: ref count > 0 (the number of live requests whose block table holds it).

Prefix cache keys chain: key(i) = (hash(key(i-1)), tokens of block i), for FULL blocks only, so a
block is shared only when the whole prefix before it matches. The dict compares the token tuple
too, so a hit never rests on a bare hash.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from server.engine.request import Request

BlockKey = tuple[int, tuple[int, ...]]  # (parent chain hash, this block's token ids)
_ROOT_HASH = 0


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
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
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
        return len(self._free) + len(self._evictable)

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
            self._ref[block] += 1
            request.block_ids.append(block)
        for _ in range(max(num_fresh, 0)):
            request.block_ids.append(self._take_fresh())
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
                else:
                    self._free.append(block)
        request.block_ids = []
        self._holders.pop(request.request_id, None)
        self._chain.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached-but-unused block (e.g. after the weights change)."""
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self._free.append(block)

    def _take_fresh(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self.num_evictions += 1
        self._ref[block] = 1
        return block

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
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & evictable, "a block is both free and cached-evictable"
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
