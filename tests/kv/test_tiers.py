"""The tiers below G1 (tokenfab.kv): round trips bit for bit, capacity and LRU, corruption
detected and never served, a G3 directory kept across a restart, the coalesced read path."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tokenfab.kv.disk import DiskKVStore
from tokenfab.kv.host import HostKVStore
from tokenfab.kv.tiered import TieredKVStore

B = 4096


def blocks(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, B), dtype=np.uint8)


@pytest.fixture
def host(request: pytest.FixtureRequest) -> Iterator[HostKVStore]:
    name = f"test-{os.getpid()}-{abs(hash(request.node.nodeid)) % 10**8}"
    store = HostKVStore(name, B, 8 * B)
    yield store
    store.close()
    store.unlink()


def read(store: HostKVStore | DiskKVStore, hashes: list[int]) -> tuple[np.ndarray, list[bool]]:
    out = np.zeros((len(hashes), B), dtype=np.uint8)
    return out, store.read_into(hashes, out)


# ---------------------------------------------------------------- G2 host


def test_host_round_trip_and_lru(host: HostKVStore) -> None:
    data = blocks(10)
    assert host.put_many(list(range(1, 9)), data[:8]) == []
    out, ok = read(host, [1])  # touch block 1: it becomes the most recently used
    assert ok == [True]
    evicted = host.put_many([9, 10], data[8:])
    assert evicted == [2, 3]  # least recently used first; block 1 was touched
    out, ok = read(host, list(range(1, 11)))
    assert ok == [True, False, False] + [True] * 7
    assert np.array_equal(out[0], data[0]) and np.array_equal(out[9], data[9])
    assert len(host) == 8


def test_host_segment_is_shared_between_attachments(host: HostKVStore) -> None:
    data = blocks(2)
    host.put_many([5, 6], data)
    other = HostKVStore(host.name, B, 8 * B)  # another worker on the host attaches
    try:
        out, ok = read(other, [5, 6])
        assert ok == [True, True] and np.array_equal(out, data)
        other.put_many([7], data[:1])
        assert 7 in host  # the first one sees the second one's write
        with pytest.raises(ValueError, match="another layout"):
            HostKVStore(host.name, B * 2, 8 * B)
    finally:
        other.close()


def test_host_corruption_is_a_miss_and_dropped(host: HostKVStore) -> None:
    host.put_many([1, 2], blocks(2))
    host.corrupt_for_test(2)
    _, ok = read(host, [1, 2])
    assert ok == [True, False]
    assert 2 not in host


# ---------------------------------------------------------------- G3 disk


def test_disk_round_trip_extents_and_restart(tmp_path: Path) -> None:
    data = blocks(12)
    disk = DiskKVStore(tmp_path, B, 100 * B)
    disk.put_many(list(range(100, 106)), data[:6])
    disk.put_many(list(range(106, 112)), data[6:])
    assert len(list(tmp_path.glob("*.kve"))) == 2  # one extent per batch, not one per block
    with pytest.raises(ValueError, match="in use by another engine"):
        DiskKVStore(tmp_path, B, 100 * B)  # one store per directory
    disk.close()
    again = DiskKVStore(tmp_path, B, 100 * B)  # restart: index rebuilt from the extents
    out, ok = read(again, list(range(100, 112)))
    assert all(ok) and np.array_equal(out, data)
    again.close()


def test_disk_capacity_evicts_least_recently_used_extent(tmp_path: Path) -> None:
    data = blocks(12)
    disk = DiskKVStore(tmp_path, B, 3 * (4 * B + 4096))  # room for three 4-block extents
    disk.put_many([1, 2, 3, 4], data[:4])
    disk.put_many([5, 6, 7, 8], data[4:8])
    disk.put_many([9, 10, 11, 12], data[8:])
    read(disk, [1])  # extent 1 becomes the most recently used
    evicted = disk.put_many([13, 14, 15, 16], data[:4])
    assert evicted == [5, 6, 7, 8]
    assert disk.used_bytes <= disk.capacity_bytes
    assert 1 in disk and 5 not in disk and 13 in disk
    disk.close()


def test_disk_corrupt_and_truncated_blocks_are_dropped(tmp_path: Path) -> None:
    data = blocks(4)
    disk = DiskKVStore(tmp_path, B, 100 * B)
    disk.put_many([1, 2, 3, 4], data)
    path = next(tmp_path.glob("*.kve"))
    with open(path, "r+b") as f:  # flip a byte of block 2
        f.seek(os.path.getsize(path) - 3 * B + 17)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    out, ok = read(disk, [1, 2, 3, 4])
    assert ok == [True, False, True, True]
    assert 2 not in disk
    disk.close()
    os.truncate(path, os.path.getsize(path) - B // 2)  # block 4 cut short
    again = DiskKVStore(tmp_path, B, 100 * B)
    assert 4 not in again and 3 in again
    out, ok = read(again, [1, 3, 4])
    assert ok == [True, True, False] and np.array_equal(out[1], data[2])
    again.close()


# ---------------------------------------------------------------- tiers together


def test_tiered_load_reads_through_into_host_and_stops_at_a_bad_block(
    tmp_path: Path, host: HostKVStore
) -> None:
    data = blocks(6)
    disk = DiskKVStore(tmp_path, B, 100 * B)
    store = TieredKVStore(B, host=host, disk=disk)
    hashes = [11, 12, 13, 14, 15, 16]
    disk.put_many(hashes, data)  # only on disk
    assert store.leading(hashes + [99]) == 6
    res = store.load(hashes)
    assert res.tiers == ["disk"] * 6 and np.array_equal(res.data, data)
    assert all(h in host for h in hashes)  # read-through
    res = store.load(hashes)
    assert res.tiers == ["host"] * 6
    host.corrupt_for_test(14)
    disk.drop(14)
    res = store.load(hashes)
    assert res.num_blocks == 3 and np.array_equal(res.data, data[:3])  # never past the bad one
    assert store.stats.blocks_rejected == 1
    changes = store.drain_changes()
    assert any(c.tier == "host" and 11 in c.stored for c in changes)
    store.close()


def test_concurrent_loads_of_one_block_are_read_once(tmp_path: Path) -> None:
    data = blocks(64)
    hashes = list(range(1000, 1064))
    disk = DiskKVStore(tmp_path, B, 1000 * B)
    store = TieredKVStore(B, disk=disk)
    store.store(hashes, data)
    store.flush()
    results: list[np.ndarray] = []
    barrier = threading.Barrier(4)

    def load() -> None:
        barrier.wait()
        results.append(store.load(hashes).data)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and all(np.array_equal(r, data) for r in results)
    # Every block was read from disk once per load or served by another thread's read.
    assert store.stats.blocks_loaded["disk"] + store.stats.deduplicated == 4 * 64
    store.close()


def test_writes_pending_on_the_writer_thread_are_readable(tmp_path: Path) -> None:
    data = blocks(3)
    store = TieredKVStore(B, disk=DiskKVStore(tmp_path, B, 100 * B))
    store.store([1, 2, 3], data)
    res = store.load([1, 2, 3])  # before or after the write lands: either way intact
    assert np.array_equal(res.data, data)
    store.close()


# ---------------------------------------------------------------- G4 remote (real NATS)


def test_remote_round_trip_lru_and_corruption(
    jetstream_url: str, request: pytest.FixtureRequest
) -> None:
    from tokenfab.kv.remote import RemoteKVStore

    bucket = f"kv{abs(hash(request.node.nodeid)) % 10**8}"
    data = blocks(5)
    remote = RemoteKVStore(jetstream_url, B, 4 * B, bucket=bucket)
    try:
        assert remote.put_many([1, 2, 3, 4], data[:4]) == []
        out = np.zeros((4, B), dtype=np.uint8)
        assert remote.read_into([1, 2, 3, 4], out) == [True] * 4
        assert np.array_equal(out, data[:4])
        assert remote.put_many([5], data[4:]) == [1]  # capacity 4: the oldest goes
        # Bytes under the wrong name (or altered) fail the header check: a miss, deleted.
        remote.put_raw_for_test(3, b"\0" * 16 + data[0].tobytes())
        out = np.zeros((3, B), dtype=np.uint8)
        assert remote.read_into([2, 3, 5], out) == [True, False, True]
        assert 3 not in remote
        # Another client (a restarted worker) lists what the bucket holds.
        again = RemoteKVStore(jetstream_url, B, 4 * B, bucket=bucket)
        try:
            assert sorted(again.hashes()) == [2, 4, 5]
        finally:
            again.close()
    finally:
        remote.close()


def test_remote_behind_host_in_the_tiered_store(
    jetstream_url: str, host: HostKVStore, request: pytest.FixtureRequest
) -> None:
    from tokenfab.kv.remote import RemoteKVStore

    bucket = f"kv{abs(hash(request.node.nodeid)) % 10**8}"
    data = blocks(8, seed=3)
    remote = RemoteKVStore(jetstream_url, B, 100 * B, bucket=bucket)
    remote.put_many(list(range(50, 58)), data)
    store = TieredKVStore(B, host=host, remote=remote)
    res = store.load(list(range(50, 58)))
    assert res.tiers == ["remote"] * 8 and np.array_equal(res.data, data)
    assert store.load(list(range(50, 58))).tiers == ["host"] * 8  # read-through
    store.close()
