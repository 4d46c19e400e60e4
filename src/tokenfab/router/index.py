"""Which workers hold which cached blocks: the router's view of every engine's prefix cache.

Block hashes are chained (tokenfab.kv.hashing): a hash stands for its block *and* the whole
prefix before it, so a flat map hash -> holders is enough; no tree is needed to find the longest
cached prefix of a request, only a walk along the request's own hashes. Holders are an int
bitmask of worker slots (worker ids interned to bit positions, freed slots reused), so the walk
ANDs masks and stops as soon as no worker is left.

The index follows each worker's event stream by event id. A gap (an event id that is not the
next one) means events were lost: the worker's entries can no longer be trusted to be complete,
so the index marks it as needing a resync, buffers its later events, and waits for a
`KVSnapshot`; after the snapshot it replays the buffered events newer than the snapshot.

Pure bookkeeping: no I/O, no clock.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat

from tokenfab.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    KVSnapshot,
)

FIRST_EVENT_ID = 1
"""Id of an engine's first KV event: `KVCacheManager` pre-increments its counter from 0. A
worker whose first event the index sees has a larger id joined before the router (or its first
events were lost) and must be re-synced from a snapshot."""

_BULK = 4
"""Runs of at least this many hashes take the C-level path in `_store`/`_remove`."""

DEFAULT_RESYNC_BUFFER = 16_384
"""Events kept per worker while it waits for a snapshot; older ones are dropped (the replay
then finds a gap and asks for another snapshot rather than apply an incomplete stream)."""


@dataclass(slots=True)
class _WorkerState:
    bit: int
    """The worker's one-bit mask (1 << slot)."""
    num_blocks: int = 0
    last_event_id: int = FIRST_EVENT_ID - 1
    resync: bool = False
    buffer: deque[KVEvent] = field(default_factory=deque)
    """Events received while waiting for a snapshot, replayed after it (bounded: the oldest
    go first)."""


