"""The index's two tables (C and dict) agree on every operation, driven by the same random
event streams, including more than 64 workers (the native rows widen) and deletions that shift
rows back."""

from __future__ import annotations

import random

import pytest

from tokenfab.router.holders import CLEAR, DictHolders, NativeHolders, _library
from tokenfab.router.index import KVIndex

pytestmark = pytest.mark.skipif(_library() is None, reason="no C compiler")


def _native() -> NativeHolders:
    lib = _library()
    assert lib is not None
    return NativeHolders(lib)


def _random_ops(
    rng: random.Random, pool: list[int], held: set[int]
) -> tuple[list[int], list[list[int]]]:
    ops: list[int] = []
    runs: list[list[int]] = []
    for _ in range(rng.randint(1, 6)):
        roll = rng.random()
        if roll < 0.02:
            ops.append(CLEAR)
            held.clear()
        elif roll < 0.6:
            run = rng.sample(pool, rng.randint(0, 12))
            ops.append(len(run))
            runs.append(run)
            held.update(run)
        else:
            # Removes of held and never-held hashes (the latter must be ignored).
            run = rng.sample(sorted(held), min(len(held), rng.randint(0, 8)))
            run += rng.sample(pool, 2)
            ops.append(~len(run))
            runs.append(run)
            held.difference_update(run)
    return ops, runs


@pytest.mark.parametrize("workers", [3, 70, 200])
def test_native_table_matches_dict_table(workers: int) -> None:
    rng = random.Random(workers)
    # Small hash values collide in the low bits: the native table must mix them.
    pool = [rng.getrandbits(64) for _ in range(3000)] + list(range(500))
    native, reference = _native(), DictHolders()
    held: list[set[int]] = [set() for _ in range(workers)]
    for step in range(4000):
        slot = rng.randrange(workers)
        native.reserve(slot)
        ops, runs = _random_ops(rng, pool, held[slot])
        assert native.apply(slot, ops, runs) == reference.apply(slot, ops, runs), step
    assert len(native) == len(reference)
    for h in pool:
        assert native.mask(h) == reference.mask(h)
    for _ in range(200):
        query = rng.sample(pool, rng.randint(1, 40))
        extra = {h: 1 << rng.randrange(workers) for h in rng.sample(query, len(query) // 3)}
        overlay = (lambda h, extra=extra: extra.get(h, 0)) if extra else None
        assert native.walk(query, overlay) == reference.walk(query, overlay)


def test_walk_reports_depths_of_dropouts() -> None:
    for table in (_native(), DictHolders()):
        table.apply(0, [4], [[10, 11, 12, 13]])
        table.apply(1, [2], [[10, 11]])
        # Worker 1 holds 2 leading blocks, worker 0 all 4; the overlay adds worker 2 at depth 1.
        assert table.walk([10, 11, 12, 13], None) == [(2, 0b10), (4, 0b01)]
        assert table.walk([99, 10], None) == []
        assert table.walk([10, 11], lambda h: 0b100 if h == 10 else 0) == [(1, 0b100), (2, 0b11)]


def test_index_on_dict_table_finds_the_same_matches() -> None:
    from tokenfab.protocol import BlockStored, KVEventBatch

    results = []
    for holders in (_native(), DictHolders()):
        index = KVIndex(holders=holders)
        for w, hashes in enumerate([[1, 2, 3], [1, 2], [7]]):
            event = BlockStored(
                event_id=1, block_hashes=hashes, parent_hash=None, token_ids=[], block_size=16
            )
            assert index.apply(KVEventBatch(worker_id=f"w{w}", events=[event]))
        results.append(index.find_matches([1, 2, 3, 4]))
        assert index.num_blocks == 4
    assert results[0] == results[1] == {"w0": 3, "w1": 2}
