from __future__ import annotations

import random

from tokenfab.kv.hashing import block_hashes
from tokenfab.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    KVSnapshot,
)
from tokenfab.router.index import FIRST_EVENT_ID, KVIndex

BS = 4


def stored(event_id: int, hashes: list[int], parent: int | None = None) -> BlockStored:
    return BlockStored(
        event_id=event_id, block_hashes=hashes, parent_hash=parent, token_ids=[], block_size=BS
    )


def removed(event_id: int, hashes: list[int]) -> BlockRemoved:
    return BlockRemoved(event_id=event_id, block_hashes=hashes)


def batch(worker: str, *events: KVEvent) -> KVEventBatch:
    return KVEventBatch(worker_id=worker, events=list(events))


# Two prompts sharing their first two blocks, then diverging.
TOKENS_A = list(range(24))
TOKENS_B = list(range(8)) + [100 + t for t in range(16)]
HA = block_hashes(TOKENS_A, BS)
HB = block_hashes(TOKENS_B, BS)


def test_shared_prefix_hashes_fixture() -> None:
    assert len(HA) == len(HB) == 6
    assert HA[:2] == HB[:2] and HA[2] != HB[2]


def test_find_matches_prefix_partial_divergent_per_worker() -> None:
    idx = KVIndex()
    assert idx.apply(batch("w0", stored(1, HA)))  # all of A
    assert idx.apply(batch("w1", stored(1, HA[:3])))  # first 3 blocks of A
    assert idx.apply(batch("w2", stored(1, HB)))  # B: shares 2 blocks with A

    assert idx.find_matches(HA) == {"w0": 6, "w1": 3, "w2": 2}
    assert idx.find_matches(HB) == {"w0": 2, "w1": 2, "w2": 6}
    assert idx.find_matches(HA[:1]) == {"w0": 1, "w1": 1, "w2": 1}
    # A prompt that diverges in its first block matches nothing.
    assert idx.find_matches(block_hashes([9] * 8, BS)) == {}
    assert idx.find_matches([]) == {}
    assert idx.num_blocks == 6 + 4  # A's six, plus B's four unshared
    assert idx.block_counts() == {"w0": 6, "w1": 3, "w2": 6}
    assert idx.holders(HA[0]) == ["w0", "w1", "w2"]


def test_a_hole_in_the_chain_ends_the_match() -> None:
    idx = KVIndex()
    idx.apply(batch("w0", stored(1, HA), removed(2, [HA[2]])))
    # Blocks 3.. are still cached, but without block 2 the prefix stops at 2.
    assert idx.find_matches(HA) == {"w0": 2}


def test_overlay_adds_holders() -> None:
    idx = KVIndex()
    idx.apply(batch("w0", stored(1, HA[:2])))
    bit1 = idx.worker_bit("w1")
    overlay = {h: bit1 for h in HA}
    overlay[HA[2]] |= idx.worker_bit("w0")
    assert idx.find_matches(HA, overlay) == {"w0": 3, "w1": 6}
    assert idx.find_matches(HA) == {"w0": 2}


def test_removed_blocks_and_worker_removal() -> None:
    idx = KVIndex()
    idx.apply(batch("w0", stored(1, HA)))
    idx.apply(batch("w1", stored(1, HA)))
    idx.apply(batch("w0", removed(2, HA[4:])))
    assert idx.find_matches(HA) == {"w0": 4, "w1": 6}
    idx.remove_worker("w1")
    assert idx.find_matches(HA) == {"w0": 4}
    assert idx.num_blocks == 4
    assert idx.workers() == ["w0"]
    idx.remove_worker("w1")  # idempotent
    idx.remove_worker("w0")
    assert idx.num_blocks == 0 and idx.find_matches(HA) == {}


def test_freed_slots_are_reused_without_stale_bits() -> None:
    idx = KVIndex()
    idx.apply(batch("w0", stored(1, HA)))
    bit = idx.worker_bit("w0")
    idx.remove_worker("w0")
    idx.apply(batch("w9", stored(1, HB[:1])))
    assert idx.worker_bit("w9") == bit
    # w9 took w0's slot but none of w0's blocks.
    assert idx.find_matches(HA) == {"w9": 1}


def test_removing_unknown_hashes_is_harmless() -> None:
    idx = KVIndex()
    idx.apply(batch("w0", stored(1, HA[:2])))
    idx.apply(batch("w1", stored(1, HA[:2])))
    assert idx.apply(batch("w0", removed(2, [12345, HB[5]])))
    assert idx.find_matches(HA) == {"w0": 2, "w1": 2}
    assert idx.num_worker_blocks("w0") == 2


