"""The kv policy's fast path (scoring only the workers that can win) against the full one
(`scoring.choose` over every worker, `RouterConfig(full_scores=True)`): two routers fed the
same random sequence of workers joining and leaving, KV events in every tier, load reports,
routes (some to a subset of candidates), first tokens, finishes and clock steps must make the
same decision on every route, and so draw the same random numbers."""

from __future__ import annotations

import random

import pytest

from tokenfab.clock import ManualClock
from tokenfab.protocol import BlockRemoved, BlockStored, KVEventBatch, LoadReport, WorkerInfo
from tokenfab.router import Router, RouterConfig
from tokenfab.router import router as router_module

BS = 16
INFO = WorkerInfo(model="m", max_model_len=8192, block_size=BS)
LOWER_TIERS = ("host", "disk", "remote")


class Twin:
    """The same inputs to a fast-path and a full-scoring router."""

    def __init__(self, overlap_weight: float, seed: int) -> None:
        self.clock = ManualClock()
        self.fast = Router(RouterConfig(overlap_weight=overlap_weight, seed=seed), self.clock)
        self.full = Router(
            RouterConfig(overlap_weight=overlap_weight, seed=seed, full_scores=True), self.clock
        )
        self.event_ids: dict[str, int] = {}

    def both(self, method: str, *args: object, **kw: object) -> tuple[object, object]:
        return getattr(self.fast, method)(*args, **kw), getattr(self.full, method)(*args, **kw)

    def add(self, worker: str) -> None:
        self.both("add_worker", worker, INFO)
        self.event_ids[worker] = 1

    def remove(self, worker: str) -> None:
        self.both("remove_worker", worker)
        del self.event_ids[worker]

    def events(self, worker: str, stored: list[list[int]], removed: list[int], tier: str) -> None:
        events: list[BlockStored | BlockRemoved] = []
        for run in stored:
            events.append(
                BlockStored(
                    event_id=self.event_ids[worker],
                    block_hashes=run,
                    parent_hash=None,
                    token_ids=[],
                    block_size=BS,
                    tier=tier,  # type: ignore[arg-type]
                )
            )
            self.event_ids[worker] += 1
        if removed:
            events.append(
                BlockRemoved(event_id=self.event_ids[worker], block_hashes=removed, tier=tier)  # type: ignore[arg-type]
            )
            self.event_ids[worker] += 1
        self.both("on_kv_events", KVEventBatch(worker_id=worker, events=events))


