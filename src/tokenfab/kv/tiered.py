"""The tiers below G1 as one store, with the coalesced read path.

`TieredKVStore` holds up to three tiers: G2 host shared memory (`HostKVStore`), G3 local disk
(`DiskKVStore`) and G4 remote (`RemoteKVStore`). Writes go to G2 at once (a memcpy) and to G3
and G4 on a writer thread (until written, readers find the blocks in a pending map). Reads
(`load`) take the longest prefix present in any tier:

- blocks another thread is already reading are not read twice: the first reader owns a future
  per block, later readers wait for it (de-duplication of concurrent reads);
- the rest are read from the cheapest tier holding them: G2 row by row (memcpy), G3 in
  coalesced runs with several reads in flight, G4 concurrently;
- blocks found in G3 or G4 are written into G2 (read-through host cache);
- every tier verifies each block's checksum, so a corrupt block is a miss (dropped there),
  and the prefix stops at it: the engine recomputes from that block on.

`drain_changes()` reports what entered and left each tier, for KV events with a tier.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

Tier = Literal["host", "disk", "remote"]
TIERS: tuple[Tier, ...] = ("host", "disk", "remote")
_U64 = (1 << 64) - 1


class BlockTier(Protocol):
    block_bytes: int

    def __contains__(self, block_hash: int) -> bool: ...
    def hashes(self) -> list[int]: ...
    def put_many(self, hashes: Sequence[int], blocks: np.ndarray) -> list[int]: ...
    def read_into(self, hashes: Sequence[int], out: np.ndarray) -> list[bool]: ...
    def close(self) -> None: ...


@dataclass(slots=True)
class TierChange:
    tier: Tier
    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)


@dataclass(slots=True)
class LoadResult:
    data: np.ndarray
    """[k, block_bytes] uint8: the blocks of the loaded prefix, in order."""
    tiers: list[Tier]
    """Where each block came from."""

    @property
    def num_blocks(self) -> int:
        return len(self.tiers)


@dataclass(slots=True)
class TierStats:
    loads: int = 0
    blocks_loaded: dict[str, int] = field(default_factory=dict)
    blocks_stored: int = 0
    blocks_rejected: int = 0
    """Blocks a tier listed but failed to serve (corrupt, truncated or gone): recomputed."""
    deduplicated: int = 0
    """Block reads served by another thread's read of the same block."""