def test_all_blocks_cleared_drops_only_that_worker() -> None:
    idx = KVIndex()
    idx.apply(batch("w0", stored(1, HA)))
    idx.apply(batch("w1", stored(1, HA[:2])))
    assert idx.apply(batch("w0", AllBlocksCleared(event_id=2), stored(3, HB[:1])))
    assert idx.find_matches(HA) == {"w0": 1, "w1": 2}
    assert idx.num_worker_blocks("w0") == 1
    assert idx.num_blocks == 2


def test_duplicate_events_are_skipped() -> None:
    idx = KVIndex()
    idx.apply(batch("w0", stored(1, HA[:2]), removed(2, HA[:2])))
    # A redelivered batch must not bring the removed blocks back.
    assert idx.apply(batch("w0", stored(1, HA[:2]), removed(2, HA[:2]), stored(3, HB[:1])))
    assert idx.find_matches(HB) == {"w0": 1}
    assert idx.duplicate_events == 2
    assert idx.events_applied == 3
    assert idx.last_event_id("w0") == 3


def test_gap_marks_resync_and_buffers_until_snapshot() -> None:
    idx = KVIndex()
    assert idx.apply(batch("w0", stored(1, HA[:2])))
    # Event 2 was lost: 3 and 4 must not be applied on top of an incomplete state.
    assert not idx.apply(batch("w0", stored(3, HA[2:4]), stored(4, HA[4:])))
    assert idx.needs_resync("w0") and idx.workers_needing_resync() == ["w0"]
    assert idx.find_matches(HA) == {"w0": 2}
    assert idx.last_event_id("w0") == 1
    # While waiting, later events are buffered too.
    assert not idx.apply(batch("w0", removed(5, HA[5:])))
    # The snapshot covers events up to 3 (2 stored HB's first block, say).
    assert idx.load_snapshot(KVSnapshot(worker_id="w0", last_event_id=3, block_hashes=HA[:4]))
    # Buffered 4 and 5 replay on top: 3 is already in the snapshot.
    assert not idx.needs_resync("w0")
    assert idx.find_matches(HA) == {"w0": 5}
    assert idx.last_event_id("w0") == 5
    assert idx.gaps == 1 and idx.snapshots_loaded == 1
    assert idx.apply(batch("w0", stored(6, HB)))


def test_snapshot_older_than_buffered_events_leaves_a_gap() -> None:
    idx = KVIndex()
    idx.apply(batch("w0", stored(1, HA[:1])))
    idx.apply(batch("w0", stored(5, HA[1:2])))  # 2..4 lost
    # A snapshot at 3 still misses 4: apply it, but stay out of sync.
    assert not idx.load_snapshot(KVSnapshot(worker_id="w0", last_event_id=3, block_hashes=HA[:1]))
    assert idx.needs_resync("w0")
    assert idx.find_matches(HA) == {"w0": 1}
    assert idx.load_snapshot(KVSnapshot(worker_id="w0", last_event_id=4, block_hashes=HA[:1]))
    assert idx.find_matches(HA) == {"w0": 2}


def test_stale_snapshot_of_an_in_sync_worker_is_ignored() -> None:
    idx = KVIndex()
    idx.apply(batch("w0", stored(1, HA[:1]), stored(2, HA[1:3])))
    assert idx.load_snapshot(KVSnapshot(worker_id="w0", last_event_id=1, block_hashes=HA[:1]))
    assert idx.find_matches(HA) == {"w0": 3} and idx.last_event_id("w0") == 2
    assert idx.snapshots_loaded == 0


def test_snapshot_replaces_the_workers_blocks() -> None:
    idx = KVIndex()
    idx.apply(batch("w0", stored(1, HA)))
    idx.apply(batch("w1", stored(1, HA)))
    idx.mark_resync("w0")
    assert idx.load_snapshot(KVSnapshot(worker_id="w0", last_event_id=7, block_hashes=HB[:3]))
    assert idx.find_matches(HA) == {"w0": 2, "w1": 6}
    assert idx.find_matches(HB) == {"w0": 3, "w1": 2}
    assert idx.num_worker_blocks("w0") == 3
    assert idx.last_event_id("w0") == 7


def test_unseen_worker_must_start_at_the_first_event_id() -> None:
    idx = KVIndex()
    assert idx.last_event_id("new") == FIRST_EVENT_ID - 1
    # A router that joins late sees a worker mid-stream: it needs a snapshot first.
    assert not idx.apply(batch("late", stored(40, HA[:1])))
    assert idx.needs_resync("late") and idx.find_matches(HA) == {}
    assert idx.load_snapshot(KVSnapshot(worker_id="late", last_event_id=39, block_hashes=[]))
    assert idx.find_matches(HA) == {"late": 1}


