"""Which workers hold which cached blocks: the router's view of every engine's prefix cache.

Block hashes are chained (tokenfab.kv.hashing): a hash stands for its block *and* the whole
prefix before it, so a flat map hash -> holders is enough; no tree is needed to find the longest
cached prefix of a request, only a walk along the request's own hashes. Holders are an int
bitmask of worker slots (worker ids interned to bit positions, freed slots reused), so the walk
ANDs masks and stops as soon as no worker is left. The table itself is `holders.py`'s (in C
where a compiler is available).

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

from tokenfab.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    KVSnapshot,
)
from tokenfab.router.holders import CLEAR, Holders, Walk, make_holders

FIRST_EVENT_ID = 1
"""Id of an engine's first KV event: `KVCacheManager` pre-increments its counter from 0. A
worker whose first event the index sees has a larger id joined before the router (or its first
events were lost) and must be re-synced from a snapshot."""

DEFAULT_RESYNC_BUFFER = 16_384
"""Events kept per worker while it waits for a snapshot; older ones are dropped (the replay
then finds a gap and asks for another snapshot rather than apply an incomplete stream)."""


@dataclass(slots=True)
class _WorkerState:
    slot: int
    """The worker's bit position in the table's masks."""
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
        holders: Holders | None = None,
    ) -> None:
        self._first_event_id = first_event_id
        self._resync_buffer = resync_buffer
        self._holders: Holders = holders if holders is not None else make_holders()
        """Block hash -> bitmask of the worker slots holding it."""
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
        return 1 << self._state(worker_id).slot

    def remove_worker(self, worker_id: str) -> None:
        """Forget the worker at once: its blocks, event position and slot."""
        state = self._workers.pop(worker_id, None)
        if state is None:
            return
        self._drop_all(state)
        self._drop_tiers(state)
        self._slot_owner[state.slot] = None
        heapq.heappush(self._free_slots, state.slot)

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
        return self._workers_of(self._holders.mask(block_hash))

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
        ops: list[int] = []
        runs: list[Sequence[int]] = []
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
                # Lower tiers live in their own maps: order against the G1 ops is irrelevant.
                self._tier_event(state, event)  # type: ignore[arg-type]
            elif kind is BlockStored:
                hashes = event.block_hashes  # type: ignore[union-attr]
                ops.append(len(hashes))
                runs.append(hashes)
            elif kind is BlockRemoved:
                hashes = event.block_hashes  # type: ignore[union-attr]
                ops.append(~len(hashes))
                runs.append(hashes)
            elif kind is AllBlocksCleared:
                ops.append(CLEAR)
        if ops:
            # The events up to a gap go to the table in one call (one C call when native).
            state.num_blocks += self._holders.apply(state.slot, ops, runs)
        state.last_event_id = last
        self.events_applied += last - first  # ids are contiguous
        return not state.resync

    def _store(self, state: _WorkerState, hashes: Sequence[int]) -> None:
        state.num_blocks += self._holders.apply(state.slot, (len(hashes),), (hashes,))

    def _drop_all(self, state: _WorkerState) -> None:
        """Remove the worker from every entry: a scan of the whole table, paid only on
        AllBlocksCleared, worker removal and snapshots, so that the hot path keeps no
        per-worker set."""
        if state.num_blocks:
            state.num_blocks += self._holders.apply(state.slot, (CLEAR,), ())

    # ------------------------------------------------------------------ lower tiers

    def _tier_event(self, state: _WorkerState, event: BlockStored | BlockRemoved) -> None:
        if isinstance(event, BlockStored):
            self._tier_store(event.tier, state, event.block_hashes)
            return
        holders = self._tiers.get(event.tier)
        if holders is None:
            return
        keep = ~(1 << state.slot)
        for h in event.block_hashes:
            rest = holders.get(h, 0) & keep
            if rest:
                holders[h] = rest
            else:
                holders.pop(h, None)

    def _tier_store(self, tier: str, state: _WorkerState, hashes: Sequence[int]) -> None:
        holders = self._tiers.setdefault(tier, {})
        bit = 1 << state.slot
        for h in hashes:
            holders[h] = holders.get(h, 0) | bit

    def _drop_tiers(self, state: _WorkerState) -> None:
        bit = 1 << state.slot
        keep = ~bit
        for holders in self._tiers.values():
            for h in [h for h, m in holders.items() if m & bit]:
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
            bit = 1 << state.slot
            n, cost = 0, 0.0
            for h in hashes[start.get(worker, 0) :]:
                price = next((c for holders, c in tiers if holders.get(h, 0) & bit), None)
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
        extra: Callable[[int], int] | None = None
        if overlay:
            get = overlay.get

            def extra(h: int) -> int:
                return get(h, 0)

        matches: dict[str, int] = {}
        owner = self._slot_owner
        for depth, mask in self._holders.walk(hashes, extra):
            while mask:
                low = mask & -mask
                worker = owner[low.bit_length() - 1]
                if worker is not None:
                    matches[worker] = depth
                mask ^= low
        return matches

    def match_rows(self, hashes: Sequence[int], overlay: Mapping[int, int] | None = None) -> Walk:
        """`find_matches` as (depth, mask of the `worker_bit`s matching exactly that many
        leading blocks) rows, depths increasing: per prompt, not per worker, so its cost does
        not grow with the number of matching workers. Bits of removed workers may remain."""
        if not hashes:
            return []
        extra: Callable[[int], int] | None = None
        if overlay:
            get = overlay.get

            def extra(h: int) -> int:
                return get(h, 0)

        return list(self._holders.walk(hashes, extra))

    @property
    def has_lower_tiers(self) -> bool:
        """Some worker holds blocks in a tier below G1."""
        return any(self._tiers.values())

    def workers_of(self, mask: int) -> set[str]:
        """The workers whose `worker_bit`s are in `mask`."""
        owner = self._slot_owner
        out: set[str] = set()
        while mask:
            low = mask & -mask
            worker = owner[low.bit_length() - 1]
            if worker is not None:
                out.add(worker)
            mask ^= low
        return out

    def worker_of_bit(self, bit: int) -> str | None:
        return self._slot_owner[bit.bit_length() - 1]

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
            self._holders.reserve(slot)
            state = self._workers[worker_id] = _WorkerState(
                slot=slot,
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
