"""G2: KV blocks in host shared memory, one segment shared by every worker of a host.

The segment is a file under /dev/shm (mmap'd by each process): a small header, a slot table
(per slot: valid flag, block hash, checksum, LRU stamp) and `num_slots` fixed-size data slots.
Writers take an flock on the segment, so the table stays consistent between processes; readers
take no lock: they copy a slot out and verify its checksum (seeded by the hash they asked for),
so a slot overwritten while being read is a miss, never wrong data. Each process keeps a
hash -> slot dict, rebuilt from the table when the segment's version counter moved (another
writer changed it). Capacity is the slot count; the least recently used slot is replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tokenfab.kv.checksum import block_checksum

_SHM = Path("/dev/shm")
_MAGIC = 0x3147564B46544B54  # "TKTFKVG1"
_HEADER = 64
_SLOT = np.dtype([("valid", "<u8"), ("hash", "<u8"), ("checksum", "<u8"), ("stamp", "<u8")])
_U64 = (1 << 64) - 1


class HostKVStore:
    """Fixed-size blocks in a named shared-memory segment (created, or attached if it exists
    with the same geometry)."""

    def __init__(self, name: str, block_bytes: int, capacity_bytes: int) -> None:
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        num_slots = capacity_bytes // block_bytes
        if num_slots < 1:
            raise ValueError(
                f"host tier capacity {capacity_bytes} B holds no block of {block_bytes} B"
            )
        self.name = name
        self.path = segment_path(name)
        self.block_bytes = block_bytes
        self.num_slots = num_slots
        table = num_slots * _SLOT.itemsize
        self._data_off = -(-(_HEADER + table) // 4096) * 4096
        size = self._data_off + num_slots * block_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size == 0:
                    os.ftruncate(fd, size)
                    self._mm = mmap.mmap(fd, size)
                    hdr = np.frombuffer(self._mm, "<u8", 4, 0)
                    hdr[:] = (_MAGIC, num_slots, block_bytes, 0)
                else:
                    self._mm = mmap.mmap(fd, 0)
                    hdr = np.frombuffer(self._mm, "<u8", 4, 0)
                    if tuple(int(x) for x in hdr[:3]) != (_MAGIC, num_slots, block_bytes):
                        raise ValueError(
                            f"{self.path} holds another layout (slots, block bytes "
                            f"{int(hdr[1])}, {int(hdr[2])}; wanted {num_slots}, {block_bytes})"
                        )
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._hdr = np.frombuffer(self._mm, "<u8", 4, 0)
        self._table = np.frombuffer(self._mm, _SLOT, num_slots, _HEADER)
        self._data = np.frombuffer(self._mm, np.uint8, num_slots * block_bytes, self._data_off)
        self._data = self._data.reshape(num_slots, block_bytes)
        self._index: dict[int, int] = {}
        self._index_version = -1
        self._lock = threading.Lock()  # flock is per open file; threads share ours

    # ------------------------------------------------------------------ index

    def _slots(self) -> dict[int, int]:
        """hash -> slot, rebuilt when another writer moved the version counter."""
        version = int(self._hdr[3])
        if version != self._index_version:
            valid = np.flatnonzero(self._table["valid"])
            hashes = self._table["hash"][valid]
            self._index = dict(zip(hashes.tolist(), valid.tolist(), strict=True))
            self._index_version = version
        return self._index

    def __contains__(self, block_hash: int) -> bool:
        return (block_hash & _U64) in self._slots()

    def __len__(self) -> int:
        return len(self._slots())

    def hashes(self) -> list[int]:
        return list(self._slots())

    def leading(self, hashes: Sequence[int]) -> int:
        index = self._slots()
        n = 0
        for h in hashes:
            if (h & _U64) not in index:
                break
            n += 1
        return n

    # ------------------------------------------------------------------ writes

    def put_many(self, hashes: Sequence[int], blocks: np.ndarray) -> list[int]:
        """Store blocks ([n, block_bytes] uint8) under their hashes; returns the hashes the
        LRU replaced (gone from this tier). Already-present blocks are only touched."""
        evicted: list[int] = []
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                table = self._table
                index = self._slots()
                stamp = int(self._hdr[3])
                for i, h in enumerate(hashes):
                    h &= _U64
                    stamp += 1
                    slot = index.get(h)
                    if slot is not None:
                        table["stamp"][slot] = stamp
                        continue
                    slot = self._victim()
                    if table["valid"][slot]:
                        old = int(table["hash"][slot])
                        index.pop(old, None)
                        evicted.append(old)
                    table["valid"][slot] = 0
                    data = blocks[i]
                    self._data[slot] = data
                    table["hash"][slot] = h
                    table["checksum"][slot] = block_checksum(h, data.data)
                    table["stamp"][slot] = stamp
                    table["valid"][slot] = 1
                    index[h] = slot
                self._hdr[3] = stamp
                self._index_version = stamp
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return evicted

    def _victim(self) -> int:
        """An empty slot, else the least recently used one."""
        valid = self._table["valid"]
        empty = np.flatnonzero(valid == 0)
        if empty.size:
            return int(empty[0])
        return int(np.argmin(self._table["stamp"]))

    def drop(self, block_hash: int) -> None:
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                slot = self._slots().get(block_hash & _U64)
                if slot is not None:
                    self._table["valid"][slot] = 0
                    self._hdr[3] += 1
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reads

    def read_into(self, hashes: Sequence[int], out: np.ndarray) -> list[bool]:
        """Copy each block into out[i] and verify it; False where absent or failing the check
        (a failing block is dropped). Lock-free: see the module docstring. Blocks in
        consecutive slots that land in consecutive rows are copied as one run."""
        index = self._slots()
        sums = self._table["checksum"]
        stored = self._table["hash"]
        want = [(i, h & _U64, index.get(h & _U64)) for i, h in enumerate(hashes)]
        hits = [(i, h, slot) for i, h, slot in want if slot is not None]
        expect = {i: int(sums[slot]) for i, _, slot in hits}
        k = 0
        while k < len(hits):  # copy runs
            i0, _, s0 = hits[k]
            n = 1
            while k + n < len(hits) and hits[k + n][0] == i0 + n and hits[k + n][2] == s0 + n:
                n += 1
            np.copyto(out[i0 : i0 + n], self._data[s0 : s0 + n])
            k += n
        found = [False] * len(hashes)
        corrupt: list[int] = []
        for i, h, slot in hits:
            if int(stored[slot]) == h and block_checksum(h, out[i].data) == expect[i]:
                found[i] = True
            else:
                corrupt.append(h)
        if hits:
            self._table["stamp"][[slot for _, _, slot in hits]] = int(self._hdr[3]) + 1
        for h in corrupt:
            self.drop(h)
        return found

    def corrupt_for_test(self, block_hash: int) -> None:
        """Flip one byte of a stored block (tests of the integrity check)."""
        slot = self._slots()[block_hash & _U64]
        self._data[slot, 0] ^= 0xFF

    # ------------------------------------------------------------------ life cycle

    def close(self) -> None:
        if self._fd < 0:
            return
        self._table = self._data = self._hdr = None  # type: ignore[assignment]
        # A caller may still hold a view of a slot; the mapping then goes with that view.
        with contextlib.suppress(BufferError):
            self._mm.close()
        os.close(self._fd)
        self._fd = -1

    def unlink(self) -> None:
        """Remove the segment (the last user of a host calls this)."""
        remove_segment(self.name)


def segment_path(name: str) -> Path:
    return _SHM / f"tokenfab-kv-{name}"


def remove_segment(name: str) -> None:
    """Remove a named segment (its users' mappings live on until they close them)."""
    segment_path(name).unlink(missing_ok=True)
