"""The router's index against real engine KV caches: the events `KVCacheManager` emits (ids from
1, stored runs, coalesced evictions, clears) keep the index equal to each engine's cache."""

from __future__ import annotations

import random

from tokenfab.clock import ManualClock
from tokenfab.engine.core.kv_cache import KVCacheManager
from tokenfab.engine.core.sequence import Sequence
from tokenfab.kv.hashing import block_hashes
from tokenfab.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    KVSnapshot,
    WorkerInfo,
)
from tokenfab.router import Router, RouterConfig

BS = 4
INFO = WorkerInfo(model="m", max_model_len=256, block_size=BS)


class Sink:
    def __init__(self) -> None:
        self.events: list[KVEvent] = []
        self.last_event_id = 0

    def __call__(self, events: list[KVEvent]) -> None:
        self.events.extend(events)
        self.last_event_id = events[-1].event_id

    def take(self) -> list[KVEvent]:
        out, self.events = self.events, []
        return out


def prompts(rng: random.Random) -> list[list[int]]:
    """Prompts sharing a few prefixes, so engines cache, share and evict common blocks."""
    roots = [[rng.randrange(1000) for _ in range(3 * BS)] for _ in range(3)]
    out = []
    for i in range(12):
        tail = [rng.randrange(1000) for _ in range(rng.randrange(1, 4 * BS))]
        out.append(roots[i % 3][: rng.choice([BS, 2 * BS, 3 * BS])] + tail)
    return out


def expected_matches(engines: dict[str, KVCacheManager], hashes: list[int]) -> dict[str, int]:
    out = {}
    for w, kv in engines.items():
        n = 0
        while n < len(hashes) and kv.is_cached(hashes[n]):
            n += 1
        if n:
            out[w] = n
    return out


def test_index_mirrors_engine_caches_and_a_late_router_catches_up() -> None:
    rng = random.Random(11)
    pool = prompts(rng)
    router = Router(RouterConfig(), ManualClock())
    engines: dict[str, KVCacheManager] = {}
    sinks: dict[str, Sink] = {}
    live: dict[str, list[Sequence]] = {}
    for w in ("w0", "w1", "w2"):
        sinks[w] = Sink()
        engines[w] = KVCacheManager(num_blocks=20, block_size=BS, event_sink=sinks[w])
        live[w] = []
        router.add_worker(w, INFO)
    late = Router(RouterConfig(), ManualClock())
    kinds: set[type] = set()

    for step in range(400):
        w = rng.choice(sorted(engines))
        kv = engines[w]
        tokens = rng.choice(pool)
        seq = Sequence(f"{w}-{step}", tokens, block_size=BS)
        prefix = kv.find_cached_prefix(seq)
        if live[w] and (rng.random() < 0.4 or not kv.allocate(seq, seq.num_tokens, prefix)):
            kv.free(live[w].pop(rng.randrange(len(live[w]))))
        else:
            seq.num_computed_tokens = seq.num_tokens
            kv.commit(seq)
            live[w].append(seq)
        if step % 97 == 96:  # an operator resets this engine's prefix cache
            while live[w]:
                kv.free(live[w].pop())
            assert kv.reset_prefix_cache()
        kv.flush_events()
        batch = KVEventBatch(worker_id=w, events=sinks[w].take())
        kinds.update(type(e) for e in batch.events)
        if batch.events:
            assert router.on_kv_events(batch)
            if step >= 200:
                late.on_kv_events(batch)
        if step == 200:
            # The late router joins now: it learns each worker from a snapshot.
            for name, engine in engines.items():
                late.add_worker(name, INFO)
                cached = {h for p in pool for h in block_hashes(p, BS) if engine.is_cached(h)}
                snap = KVSnapshot(
                    worker_id=name,
                    last_event_id=sinks[name].last_event_id,
                    block_hashes=sorted(cached),
                )
                assert late.on_snapshot(snap)
        for p in pool:
            hashes = block_hashes(p, BS)
            assert router.index.find_matches(hashes) == expected_matches(engines, hashes)
            if step >= 200:
                assert late.index.find_matches(hashes) == router.index.find_matches(hashes)

    assert kinds == {BlockStored, BlockRemoved, AllBlocksCleared}
    stats = router.stats()
    assert stats.events_applied > 100 and stats.resyncs == 0 and stats.duplicate_events == 0
    assert router.index.block_counts() == late.index.block_counts()