class TieredKVStore:
    def __init__(
        self,
        block_bytes: int,
        host: BlockTier | None = None,
        disk: BlockTier | None = None,
        remote: BlockTier | None = None,
    ) -> None:
        self.block_bytes = block_bytes
        self.host = host
        self.disk = disk
        self.remote = remote
        for t in (host, disk, remote):
            if t is not None and t.block_bytes != block_bytes:
                raise ValueError(f"tier block size {t.block_bytes} != {block_bytes}")
        self.stats = TierStats()
        self._lock = threading.Lock()
        self._inflight: dict[int, Future[np.ndarray | None]] = {}
        self._pending: dict[int, np.ndarray] = {}
        self._changes: list[TierChange] = []
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tokenfab-kv-writer")
        self._writes: list[Future[None]] = []

    def tiers(self) -> list[tuple[Tier, BlockTier]]:
        pairs: list[tuple[Tier, BlockTier | None]] = [
            ("host", self.host),
            ("disk", self.disk),
            ("remote", self.remote),
        ]
        return [(name, t) for name, t in pairs if t is not None]

    # ------------------------------------------------------------------ lookups

    def tier_of(self, block_hash: int) -> Tier | None:
        h = block_hash & _U64
        for name, t in self.tiers():
            if h in t:
                return name
        return "disk" if h in self._pending else None

    def leading(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` some tier holds (a hint: a later load may still
        fail on a block that turns out corrupt or was evicted meanwhile)."""
        tiers = [t for _, t in self.tiers()]
        pending = self._pending
        n = 0
        for h in hashes:
            h &= _U64
            if h not in pending and not any(h in t for t in tiers):
                break
            n += 1
        return n

    def known(self) -> list[tuple[Tier, list[int]]]:
        """Every block of every tier (the lower-tier part of a KV snapshot)."""
        return [(name, t.hashes()) for name, t in self.tiers()]

    # ------------------------------------------------------------------ writes

    def store(self, hashes: Sequence[int], blocks: np.ndarray) -> None:
        """Keep these blocks ([n, block_bytes] uint8, copied before returning)."""
        if not len(hashes):
            return
        blocks = np.array(blocks, dtype=np.uint8, copy=True).reshape(len(hashes), -1)
        self.stats.blocks_stored += len(hashes)
        if self.host is not None:
            self._put("host", self.host, hashes, blocks)
        if self.disk is None and self.remote is None:
            return
        with self._lock:
            for i, h in enumerate(hashes):
                self._pending[h & _U64] = blocks[i]
            self._writes = [f for f in self._writes if not f.done()]
            self._writes.append(self._writer.submit(self._write_lower, list(hashes), blocks))

    def _write_lower(self, hashes: list[int], blocks: np.ndarray) -> None:
        try:
            if self.disk is not None:
                self._put("disk", self.disk, hashes, blocks)
            if self.remote is not None:
                self._put("remote", self.remote, hashes, blocks)
        finally:
            with self._lock:
                for h in hashes:
                    self._pending.pop(h & _U64, None)

    def _put(self, name: Tier, tier: BlockTier, hashes: Sequence[int], blocks: np.ndarray) -> None:
        new = [h & _U64 for h in hashes if (h & _U64) not in tier]
        evicted = tier.put_many(hashes, blocks)
        gone = set(evicted)
        with self._lock:
            self._changes.append(TierChange(name, [h for h in new if h not in gone], list(evicted)))

    def flush(self) -> None:
        """Wait until every stored block is in every tier."""
        with self._lock:
            writes, self._writes = self._writes, []
        for f in writes:
            f.result()

    def drain_changes(self) -> list[TierChange]:
        with self._lock:
            changes, self._changes = self._changes, []
        return changes

    # ------------------------------------------------------------------ reads

    def load(self, hashes: Sequence[int]) -> LoadResult:
        """The longest prefix of `hashes` that some tier serves intact."""
        hashes = [h & _U64 for h in hashes[: self.leading(hashes)]]
        n = len(hashes)
        out = np.empty((n, self.block_bytes), dtype=np.uint8)
        if n == 0:
            return LoadResult(out, [])
        self.stats.loads += 1
        mine: list[int] = []
        theirs: list[tuple[int, Future[np.ndarray | None]]] = []
        with self._lock:
            for i, h in enumerate(hashes):
                fut = self._inflight.get(h)
                if fut is None:
                    self._inflight[h] = Future()
                    mine.append(i)
                else:
                    theirs.append((i, fut))
        source: list[Tier | None] = [None] * n
        try:
            self._read(hashes, mine, out, source)
        finally:
            with self._lock:
                for i in mine:
                    fut = self._inflight.pop(hashes[i])
                    fut.set_result(out[i] if source[i] is not None else None)
        for i, fut in theirs:
            row = fut.result()
            if row is not None:
                out[i] = row
                source[i] = "host"  # read by another thread just now; it is in memory
                self.stats.deduplicated += 1
        k = next((i for i, s in enumerate(source) if s is None), n)
        tiers = [s for s in source[:k] if s is not None]
        for t in tiers:
            self.stats.blocks_loaded[t] = self.stats.blocks_loaded.get(t, 0) + 1
        return LoadResult(out[:k], tiers)

    def _read(
        self, hashes: list[int], rows: list[int], out: np.ndarray, source: list[Tier | None]
    ) -> None:
        """Fill out[rows] from the pending writes, then each tier in cost order."""
        todo = []
        with self._lock:
            for i in rows:
                data = self._pending.get(hashes[i])
                if data is not None:
                    out[i] = data
                    source[i] = "disk"
                else:
                    todo.append(i)
        for name, tier in self.tiers():
            if not todo:
                break
            listed = [i for i in todo if hashes[i] in tier]
            if not listed:
                continue
            view = np.empty((len(listed), self.block_bytes), dtype=np.uint8)
            ok = tier.read_into([hashes[i] for i in listed], view)
            got = [i for i, good in zip(listed, ok, strict=True) if good]
            self.stats.blocks_rejected += len(listed) - len(got)
            if got:
                rows_ok = [k for k, good in enumerate(ok) if good]
                out[got] = view[rows_ok]
                for i in got:
                    source[i] = name
                if name != "host" and self.host is not None:
                    self._put("host", self.host, [hashes[i] for i in got], view[rows_ok])
            done = set(got)
            todo = [i for i in todo if i not in done]

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)
        for _, t in self.tiers():
            t.close()