def test_first_event_id_is_configurable() -> None:
    idx = KVIndex(first_event_id=0)
    assert idx.apply(batch("w0", stored(0, HA[:1])))
    assert not KVIndex(first_event_id=0).apply(batch("w0", stored(1, HA[:1])))


def test_resync_buffer_is_bounded() -> None:
    idx = KVIndex(resync_buffer=2)
    idx.apply(batch("w0", stored(1, HA[:1])))
    idx.apply(batch("w0", stored(3, HA[1:2]), stored(4, HA[2:3]), stored(5, HA[3:4])))
    # Event 3 fell out of the buffer: a snapshot at 2 cannot be completed.
    assert not idx.load_snapshot(KVSnapshot(worker_id="w0", last_event_id=2, block_hashes=HA[:1]))
    assert idx.needs_resync("w0")


def test_random_event_streams_match_a_reference_model() -> None:
    """Short and long runs, shared and unshared hashes, duplicates inside a run, clears and
    worker removals: the index agrees with a plain dict-of-sets model."""
    rng = random.Random(5)
    pool = [rng.getrandbits(64) for _ in range(60)]
    idx = KVIndex()
    model: dict[str, set[int]] = {}
    next_id: dict[str, int] = {}
    for _ in range(600):
        w = f"w{rng.randrange(5)}"
        eid = next_id.get(w, FIRST_EVENT_ID)
        op = rng.random()
        if op < 0.02:
            idx.remove_worker(w)
            model.pop(w, None)
            next_id.pop(w, None)
            continue
        hashes = [rng.choice(pool) for _ in range(rng.choice([1, 2, 3, 5, 9]))]
        held = model.setdefault(w, set())
        event: KVEvent
        if op < 0.06:
            event = AllBlocksCleared(event_id=eid)
            held.clear()
        elif op < 0.55:
            event = stored(eid, hashes)
            held.update(hashes)
        else:
            event = removed(eid, hashes)
            held.difference_update(hashes)
        assert idx.apply(batch(w, event))
        next_id[w] = eid + 1
        assert idx.block_counts() == {k: len(v) for k, v in sorted(model.items())}
        assert idx.num_blocks == len(set().union(*model.values()))
        probe = rng.choice(pool)
        assert idx.holders(probe) == sorted(k for k, v in model.items() if probe in v)
        assert idx.find_matches([probe]) == {k: 1 for k, v in model.items() if probe in v}


def test_lower_tier_events_are_kept_apart_from_g1_and_priced() -> None:
    from tokenfab.protocol import BlockRemoved, BlockStored, KVEventBatch, KVSnapshot

    idx = KVIndex()
    stored = BlockStored(event_id=1, block_hashes=[1, 2], parent_hash=None, token_ids=[],
                         block_size=16)  # fmt: skip
    host = BlockStored(event_id=2, block_hashes=[3, 4], parent_hash=None, token_ids=[],
                       block_size=16, tier="host")  # fmt: skip
    disk = BlockStored(event_id=3, block_hashes=[4, 5], parent_hash=None, token_ids=[],
                       block_size=16, tier="disk")  # fmt: skip
    idx.apply(KVEventBatch(worker_id="w", events=[stored, host, disk]))
    assert idx.find_matches([1, 2, 3, 4, 5, 6]) == {"w": 2}  # lower tiers are not G1 hits
    cost = {"host": 0.1, "disk": 0.25}
    assert idx.find_lower_matches([1, 2, 3, 4, 5, 6], {"w": 2}, cost) == {"w": (3, 0.45)}
    gone = BlockRemoved(event_id=4, block_hashes=[3], tier="host")
    idx.apply(KVEventBatch(worker_id="w", events=[gone]))
    assert idx.find_matches([1, 2]) == {"w": 2}  # a host removal leaves G1 alone
    assert idx.find_lower_matches([1, 2, 3, 4], {"w": 2}, cost) == {}
    idx.mark_resync("w")
    idx.load_snapshot(
        KVSnapshot(worker_id="w", last_event_id=9, block_hashes=[1], tier_hashes={"disk": [2]})
    )
    assert idx.find_lower_matches([1, 2], {"w": 1}, cost) == {"w": (1, 0.25)}
    idx.remove_worker("w")
    assert idx.find_lower_matches([2], {}, cost) == {}