def _drive(
    twin: Twin, rng: random.Random, routes: int, max_workers: int, tiers: bool = False
) -> int:
    """Random inputs until `routes` routes were compared; returns how many had a tie that
    the random draw settled (so the test knows ties were exercised). `tiers`: some events
    store blocks in lower tiers (the router then scores every worker)."""
    prefixes = [[rng.getrandbits(62) for _ in range(rng.randrange(1, 12))] for _ in range(12)]
    for i in range(max_workers // 2):
        twin.add(f"w{i:03d}")
    in_flight: list[str] = []
    compared = draws = 0
    n = 0
    while compared < routes:
        n += 1
        workers = sorted(twin.event_ids)
        op = rng.random()
        if op < 0.35 or not workers:
            if not workers:
                twin.add(f"w{rng.randrange(max_workers):03d}")
                continue
            prefix = rng.choice(prefixes)[: rng.randrange(0, 12)]
            hashes = prefix + [rng.getrandbits(62) for _ in range(rng.randrange(0, 4))]
            tokens = len(hashes) * BS + rng.randrange(0, BS)
            if tokens == 0:
                tokens = 1
            candidates = None
            if rng.random() < 0.15:
                candidates = rng.sample(workers, rng.randrange(1, len(workers) + 1))
                candidates.append("not-a-worker")
            rid = f"r{rng.randrange(routes * 2)}"  # repeats: retries replace pending state
            before = twin.fast._rng.getstate()
            a, b = twin.both("route", rid, hashes, tokens, candidates)
            assert a.worker_id == b.worker_id, (n, a, b)  # type: ignore[attr-defined]
            assert a.overlap_blocks == b.overlap_blocks  # type: ignore[attr-defined]
            assert twin.fast._rng.getstate() == twin.full._rng.getstate()
            draws += before != twin.fast._rng.getstate()
            in_flight.append(rid)
            compared += 1
        elif op < 0.55:
            w = rng.choice(workers)
            stored = [rng.choice(prefixes)[: rng.randrange(1, 12)] for _ in range(rng.randrange(3))]
            cached = [h for p in prefixes for h in p]
            removed = rng.sample(cached, rng.randrange(0, 4))
            tier = rng.choice(LOWER_TIERS) if tiers and rng.random() < 0.3 else "device"
            twin.events(w, stored, removed, tier)
        elif op < 0.75:
            w = rng.choice(workers)
            # Small loads, often equal across workers: many exact ties in cost and load.
            report = LoadReport(
                worker_id=w,
                running=rng.randrange(3),
                waiting=rng.randrange(2),
                kv_blocks_used=rng.choice((0, 0, 4, 8, rng.randrange(40))),
                queued_prefill_tokens=rng.choice((0, 0, BS, 3 * BS, rng.randrange(500))),
                last_event_id=twin.event_ids[w] - 1,
            )
            twin.both("on_load", report)
        elif op < 0.85 and in_flight:
            rid = in_flight.pop(rng.randrange(len(in_flight)))
            twin.both("on_first_token" if rng.random() < 0.5 else "on_request_finished", rid)
        elif op < 0.9:
            twin.clock.advance(rng.choice((0.5, 2.0, 31.0)))
        elif op < 0.95 and len(workers) < max_workers:
            twin.add(f"w{rng.randrange(max_workers):03d}")
        elif len(workers) > 1:
            twin.remove(rng.choice(workers))
        assert twin.fast.workers() == twin.full.workers()
    return draws


@pytest.mark.parametrize(
    ("overlap_weight", "seed"), [(1.0, 0), (1.0, 1), (0.5, 2), (2.0, 3), (0.0, 4), (3.7, 5)]
)
def test_fast_kv_routing_makes_the_full_scoring_decisions(overlap_weight: float, seed: int) -> None:
    twin = Twin(overlap_weight, seed)
    draws = _drive(twin, random.Random(seed), routes=1500, max_workers=40)
    assert draws > 20  # ties settled by the random draw were compared, not only clear wins


def test_fast_kv_routing_at_a_hundred_workers() -> None:
    twin = Twin(1.0, 7)
    assert _drive(twin, random.Random(7), routes=1000, max_workers=200) > 20


@pytest.mark.parametrize("small_class", [0, 1_000_000])
def test_every_depth_class_estimated_one_way(
    small_class: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each depth class alone through each path: all found walking the load order (0), or
    all estimated member by member."""
    monkeypatch.setattr(router_module, "_SMALL_CLASS", small_class)
    twin = Twin(1.0, 11)
    assert _drive(twin, random.Random(11), routes=800, max_workers=60) > 20


def test_lower_tiers_fall_back_to_scoring_every_worker() -> None:
    twin = Twin(1.0, 8)
    assert _drive(twin, random.Random(8), routes=500, max_workers=20, tiers=True) > 5
    assert twin.fast.index.has_lower_tiers


def test_load_order_follows_every_load_change() -> None:
    """The load-sorted list the fast path walks holds each worker once, in cost order."""
    twin = Twin(1.0, 9)
    _drive(twin, random.Random(9), routes=300, max_workers=30)
    router = twin.fast
    keys = router._by_load
    assert keys == sorted(keys)
    assert sorted(k[3] for k in keys) == router.workers()
    for key in keys:
        load = router.worker_load(key[3])
        assert key[1:3] == (load.num_requests, load.active_blocks)
        assert key[0] == load.queued_prefill_tokens / BS + load.active_blocks
