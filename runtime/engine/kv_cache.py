"""Block pool for the paged KV cache, with prefix caching of full blocks.

Every physical block is in exactly one of three states:

* free: refcount 0, holds nothing worth keeping; on the free list.
* in use: refcount > 0, listed in the ``block_ids`` of one or more requests.
* cached: refcount 0 but its contents are hashed, so a later request with the same
  prefix can reuse it; on the evictable LRU until a cache hit revives it or an
  allocation evicts it.

A full block's hash chains its parent's hash with its own tokens, so one lookup per
block finds the longest cached prefix. Only blocks whose every token has been computed
are hashed; a partially filled block is never shared.
"""
from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass

from runtime.contracts.request import Request

logger = logging.getLogger(__name__)


@dataclass
class _HashState:
    """How far a request's blocks have been hashed, so hashing stays incremental."""

    num_hashed_blocks: int = 0
    last_hash: int | None = None


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        # Insertion order is recency: the first entry is evicted first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._block_hash: list[int | None] = [None] * num_blocks
        # Kept to tell a real hit from a hash collision; a wrong hit would be silent garbage.
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._hash_states: dict[str, _HashState] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ----------------------------------------------------------------- accounting

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could get now: truly free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks reachable through the prefix cache (in use or evictable)."""
        return len(self._hash_to_block)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        if self.prefix_cache_queries == 0:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def is_cached(self, block_id: int) -> bool:
        return self._block_hash[block_id] is not None

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----------------------------------------------------------------- prefix cache

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest run of cached full blocks matching the request's leading tokens.

        Returns the block ids and how many tokens they cover. Ref counts are untouched;
        pass the blocks to ``allocate`` to claim them.
        """
        # Image placeholder tokens are the same for every image: a multimodal prompt never shares blocks.
        if not self.enable_prefix_caching or request.multimodal is not None:
            return [], 0
        # At least one token must still run through the model so there are logits to
        # sample from; hence the -1.
        max_blocks = (request.num_tokens - 1) // self.block_size
        tokens = request.all_token_ids
        blocks: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            block_tokens = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = hash((parent, block_tokens))
            block_id = self._hash_to_block.get(h)
            if block_id is None or self._block_tokens[block_id] != block_tokens:
                break
            blocks.append(block_id)
            parent = h
        return blocks, len(blocks) * self.block_size

    def cache_full_blocks(self, request: Request) -> None:
        """Register hashes of the request's blocks that are now full of computed tokens (whose ids are
        known: a token still in flight, sampled by a step not back yet, waits for the next call)."""
        if not self.enable_prefix_caching:
            return
        state = self._hash_states.get(request.request_id)
        if state is None:
            if request.multimodal is not None:
                return
            state = self._hash_states[request.request_id] = _HashState()
        # Inlined (this runs for every request every step, and returns here in all but one in block_size).
        num_known = len(request.prompt_token_ids) + len(request.output_token_ids)
        if request.num_computed_tokens < num_known:
            num_known = request.num_computed_tokens
        if num_known < (state.num_hashed_blocks + 1) * self.block_size:
            return
        num_full = min(num_known // self.block_size, len(request.block_ids))
        if num_full <= state.num_hashed_blocks:
            return
        tokens = request.all_token_ids
        for i in range(state.num_hashed_blocks, num_full):
            block_tokens = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = hash((state.last_hash, block_tokens))
            self._register(request.block_ids[i], h, block_tokens)
            state.last_hash = h
            state.num_hashed_blocks = i + 1

    def _register(self, block_id: int, h: int, block_tokens: tuple[int, ...]) -> None:
        if self._block_hash[block_id] is not None:
            return  # came from the cache, already registered
        if h in self._hash_to_block:
            # Another request computed the same block concurrently; keep the first copy
            # and let this one go back to the free list when released.
            return
        self._hash_to_block[h] = block_id
        self._block_hash[block_id] = h
        self._block_tokens[block_id] = block_tokens

    # ----------------------------------------------------------------- allocation

    def allocate(self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Grow ``request.block_ids`` to cover ``num_computed_tokens + num_new_tokens`` tokens.

        ``computed_blocks`` (from ``get_computed_blocks``, first schedule only) become the
        start of ``block_ids``; the caller must already have counted their tokens in
        ``request.num_computed_tokens``. Returns False, changing nothing, when the pool
        cannot supply enough blocks.

        Passing ``computed_blocks`` (even ``[]``) marks an admission, and only a
        successful one counts in the hit-rate stats: the scheduler may look a request up
        several times before there is room for it.
        """
        if computed_blocks is None and (request.num_computed_tokens + num_new_tokens
                                        <= len(request.block_ids) * self.block_size):
            return True  # the common decode step: its last block has room
        is_admission = computed_blocks is not None
        computed_blocks = computed_blocks if computed_blocks is not None else []
        if computed_blocks and request.block_ids:
            raise ValueError(f"request {request.request_id}: computed_blocks given but it already holds blocks")
        num_held = len(request.block_ids) + len(computed_blocks)
        num_needed = self.num_blocks_needed(request.num_computed_tokens + num_new_tokens)
        num_to_take = max(0, num_needed - num_held)
        # Reviving an evictable cached block takes it out of the pool others draw from.
        num_revived = sum(1 for b in computed_blocks if self._ref_counts[b] == 0)
        if num_to_take > self.num_free_blocks - num_revived:
            return False
        for block_id in computed_blocks:
            self._acquire_cached(block_id)
        if computed_blocks:
            self._hash_states[request.request_id] = _HashState(
                num_hashed_blocks=len(computed_blocks), last_hash=self._block_hash[computed_blocks[-1]]
            )
            request.block_ids = list(computed_blocks)
        request.block_ids.extend(self._take_block() for _ in range(num_to_take))
        if is_admission and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed_blocks) * self.block_size
        return True

    def free(self, request: Request) -> None:
        """Release all of the request's blocks; hashed ones stay cached until evicted."""
        # Reverse order puts tail blocks at the front of the LRU: a prefix's tail is
        # shared by fewer future requests than its head, so it should go first.
        for block_id in reversed(request.block_ids):
            self._release(block_id)
        request.block_ids = []
        self._hash_states.pop(request.request_id, None)

    def _acquire_cached(self, block_id: int) -> None:
        if self._block_hash[block_id] is None:
            raise ValueError(f"block {block_id} is not in the prefix cache")
        if self._ref_counts[block_id] == 0:
            del self._evictable[block_id]
        self._ref_counts[block_id] += 1

    def _take_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            del self._hash_to_block[self._block_hash[block_id]]
            self._block_hash[block_id] = None
            self._block_tokens[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id

    def _release(self, block_id: int) -> None:
        if self._ref_counts[block_id] <= 0:
            raise RuntimeError(f"block {block_id} released more times than acquired")
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] > 0:
            return
        if self._block_hash[block_id] is not None:
            self._evictable[block_id] = None
        else:
            self._free.append(block_id)
