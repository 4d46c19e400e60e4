"""Paged KV cache bookkeeping: a pool of fixed-size blocks, a block table per sequence, a
prefix cache keyed by chained block hashes, LRU eviction and KV events.

Pure Python: no torch, no clock. The tensors live in the runner; this module only decides
which physical block holds which positions.

Block life cycle: a block is either *in use* (ref_count > 0, in one or more block tables) or
*free* (in the free queue). A full, computed block also carries its chained hash and sits in
the cached map, so a later sequence with the same prefix can take it (even after it was freed)
instead of recomputing. A free block is reused from the head of the free queue; if it was
cached, its hash is dropped and a BlockRemoved event emitted. Freed blocks without a hash go to
the head (they are worthless), cached ones to the tail, a sequence's deepest block first, so
eviction is LRU and removes the longest prefixes before the shared roots.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

from tokenfab.engine.core.sequence import Sequence
from tokenfab.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVTier

EventSink = Callable[[list[KVEvent]], None]


class LowerTiers(Protocol):
    """What the tiers below G1 hold (tokenfab.kv.tiered.TieredKVStore): a hint the scheduler
    plans onboarding with; a block that then fails to load is recomputed."""

    def leading(self, hashes: Seq[int]) -> int: ...


@dataclass(slots=True)
class Evicted:
    """A cached block evicted while scheduling; its K/V are intact until the step runs."""

    block_hash: int
    block_id: int
    hits: int
    """Prefix hits it served while cached (the offloader's admission test)."""


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    hits: int = 0


@dataclass(slots=True)
class _SeqBlocks:
    table: list[int]
    num_hashed: int = 0
    """Leading blocks of `table` already registered in the prefix cache (or known shared)."""


@dataclass(slots=True)
class KVCacheStats:
    num_blocks: int
    num_used: int
    num_cached_free: int
    prefix_queries: int
    prefix_hits: int


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        event_sink: EventSink | None = None,
        lower_tiers: LowerTiers | None = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1 ({num_blocks}, {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.event_sink = event_sink
        self.lower_tiers = lower_tiers
        """Set: evictions are recorded for offload and prefixes continue into the tiers."""
        self._evicted: list[Evicted] = []
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (head = next to reuse). OrderedDict gives O(1) removal
        # from the middle when a prefix hit revives a free cached block.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._seqs: dict[str, _SeqBlocks] = {}
        self._pending: list[KVEvent] = []
        self._next_event_id = 0
        """Id of the newest event emitted (0: none); the first event is 1, as routers expect."""
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def block_table(self, request_id: str) -> list[int]:
        entry = self._seqs.get(request_id)
        return entry.table if entry is not None else []

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._cached

    def stats(self) -> KVCacheStats:
        cached_free = sum(1 for b in self._free if self._blocks[b].block_hash is not None)
        return KVCacheStats(
            self.num_blocks,
            self.num_used_blocks,
            cached_free,
            self.prefix_queries,
            self.prefix_hits,
        )

    # ------------------------------------------------------------------ admission

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`, leaving at least one token to
        compute (logits come only from computed tokens). Takes no references."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in seq.block_hashes[:max_blocks]:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def find_offloaded_prefix(self, seq: Sequence, start_block: int) -> list[int]:
        """Hashes of the blocks after `start_block` (the G1 prefix) that the lower tiers hold,
        under the same cap as `find_cached_prefix` (the last prompt token is computed)."""
        if self.lower_tiers is None or not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        rest = seq.block_hashes[start_block:max_blocks]
        return rest[: self.lower_tiers.leading(rest)] if rest else []

    def take_evicted(self) -> list[Evicted]:
        """Cached blocks evicted since the last call (recorded only with lower tiers)."""
        out, self._evicted = self._evicted, []
        return out

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def allocate(
        self, seq: Sequence, num_tokens: int, cached_prefix: list[int] | None = None
    ) -> bool:
        """Make `seq`'s block table cover `num_tokens` positions, first taking the blocks of
        `cached_prefix` (only for a sequence with no table yet). All or nothing: returns False
        and changes nothing if the free pool is too small."""
        entry = self._seqs.get(seq.request_id)
        have = len(entry.table) if entry is not None else 0
        prefix = cached_prefix or []
        if prefix and have:
            raise ValueError(f"{seq.request_id}: a cached prefix is only taken at admission")
        need = -(-num_tokens // self.block_size) - have - len(prefix)
        reviving = sum(1 for b in prefix if self._blocks[b].ref_count == 0)
        if max(need, 0) + reviving > len(self._free):
            return False
        if entry is None:
            entry = self._seqs[seq.request_id] = _SeqBlocks([])
        for block_id in prefix:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            block.hits += 1
            entry.table.append(block_id)
        if prefix:
            entry.num_hashed = len(entry.table)
        for _ in range(need):
            entry.table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.block_hash is not None:
            # Evicting a cached block: its prefix is gone from this engine.
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
                self._emit_removed(block.block_hash)
                if self.lower_tiers is not None:
                    self._evicted.append(Evicted(block.block_hash, block_id, block.hits))
            block.block_hash = None
            block.hits = 0
        block.ref_count = 1
        return block_id

    # ------------------------------------------------------------------ progress

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly full, computed blocks in the prefix cache (called after
        a step computed them) and emit one BlockStored for them."""
        if not self.enable_prefix_caching:
            return
        entry = self._seqs.get(seq.request_id)
        if entry is None:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
        if num_full <= entry.num_hashed:
            return
        stored: list[int] = []
        tokens: list[int] = []
        first = entry.num_hashed
        for i in range(first, num_full):
            h = seq.block_hashes[i]
            block = self._blocks[entry.table[i]]
            if h in self._cached:
                # Another sequence computed the same block meanwhile; keep the first copy.
                if stored:
                    break  # keep events contiguous chains; the rest is stored next time
                first = i + 1
                continue
            block.block_hash = h
            self._cached[h] = block.block_id
            stored.append(h)
            tokens.extend(seq.block_tokens(i))
        entry.num_hashed = first + len(stored) if stored else num_full
        if stored:
            parent = seq.block_hashes[first - 1] if first > 0 else None
            self._emit(
                BlockStored(
                    event_id=self._event_id(),
                    block_hashes=stored,
                    parent_hash=parent,
                    token_ids=tokens,
                    block_size=self.block_size,
                    lora_name=seq.lora_name,
                )
            )

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (finished, aborted or preempted)."""
        entry = self._seqs.pop(seq.request_id, None)
        if entry is None:
            return
        # Deepest block first, so the tail of the LRU queue keeps the shared roots longest.
        for block_id in reversed(entry.table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash (only when no block is in use). Emits AllBlocksCleared."""
        if self.num_used_blocks:
            return False
        for block in self._blocks:
            block.block_hash = None
        self._cached.clear()
        self._emit(AllBlocksCleared(event_id=self._event_id()))
        return True

    # ------------------------------------------------------------------ moving blocks

    def cached_prefix_length(self, block_hashes: list[int]) -> int:
        """How many leading blocks of this chain are cached here (in use or free)."""
        n = 0
        for h in block_hashes:
            if h not in self._cached:
                break
            n += 1
        return n

    def hold(self, block_hashes: list[int]) -> list[int]:
        """Take a reference on the cached blocks of the chain's longest cached prefix, so they
        are neither evicted nor rewritten until `unhold`: what a prefill worker keeps for the
        decode worker that pulls them. Returns their block ids, in chain order."""
        ids: list[int] = []
        for h in block_hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            ids.append(block_id)
        return ids

    def unhold(self, block_ids: list[int]) -> None:
        """Drop the references `hold` (or `reserve`) took; deepest block first, as `free`."""
        for block_id in reversed(block_ids):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)

    def reserve(self, count: int) -> list[int]:
        """Take up to `count` free blocks (evicting cached ones, LRU first) for blocks arriving
        from another worker; each holds one reference until `adopt` or `unhold`."""
        count = min(count, len(self._free))
        return [self._take_free_block() for _ in range(count)]

    def adopt(
        self,
        block_ids: list[int],
        block_hashes: list[int],
        parent_hash: int | None,
        token_ids: list[int],
        lora_name: str | None = None,
    ) -> None:
        """Register reserved blocks (their K/V now written) as the cached chain
        `block_hashes`, continuing `parent_hash`, and release them to the free queue: a
        request admitted next finds them as its cached prefix. Emits one BlockStored."""
        if len(block_ids) != len(block_hashes):
            raise ValueError(f"{len(block_ids)} blocks for {len(block_hashes)} hashes")
        stored: list[int] = []
        for block_id, h in zip(block_ids, block_hashes, strict=True):
            if h in self._cached:
                break  # raced with a local computation: the chain continues from its copy
            self._blocks[block_id].block_hash = h
            self._cached[h] = block_id
            stored.append(h)
        if stored:
            self._emit(
                BlockStored(
                    event_id=self._event_id(),
                    block_hashes=stored,
                    parent_hash=parent_hash,
                    token_ids=token_ids[: len(stored) * self.block_size],
                    block_size=self.block_size,
                    lora_name=lora_name,
                )
            )
        self.unhold(block_ids)

    # ------------------------------------------------------------------ events

    def emit_tier_events(self, tier: KVTier, stored: list[int], removed: list[int]) -> None:
        """Announce blocks that entered or left a tier below G1 (the offloader reports them)."""
        if stored:
            self._emit(
                BlockStored(
                    event_id=self._event_id(),
                    block_hashes=list(stored),
                    parent_hash=None,
                    token_ids=[],
                    block_size=self.block_size,
                    tier=tier,
                )
            )
        if removed:
            self._emit(
                BlockRemoved(event_id=self._event_id(), block_hashes=list(removed), tier=tier)
            )

    def _emit_removed(self, block_hash: int) -> None:
        last = self._pending[-1] if self._pending else None
        if isinstance(last, BlockRemoved) and last.tier == "device":
            # Evictions within one step travel as one event.
            last.block_hashes.append(block_hash)
        else:
            self._emit(BlockRemoved(event_id=self._event_id(), block_hashes=[block_hash]))

    def _event_id(self) -> int:
        self._next_event_id += 1
        return self._next_event_id

    def _emit(self, event: KVEvent) -> None:
        if self.event_sink is not None:
            self._pending.append(event)

    def restart_events(self) -> None:
        """Number events from 1 again, as a new engine does: only with an empty cache, whose
        state then matches a router's view of a fresh engine."""
        if self._cached:
            raise RuntimeError("restart_events needs an empty prefix cache")
        self._next_event_id = 0
        self._pending = []

    @property
    def last_event_id(self) -> int:
        """Id of the newest event emitted (0: none yet), flushed or not."""
        return self._next_event_id

    def cached_blocks(self) -> list[tuple[int, int]]:
        """(block hash, block id) of every cached block."""
        return list(self._cached.items())

    def cached_hashes(self) -> list[int]:
        """Every cached block hash: with `last_event_id`, a snapshot a router can resync
        from (the cache reflects every event emitted so far)."""
        return list(self._cached)

    def flush_events(self) -> None:
        """Hand the events of the last step to the sink, in event-id order (one call)."""
        if self._pending and self.event_sink is not None:
            events, self._pending = self._pending, []
            self.event_sink(events)
