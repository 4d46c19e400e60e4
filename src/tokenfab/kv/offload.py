"""The engine's edge to the tiers below G1: it moves bytes; the KV cache manager and the
scheduler (pure) decide which blocks.

Each step, between scheduling and running the model:

1. offload (write-back): blocks the KV cache manager evicted while scheduling still hold their
   K/V (nothing ran yet); those admitted (prefix hits since cached >= `min_reuse`) are copied
   out and stored in the tiers;
2. onboard: for each admitted request the scheduler found a prefix continuing in the tiers
   (`SchedulerOutput.onboard`), the blocks are loaded into the fresh G1 blocks it allocated.
   If fewer load than planned (corrupt, evicted meanwhile), the request's chunk is widened to
   start at the first missing block, which is then recomputed.

After the step, what entered or left each tier becomes KV events with that tier.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from tokenfab.engine.core.tiers import OffloadStats
from tokenfab.kv.tiered import TieredKVStore

if TYPE_CHECKING:
    from tokenfab.config import EngineConfig
    from tokenfab.engine.core.kv_cache import KVCacheManager
    from tokenfab.engine.core.scheduler import SchedulerOutput
    from tokenfab.engine.kv_io import KVBlockIO


class KVOffloader:
    def __init__(self, store: TieredKVStore, io: KVBlockIO, min_reuse: int = 0) -> None:
        self.store = store
        self.io = io
        """The runner's KV pool as bytes (the same block layout disaggregated serving moves)."""
        self.min_reuse = min_reuse
        self.stats = OffloadStats()

    def before_step(self, sched: SchedulerOutput, kv_cache: KVCacheManager) -> None:
        # Must precede onboarding: an evicted block may be an onboarding destination.
        self.offload_evicted(kv_cache)
        for ob in sched.onboard:
            result = self.store.load(ob.block_hashes)
            k = result.num_blocks
            if k:
                self.io.write(ob.block_ids[:k], np.ascontiguousarray(result.data).reshape(-1))
                self.stats.onboarded_blocks += k
            if k < len(ob.block_hashes):
                self.stats.onboard_shortfall_blocks += len(ob.block_hashes) - k
                _recompute_from(sched, ob.chunk_index, (ob.first_block + k) * kv_cache.block_size)

    def offload_evicted(self, kv_cache: KVCacheManager) -> None:
        """Store the admitted blocks evicted since the last call; before anything rewrites
        them (a step, or blocks imported from another worker into reserved ones)."""
        evicted = [e for e in kv_cache.take_evicted() if e.hits >= self.min_reuse]
        if evicted:
            data = self._export([e.block_id for e in evicted])
            self.store.store([e.block_hash for e in evicted], data)
            self.stats.offloaded_blocks += len(evicted)

    def after_step(self, kv_cache: KVCacheManager) -> None:
        """Announce tier changes as KV events (before the step's events are flushed)."""
        for change in self.store.drain_changes():
            kv_cache.emit_tier_events(change.tier, change.stored, change.removed)

    def save_cached(self, kv_cache: KVCacheManager) -> None:
        """Store every block cached in G1 (at shutdown: a restart with the same G3 directory
        then starts with the whole cache, not only what was evicted)."""
        blocks = [(h, b) for h, b in kv_cache.cached_blocks() if self.store.tier_of(h) is None]
        if blocks:
            data = self._export([b for _, b in blocks])
            self.store.store([h for h, _ in blocks], data)
            self.stats.offloaded_blocks += len(blocks)

    def close(self) -> None:
        self.store.close()

    def _export(self, block_ids: list[int]) -> np.ndarray:
        """[n, block_bytes] uint8 copies of the blocks."""
        raw = self.io.read(block_ids)
        return np.frombuffer(raw, dtype=np.uint8).reshape(len(block_ids), self.io.block_bytes)


def _recompute_from(sched: SchedulerOutput, chunk_index: int, start: int) -> None:
    """Widen a request's chunk to start at position `start` (its blocks are allocated)."""
    chunk = sched.batch.chunks[chunk_index]
    s = sched.scheduled[chunk_index]
    extra = chunk.start_pos - start
    if extra <= 0:
        return
    end = chunk.start_pos + len(chunk.token_ids)
    chunk.token_ids = s.seq.token_ids[start:end]
    chunk.start_pos = start
    s.num_new_tokens += extra
    s.seq.num_computed_tokens = start
    sched.num_batched_tokens += extra


def build_offloader(config: EngineConfig, runner: object) -> KVOffloader | None:
    """The offloader `config` asks for (None when it names no tier below G1)."""
    from tokenfab.engine.kv_io import KVBlockIO
    from tokenfab.engine.torch_runner import TorchRunner

    if not (config.kv_host_gb > 0 or config.kv_disk_dir or config.kv_remote_url):
        return None
    if not isinstance(runner, TorchRunner):
        raise ValueError("KV tiers need the torch runner (its KV tensor holds the bytes)")
    io = KVBlockIO(runner.model_runner.kv)
    nbytes = io.block_bytes
    gib = 1 << 30
    host = disk = remote = None
    if config.kv_host_gb > 0:
        from tokenfab.kv.host import HostKVStore

        name = config.kv_host_name or f"engine-{os.getpid()}-{id(runner):x}"
        host = HostKVStore(name, nbytes, int(config.kv_host_gb * gib))
        if config.kv_host_name is None:
            host.unlink()  # private: the mapping lives on until closed, the name goes now
    if config.kv_disk_dir:
        from tokenfab.kv.disk import DiskKVStore

        disk = DiskKVStore(config.kv_disk_dir, nbytes, int(config.kv_disk_gb * gib))
    if config.kv_remote_url:
        from tokenfab.kv.remote import RemoteKVStore

        remote = RemoteKVStore(
            config.kv_remote_url, nbytes, int(config.kv_remote_gb * gib), config.kv_remote_bucket
        )
    store = TieredKVStore(nbytes, host, disk, remote)
    return KVOffloader(store, io, config.kv_offload_min_reuse)
