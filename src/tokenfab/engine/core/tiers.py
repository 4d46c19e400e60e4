"""The seam between the step loop and the KV tiers below G1 (host, disk, remote).

`EngineCore` stays torch-free and I/O-free: it calls an injected `Offloader` at fixed points
of a step, and the one that moves bytes (`tokenfab.kv.offload.KVOffloader`, which reads and
writes the model runner's KV tensor) is built and handed in by `LLMEngine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tokenfab.engine.core.kv_cache import KVCacheManager, LowerTiers
from tokenfab.engine.core.scheduler import SchedulerOutput
from tokenfab.protocol import KVTier


class TierStore(LowerTiers, Protocol):
    def known(self) -> Sequence[tuple[KVTier, list[int]]]:
        """Every block each tier holds (announced at start, sent in KV snapshots)."""
        ...


@dataclass(slots=True)
class OffloadStats:
    offloaded_blocks: int = 0
    onboarded_blocks: int = 0
    onboard_shortfall_blocks: int = 0
    """Blocks planned for onboarding that did not load and were recomputed."""


class Offloader(Protocol):
    @property
    def store(self) -> TierStore: ...

    @property
    def stats(self) -> OffloadStats: ...

    def before_step(self, sched: SchedulerOutput, kv_cache: KVCacheManager) -> None:
        """Write back the blocks evicted while scheduling, then load the planned onboarding
        (widening a chunk to recompute what failed to load)."""
        ...

    def offload_evicted(self, kv_cache: KVCacheManager) -> None:
        """Write back the blocks evicted since the last call, before they are rewritten."""
        ...

    def after_step(self, kv_cache: KVCacheManager) -> None:
        """Turn what entered or left each tier into KV events (before they are flushed)."""
        ...

    def save_cached(self, kv_cache: KVCacheManager) -> None:
        """Store every block cached in G1 (at shutdown)."""
        ...

    def close(self) -> None: ...