class KVIndex:
    def __init__(
        self,
        first_event_id: int = FIRST_EVENT_ID,
        resync_buffer: int = DEFAULT_RESYNC_BUFFER,
    ) -> None:
        self._first_event_id = first_event_id
        self._resync_buffer = resync_buffer
        self._holders: dict[int, int] = {}
        """Block hash -> bitmask of the worker slots holding it (never 0: empty entries go)."""
        self._tiers: dict[str, dict[int, int]] = {}
        """Lower tiers (host, disk, remote): block hash -> mask of the workers holding it
        there. Kept apart from `_holders` (G1), so the hot path is unchanged."""
        self._workers: dict[str, _WorkerState] = {}
        self._slot_owner: list[str | None] = []
        self._free_slots: list[int] = []
        """A min-heap, so slot reuse does not depend on removal order."""
        self.events_applied = 0
        self.duplicate_events = 0
        self.gaps = 0
        """Times a worker was marked as needing a resync (gaps and `mark_resync`)."""
        self.snapshots_loaded = 0

    # ------------------------------------------------------------------ workers

    def workers(self) -> list[str]:
        return sorted(self._workers)

    def worker_bit(self, worker_id: str) -> int:
        """The worker's one-bit mask in `find_matches`'s `overlay` (registers the worker)."""
        return self._state(worker_id).bit

    def remove_worker(self, worker_id: str) -> None:
        """Forget the worker at once: its blocks, event position and slot."""
        state = self._workers.pop(worker_id, None)
        if state is None:
            return
        self._drop_all(state)
        self._drop_tiers(state)
        slot = state.bit.bit_length() - 1
        self._slot_owner[slot] = None
        heapq.heappush(self._free_slots, slot)

    def last_event_id(self, worker_id: str) -> int:
        """Id of the worker's newest event applied (or covered by a snapshot); an unseen worker
        is at `first_event_id - 1`."""
        state = self._workers.get(worker_id)
        return state.last_event_id if state is not None else self._first_event_id - 1

    def needs_resync(self, worker_id: str) -> bool:
        state = self._workers.get(worker_id)
        return state is not None and state.resync

    def workers_needing_resync(self) -> list[str]:
        return sorted(w for w, s in self._workers.items() if s.resync)

    def mark_resync(self, worker_id: str) -> None:
        """Distrust the worker's stream (e.g. its load report shows events the index never
        got): buffer its events until a snapshot arrives."""
        state = self._state(worker_id)
        if not state.resync:
            state.resync = True
            self.gaps += 1

    # ------------------------------------------------------------------ sizes

    @property
    def num_blocks(self) -> int:
        """Distinct block hashes held by at least one worker."""
        return len(self._holders)

    def num_worker_blocks(self, worker_id: str) -> int:
        state = self._workers.get(worker_id)
        return state.num_blocks if state is not None else 0

    def block_counts(self) -> dict[str, int]:
        return {w: s.num_blocks for w, s in sorted(self._workers.items())}

    def holders(self, block_hash: int) -> list[str]:
        """Workers holding one block (for tests and debugging; `find_matches` is the fast path)."""
        return self._workers_of(self._holders.get(block_hash, 0))

    # ------------------------------------------------------------------ events

    def apply(self, batch: KVEventBatch) -> bool:
        """Apply a worker's events in id order. Returns False when the worker needs a resync:
        the batch skipped an id (the events from the gap on are buffered, not applied) or the
        worker was already waiting for a snapshot."""
        state = self._state(batch.worker_id)
        if state.resync:
            state.buffer.extend(batch.events)
            return False
        return self._apply_events(state, batch.events)

    def load_snapshot(self, snap: KVSnapshot) -> bool:
        """Replace the worker's blocks with the snapshot's, then replay the events buffered
        since the gap that are newer than it. Returns True when the worker is in sync after.

        A snapshot no newer than what an in-sync worker already has is ignored: applying it
        would only move the worker back in time."""
        state = self._state(snap.worker_id)
        if not state.resync and snap.last_event_id <= state.last_event_id:
            return True
        self._drop_all(state)
        self._drop_tiers(state)
        self._store(state, snap.block_hashes)
        for tier, hashes in snap.tier_hashes.items():
            self._tier_store(tier, state, hashes)
        state.last_event_id = snap.last_event_id
        state.resync = False
        self.snapshots_loaded += 1
        buffered, state.buffer = state.buffer, deque(maxlen=self._resync_buffer)
        return self._apply_events(state, buffered)

    def _apply_events(self, state: _WorkerState, events: Iterable[KVEvent]) -> bool:
        first = last = state.last_event_id
        it = iter(events)
        for event in it:
            event_id = event.event_id
            if event_id <= last:
                self.duplicate_events += 1
                continue
            if event_id != last + 1:
                state.resync = True
                self.gaps += 1
                state.buffer.clear()
                state.buffer.append(event)
                state.buffer.extend(it)
                break
            last = event_id
            # Exact type checks: the union's members are final structs, and `is` is the
            # cheapest dispatch on this hot path.
            kind = type(event)
            if kind is not AllBlocksCleared and event.tier != "device":  # type: ignore[union-attr]
                self._tier_event(state, event)  # type: ignore[arg-type]
            elif kind is BlockStored:
                self._store(state, event.block_hashes)  # type: ignore[union-attr]
            elif kind is BlockRemoved:
                self._remove(state, event.block_hashes)  # type: ignore[union-attr]
            elif kind is AllBlocksCleared:
                self._drop_all(state)
        state.last_event_id = last
        self.events_applied += last - first  # ids are contiguous
        return not state.resync

    # ------------------------------------------------------------------ block sets

    # Hot path. Runs of `_BULK` or more hashes do their per-hash work inside C-level builtins
    # (map over dict methods, list.count), with a Python loop only for hashes other workers
    # also hold; shorter runs (a decoding sequence filled one block) take a plain loop, cheaper
    # than building lists. Together ~1.4x the event rate of plain loops, and ~2x that of also
    # keeping a set of hashes per worker (benchmarks/router_index.py).

    def _store(self, state: _WorkerState, hashes: Sequence[int]) -> None:
        holders = self._holders
        bit = state.bit
        before = len(holders)
        added = 0
        # setdefault inserts a new hash with this worker's bit, or returns the existing mask.
        if len(hashes) < _BULK:
            for h in hashes:
                mask = holders.setdefault(h, bit)
                if mask != bit:
                    added += not mask & bit
                    holders[h] = mask | bit
        else:
            masks = list(map(holders.setdefault, hashes, repeat(bit)))
            if masks.count(bit) != len(masks):
                for h, mask in zip(hashes, masks, strict=True):
                    if mask != bit:
                        mask = holders[h]  # again: the run may hold this hash twice
                        added += not mask & bit
                        holders[h] = mask | bit
        state.num_blocks += added + len(holders) - before

    def _remove(self, state: _WorkerState, hashes: Sequence[int]) -> None:
        holders = self._holders
        bit = state.bit
        if len(hashes) < _BULK:
            masks = [holders.pop(h, 0) for h in hashes]
        else:
            masks = list(map(holders.pop, hashes, repeat(0)))
            if masks.count(bit) == len(masks):
                state.num_blocks -= len(masks)  # all were this worker's alone
                return
        keep = ~bit
        removed = 0
        for h, mask in zip(hashes, masks, strict=True):
            if mask != bit:
                rest = mask & keep
                if rest:
                    holders[h] = rest  # others still hold it
                if not mask & bit:
                    continue
            removed += 1
        state.num_blocks -= removed

    def _drop_all(self, state: _WorkerState) -> None:
        """Remove the worker from every entry: a scan of the whole map (~50 ms per million
        hashes here), paid only on AllBlocksCleared, worker removal and snapshots, so that the
        hot path keeps no per-worker set."""
        if not state.num_blocks:
            return
        holders = self._holders
        bit = state.bit
        mine = list(compress(holders, map(bit.__and__, holders.values())))
        masks = list(map(holders.pop, mine))
        if masks.count(bit) != len(masks):
            keep = ~bit
            for h, mask in zip(mine, masks, strict=True):
                rest = mask & keep
                if rest:
                    holders[h] = rest
        state.num_blocks = 0

    # ------------------------------------------------------------------ lower tiers

    def _tier_event(self, state: _WorkerState, event: BlockStored | BlockRemoved) -> None:
        if isinstance(event, BlockStored):
            self._tier_store(event.tier, state, event.block_hashes)
            return
        holders = self._tiers.get(event.tier)
        if holders is None:
            return
        keep = ~state.bit
        for h in event.block_hashes:
            rest = holders.get(h, 0) & keep
            if rest:
                holders[h] = rest
            else:
                holders.pop(h, None)

    def _tier_store(self, tier: str, state: _WorkerState, hashes: Sequence[int]) -> None:
        holders = self._tiers.setdefault(tier, {})
        bit = state.bit
        for h in hashes:
            holders[h] = holders.get(h, 0) | bit

    def _drop_tiers(self, state: _WorkerState) -> None:
        keep = ~state.bit
        for holders in self._tiers.values():
            for h in [h for h, m in holders.items() if m & state.bit]:
                rest = holders[h] & keep
                if rest:
                    holders[h] = rest
                else:
                    del holders[h]

    def find_lower_matches(
        self, hashes: Sequence[int], start: Mapping[str, int], tier_cost: Mapping[str, float]
    ) -> dict[str, tuple[int, float]]:
        """Per worker, how many blocks after its G1 match (`start`: worker -> blocks) it holds
        in lower tiers, and their cost (per block, the cheapest tier's `tier_cost`); only
        workers with at least one such block."""
        if not self._tiers:
            return {}
        tiers = [(holders, tier_cost.get(t, 1.0)) for t, holders in self._tiers.items()]
        tiers.sort(key=lambda pair: pair[1])
        out: dict[str, tuple[int, float]] = {}
        for worker, state in self._workers.items():
            n, cost = 0, 0.0
            for h in hashes[start.get(worker, 0) :]:
                price = next((c for holders, c in tiers if holders.get(h, 0) & state.bit), None)
                if price is None:
                    break
                n += 1
                cost += price
            if n:
                out[worker] = (n, cost)
        return out

    def num_tier_blocks(self, tier: str) -> int:
        return len(self._tiers.get(tier, {}))

    # ------------------------------------------------------------------ matching

    def find_matches(
        self, hashes: Sequence[int], overlay: Mapping[int, int] | None = None
    ) -> dict[str, int]:
        """Per worker, how many leading blocks of the request it holds (only workers with at
        least one). `overlay` adds holders (hash -> mask of `worker_bit`s), e.g. blocks a worker
        is about to compute."""
        if not hashes:
            return {}
        holders = self._holders
        mask_of: Callable[[int], int | None] = holders.get  # the bound method: no extra call
        if overlay:
            extra = overlay.get

            def with_overlay(h: int) -> int | None:
                return holders.get(h, 0) | extra(h, 0)

            mask_of = with_overlay

        current = mask_of(hashes[0]) or 0
        if not current:
            return {}
        matches: dict[str, int] = {}
        owner = self._slot_owner
        for depth in range(1, len(hashes)):
            mask = (mask_of(hashes[depth]) or 0) & current
            if mask != current:
                # Workers that dropped out here hold exactly `depth` leading blocks.
                self._record(matches, current & ~mask, depth, owner)
                if not mask:
                    return matches
                current = mask
        self._record(matches, current, len(hashes), owner)
        return matches

    @staticmethod
    def _record(matches: dict[str, int], mask: int, depth: int, owner: list[str | None]) -> None:
        while mask:
            low = mask & -mask
            worker = owner[low.bit_length() - 1]
            if worker is not None:
                matches[worker] = depth
            mask ^= low

    # ------------------------------------------------------------------ helpers

    def _state(self, worker_id: str) -> _WorkerState:
        state = self._workers.get(worker_id)
        if state is None:
            if self._free_slots:
                slot = heapq.heappop(self._free_slots)
                self._slot_owner[slot] = worker_id
            else:
                slot = len(self._slot_owner)
                self._slot_owner.append(worker_id)
            state = self._workers[worker_id] = _WorkerState(
                bit=1 << slot,
                last_event_id=self._first_event_id - 1,
                buffer=deque(maxlen=self._resync_buffer),
            )
        return state

    def _workers_of(self, mask: int) -> list[str]:
        out: list[str] = []
        while mask:
            low = mask & -mask
            worker = self._slot_owner[low.bit_length() - 1]
            if worker is not None:
                out.append(worker)
            mask ^= low
        return sorted(out)
