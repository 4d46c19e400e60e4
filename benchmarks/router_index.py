"""KV router index: prefix matching latency and KV event ingestion rate at fleet scale.

The index (tokenfab.router.index.KVIndex) holds 1,000,000 distinct block hashes over 64 workers,
laid out like a real fleet's prefix caches: popular shared prefixes (system prompts, few-shot
headers: 512 chains of 64 blocks, each worker holding 24 picked by a Zipf-like popularity), one
long document (480 blocks) cached in full on 8 workers and half of it on 8 more, and unique
conversation tails (8 to 128 blocks) hanging off the shared prefixes until the index holds
1,000,000 distinct hashes. Hashes are random 64-bit ints (what xxh3 gives).

find_matches: an 8,192-token prompt (block size 16: 512 hashes) made of the long document plus
a new 32-block tail: the worst case, a long walk with 16 workers still matching deep into it
and 8 dropping out halfway. Median over 300 calls (goal: under 1 ms).

Ingestion: steady-state traffic as workers publish it, one KVEventBatch per worker step: a few
BlockStored events (one per stored run: mostly single blocks filled by decoding, some prefill
runs of 2 to 32 blocks) and one BlockRemoved evicting as many of the worker's oldest tail
blocks, so the index stays at its size. Events/s and block hashes/s over ~200,000 events
(goal: over 500,000 events/s). The rate is per block hash more than per event, so the text
report adds decode-only traffic (one block per stored run), the events/s ceiling.

    .venv/bin/python benchmarks/router_index.py [--json] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass

from tokenfab.clock import ManualClock
from tokenfab.protocol import BlockRemoved, BlockStored, KVEvent, KVEventBatch, WorkerInfo
from tokenfab.router import Router, RouterConfig
from tokenfab.router.index import FIRST_EVENT_ID, KVIndex

WORKERS = 64
TARGET_BLOCKS = 1_000_000
SHARED_PREFIXES = 512
SHARED_PREFIX_BLOCKS = 64
PREFIXES_PER_WORKER = 24
DOC_BLOCKS = 480
DOC_FULL_WORKERS = 8
DOC_HALF_WORKERS = 8
QUERY_BLOCKS = 512
BLOCK_SIZE = 16
FIND_GOAL_MS = 1.0
EVENTS_GOAL = 500_000
INGEST_EVENTS = 200_000
DECODE_SHARE = 0.8
"""Share of BlockStored events that carry one block (a decoding sequence filled a block)."""


@dataclass(slots=True)
class Fleet:
    router: Router
    index: KVIndex
    query: list[int]
    tails: list[deque[int]]
    """Per worker, its unique tail hashes, oldest first (what steady-state eviction takes)."""
    next_event: list[int]


def _stored(event_id: int, hashes: list[int]) -> BlockStored:
    return BlockStored(
        event_id=event_id, block_hashes=hashes, parent_hash=None, token_ids=[], block_size=16
    )


def build_fleet(rng: random.Random) -> Fleet:
    def chain(n: int) -> list[int]:
        return [rng.getrandbits(64) for _ in range(n)]

    router = Router(RouterConfig(), ManualClock())
    index = router.index
    names = [f"worker-{i:02d}" for i in range(WORKERS)]
    for name in names:
        router.add_worker(name, WorkerInfo(model="m", max_model_len=32768, block_size=BLOCK_SIZE))
    next_event = [FIRST_EVENT_ID] * WORKERS
    runs: list[list[list[int]]] = [[] for _ in range(WORKERS)]
    prefixes = [chain(SHARED_PREFIX_BLOCKS) for _ in range(SHARED_PREFIXES)]
    popularity = [1.0 / (k + 1) for k in range(SHARED_PREFIXES)]
    held: set[int] = set()
    for w in range(WORKERS):
        mine: dict[int, None] = {}
        while len(mine) < PREFIXES_PER_WORKER:
            mine[rng.choices(range(SHARED_PREFIXES), popularity)[0]] = None
        held.update(mine)
        runs[w].extend(prefixes[k] for k in mine)
    doc = chain(DOC_BLOCKS)
    for w in range(DOC_FULL_WORKERS):
        runs[w].append(doc)
    for w in range(DOC_FULL_WORKERS, DOC_FULL_WORKERS + DOC_HALF_WORKERS):
        runs[w].append(doc[: DOC_BLOCKS // 2])

    distinct = len(held) * SHARED_PREFIX_BLOCKS + DOC_BLOCKS
    tails: list[deque[int]] = [deque() for _ in range(WORKERS)]
    w = 0
    while distinct < TARGET_BLOCKS:
        tail = chain(min(rng.randint(8, 128), TARGET_BLOCKS - distinct))
        runs[w].append(tail)
        tails[w].extend(tail)
        distinct += len(tail)
        w = (w + 1) % WORKERS

    for w, name in enumerate(names):
        events: list[KVEvent] = []
        for run in runs[w]:
            events.append(_stored(next_event[w], run))
            next_event[w] += 1
        assert index.apply(KVEventBatch(worker_id=name, events=events))
    assert index.num_blocks == TARGET_BLOCKS, index.num_blocks
    query = doc + chain(QUERY_BLOCKS - DOC_BLOCKS)
    return Fleet(router, index, query, tails, next_event)


def time_find_matches(fleet: Fleet, calls: int = 300) -> float:
    """Median milliseconds per find_matches call on the worst-case query."""
    matches = fleet.index.find_matches(fleet.query)
    assert len(matches) >= DOC_FULL_WORKERS + DOC_HALF_WORKERS
    assert sorted(matches.values())[-DOC_FULL_WORKERS:] == [DOC_BLOCKS] * DOC_FULL_WORKERS
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fleet.index.find_matches(fleet.query)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def time_route(fleet: Fleet, rng: random.Random, calls: int = 200) -> float:
    """Median milliseconds per `Router.route` (kv policy, all 64 workers) on the worst-case
    query with a new tail each time: both index walks, scoring, pending bookkeeping."""
    router = fleet.router
    times = []
    for i in range(calls):
        tail = [rng.getrandbits(64) for _ in range(QUERY_BLOCKS - DOC_BLOCKS)]
        hashes = fleet.query[:DOC_BLOCKS] + tail
        t = time.perf_counter()
        decision = router.route(f"r{i}", hashes, QUERY_BLOCKS * BLOCK_SIZE)
        times.append(time.perf_counter() - t)
        assert decision.overlap_blocks >= DOC_BLOCKS
        router.on_request_finished(f"r{i}")
    return statistics.median(times) * 1e3


def make_traffic(
    fleet: Fleet, rng: random.Random, decode_share: float
) -> tuple[list[KVEventBatch], int, int]:
    """Worker step batches: (batches, number of events, number of block hashes)."""
    batches: list[KVEventBatch] = []
    n_events = n_hashes = 0
    w = 0
    while n_events < INGEST_EVENTS:
        name = f"worker-{w:02d}"
        events: list[KVEvent] = []
        evicted = 0
        for _ in range(rng.randint(4, 12)):
            size = 1 if rng.random() < decode_share else rng.randint(2, 32)
            run = [rng.getrandbits(64) for _ in range(size)]
            events.append(_stored(fleet.next_event[w], run))
            fleet.next_event[w] += 1
            fleet.tails[w].extend(run)
            evicted += size
        oldest = [fleet.tails[w].popleft() for _ in range(evicted)]
        events.append(BlockRemoved(event_id=fleet.next_event[w], block_hashes=oldest))
        fleet.next_event[w] += 1
        batches.append(KVEventBatch(worker_id=name, events=events))
        n_events += len(events)
        n_hashes += 2 * evicted
        w = (w + 1) % WORKERS
    return batches, n_events, n_hashes


def time_ingestion(
    fleet: Fleet, rng: random.Random, decode_share: float = DECODE_SHARE
) -> tuple[float, float, float]:
    """(events/s, block hashes/s, mean hashes per event) applying the traffic."""
    batches, n_events, n_hashes = make_traffic(fleet, rng, decode_share)
    apply = fleet.index.apply
    t = time.perf_counter()
    for batch in batches:
        apply(batch)
    dt = time.perf_counter() - t
    assert fleet.index.num_blocks == TARGET_BLOCKS, fleet.index.num_blocks
    assert not fleet.index.workers_needing_resync()
    return n_events / dt, n_hashes / dt, n_hashes / n_events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    t = time.perf_counter()
    fleet = build_fleet(rng)
    build_s = time.perf_counter() - t
    find_ms = time_find_matches(fleet)
    route_ms = time_route(fleet, rng)
    events_per_s, blocks_per_s, per_event = time_ingestion(fleet, rng)

    if args.json:
        out = {
            "find_matches_ms": round(find_ms, 4),
            "events_per_s": round(events_per_s),
            "blocks_per_s": round(blocks_per_s),
        }
        print(json.dumps(out))
        return
    counts = fleet.index.block_counts().values()
    print(
        f"index: {fleet.index.num_blocks:,} distinct blocks, {sum(counts):,} (worker, block) "
        f"entries over {WORKERS} workers; built in {build_s:.1f} s"
    )
    ok = "yes" if find_ms < FIND_GOAL_MS else "NO"
    print(
        f"find_matches ({QUERY_BLOCKS} hashes, {DOC_BLOCKS}-block prefix on "
        f"{DOC_FULL_WORKERS} workers): {find_ms:.3f} ms median  "
        f"(goal < {FIND_GOAL_MS} ms: {ok})"
    )
    print(f"route (kv policy, {WORKERS} workers, same query, new tail): {route_ms:.3f} ms median")
    ok = "yes" if events_per_s > EVENTS_GOAL else "NO"
    print(
        f"ingestion: {events_per_s:,.0f} events/s, {blocks_per_s:,.0f} block hashes/s "
        f"({per_event:.1f} hashes per event)  (goal > {EVENTS_GOAL:,} events/s: {ok})"
    )
    # The same on decode-only traffic (every stored run one block): the per-event ceiling.
    decode_events, decode_blocks, decode_per_event = time_ingestion(fleet, rng, 1.0)
    print(
        f"ingestion, decode-only traffic: {decode_events:,.0f} events/s, {decode_blocks:,.0f} "
        f"block hashes/s ({decode_per_event:.1f} hashes per event)"
    )


if __name__ == "__main__":
    main()
