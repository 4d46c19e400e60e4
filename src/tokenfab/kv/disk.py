"""G3: KV blocks on local disk, a batch of blocks (one request's evictions) per extent file.

An extent is one file: a header (magic, block size, count, then per block its hash and
checksum), padded to 4 KiB, then the blocks back to back. It is written to a temporary name
and renamed, so a crash leaves whole extents or none. At start the index (hash -> extent,
slot) is rebuilt from the extents' headers; an extent shorter than its header says keeps only
its whole blocks. Capacity is in bytes over all extents; the least recently used extent goes
first. Reads are coalesced (`read_into`): the wanted blocks are sorted by (extent, slot),
neighbours merged into runs of up to `max_run_bytes`, and the runs read with `preadv` on a pool
of `inflight` threads (the GIL is released during the read); every block's checksum is then
verified, and a failing one dropped from the index.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokenfab.kv.checksum import block_checksum

_MAGIC = b"TFKVEXT1"
_HEAD = struct.Struct("<8sQQ")  # magic, block_bytes, count
_ENTRY = struct.Struct("<QQ")  # hash, checksum
_ALIGN = 4096
_U64 = (1 << 64) - 1


@dataclass(slots=True)
class _Extent:
    path: Path
    data_off: int
    hashes: list[int]
    live: int
    size: int
    checksums: list[int] = field(default_factory=list)


class DiskKVStore:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        block_bytes: int,
        capacity_bytes: int,
        inflight: int = 8,
        max_run_bytes: int = 8 << 20,
        sync: bool = False,
    ) -> None:
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        if inflight < 1:
            raise ValueError(f"inflight must be at least 1, got {inflight}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        # One store per directory: two would hand out the same extent ids.
        self._lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ValueError(
                f"KV disk directory {self.dir} is in use by another engine; give each its own"
            ) from None
        self.block_bytes = block_bytes
        self.capacity_bytes = capacity_bytes
        self.inflight = inflight
        self.max_run_bytes = max(max_run_bytes, block_bytes)
        self.sync = sync
        """fsync each extent before it is renamed in (off: a crash may lose recent extents,
        whose headers then fail to validate and are dropped at start)."""
        self._lock = threading.Lock()
        self._extents: OrderedDict[int, _Extent] = OrderedDict()  # LRU order: oldest first
        self._index: dict[int, tuple[int, int]] = {}  # hash -> (extent id, slot)
        self._bytes = 0
        self._next_id = 0
        self._pool = ThreadPoolExecutor(inflight, thread_name_prefix="tokenfab-kv-disk")
        self._rebuild()

    # ------------------------------------------------------------------ index

    def _rebuild(self) -> None:
        """Load every extent's header (the manifest is the extents themselves)."""
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # a write cut short
        paths = sorted(self.dir.glob("*.kve"), key=lambda p: int(p.stem))
        for path in paths:
            ext_id = int(path.stem)
            self._next_id = max(self._next_id, ext_id + 1)
            ext = self._read_header(path)
            if ext is None or ext.live == 0:
                path.unlink(missing_ok=True)
                continue
            self._extents[ext_id] = ext
            self._bytes += ext.size
            for slot, h in enumerate(ext.hashes[: ext.live]):
                self._index[h] = (ext_id, slot)
            ext.hashes = ext.hashes[: ext.live]
        self._evict_to(self.capacity_bytes)

    def _read_header(self, path: Path) -> _Extent | None:
        try:
            with open(path, "rb") as f:
                head = f.read(_HEAD.size)
                if len(head) < _HEAD.size:
                    return None
                magic, block_bytes, count = _HEAD.unpack(head)
                if magic != _MAGIC or block_bytes != self.block_bytes or count > 1 << 24:
                    return None
                raw = f.read(count * _ENTRY.size)
                if len(raw) < count * _ENTRY.size:
                    return None
                size = os.fstat(f.fileno()).st_size
        except OSError:
            return None
        entries = [_ENTRY.unpack_from(raw, i * _ENTRY.size) for i in range(count)]
        data_off = _data_offset(count)
        whole = max(0, min(count, (size - data_off) // block_bytes))
        return _Extent(
            path, data_off, [h for h, _ in entries], whole, size, [c for _, c in entries]
        )

    def __contains__(self, block_hash: int) -> bool:
        return (block_hash & _U64) in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def hashes(self) -> list[int]:
        return list(self._index)

    def leading(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if (h & _U64) not in self._index:
                break
            n += 1
        return n

    # ------------------------------------------------------------------ writes

    def put_many(self, hashes: Sequence[int], blocks: np.ndarray) -> list[int]:
        """Write the blocks not yet stored as one extent; returns hashes evicted to make room."""
        with self._lock:
            keep = [i for i, h in enumerate(hashes) if (h & _U64) not in self._index]
            for h in hashes:
                loc = self._index.get(h & _U64)
                if loc is not None:
                    self._extents.move_to_end(loc[0])
            if not keep:
                return []
            ext_id = self._next_id
            self._next_id += 1
        new = [hashes[i] & _U64 for i in keep]
        data = blocks[keep] if len(keep) < len(hashes) else blocks
        data = np.ascontiguousarray(data)
        sums = [block_checksum(h, data[i].data) for i, h in enumerate(new)]
        head = bytearray(_data_offset(len(new)))
        _HEAD.pack_into(head, 0, _MAGIC, self.block_bytes, len(new))
        for i, (h, c) in enumerate(zip(new, sums, strict=True)):
            _ENTRY.pack_into(head, _HEAD.size + i * _ENTRY.size, h, c)
        path = self.dir / f"{ext_id}.kve"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.writev(fd, [head, data.data])
            if self.sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        size = len(head) + data.nbytes
        with self._lock:
            # Another writer may have stored some of these meanwhile; the newer copy wins.
            self._extents[ext_id] = _Extent(path, len(head), new, len(new), size, sums)
            self._bytes += size
            for slot, h in enumerate(new):
                old = self._index.get(h)
                self._index[h] = (ext_id, slot)
                if old is not None:
                    self._release(old[0])
            return self._evict_to(self.capacity_bytes, protect=ext_id)

    def _evict_to(self, capacity: int, protect: int = -1) -> list[int]:
        evicted: list[int] = []
        while self._bytes > capacity and self._extents:
            ext_id = next(iter(self._extents))
            if ext_id == protect:
                if len(self._extents) == 1:
                    break  # one extent larger than the tier: keep it (it was just asked for)
                self._extents.move_to_end(ext_id)
                continue
            ext = self._extents[ext_id]
            for slot, h in enumerate(ext.hashes):
                if self._index.get(h) == (ext_id, slot):
                    del self._index[h]
                    evicted.append(h)
            self._remove_extent(ext_id)
        return evicted

    def _release(self, ext_id: int) -> None:
        """One block of the extent left the index; delete the file when none is left."""
        ext = self._extents.get(ext_id)
        if ext is None:
            return
        ext.live -= 1
        if ext.live <= 0:
            self._remove_extent(ext_id)

    def _remove_extent(self, ext_id: int) -> None:
        ext = self._extents.pop(ext_id)
        self._bytes -= ext.size
        ext.path.unlink(missing_ok=True)

    def drop(self, block_hash: int) -> None:
        with self._lock:
            loc = self._index.pop(block_hash & _U64, None)
            if loc is not None:
                self._release(loc[0])

    # ------------------------------------------------------------------ reads

    def read_into(self, hashes: Sequence[int], out: np.ndarray) -> list[bool]:
        """Read each block into out[i] with coalesced, parallel reads; verify each; False where
        absent or failing the check (failing blocks are dropped)."""
        with self._lock:
            locs: list[tuple[int, int, int, Path, int, int]] = []
            for i, h in enumerate(hashes):
                loc = self._index.get(h & _U64)
                if loc is None:
                    continue
                ext = self._extents[loc[0]]
                self._extents.move_to_end(loc[0])
                locs.append((loc[0], loc[1], i, ext.path, ext.data_off, ext.checksums[loc[1]]))
        locs.sort()
        # preadv takes at most IOV_MAX (1024 on Linux) buffers.
        runs = _runs(locs, min(1024, self.max_run_bytes // self.block_bytes))
        found = [False] * len(hashes)
        bad: list[int] = []
        futures = [self._pool.submit(self._read_run, run, hashes, out) for run in runs]
        for fut in futures:
            ok, failed = fut.result()
            for i in ok:
                found[i] = True
            bad.extend(failed)
        for h in bad:
            self.drop(h)
        return found

    def _read_run(
        self,
        run: list[tuple[int, int, int, Path, int, int]],
        hashes: Sequence[int],
        out: np.ndarray,
    ) -> tuple[list[int], list[int]]:
        """One preadv of consecutive slots of one extent, straight into the rows of `out`."""
        _, first_slot, _, path, data_off, _ = run[0]
        bb = self.block_bytes
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return [], [hashes[i] for _, _, i, *_ in run]
        try:
            got = os.preadv(fd, [out[i].data for _, _, i, *_ in run], data_off + first_slot * bb)
        except OSError:
            got = 0
        finally:
            os.close(fd)
        ok: list[int] = []
        bad: list[int] = []
        for k, (_, _, i, _, _, checksum) in enumerate(run):
            h = hashes[i]
            if (k + 1) * bb <= got and block_checksum(h & _U64, out[i].data) == checksum:
                ok.append(i)
            else:
                bad.append(h)
        return ok, bad

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the directory's flock
            self._lock_fd = -1


def _data_offset(count: int) -> int:
    return -(-(_HEAD.size + count * _ENTRY.size) // _ALIGN) * _ALIGN


def _runs(
    locs: list[tuple[int, int, int, Path, int, int]], max_blocks: int
) -> list[list[tuple[int, int, int, Path, int, int]]]:
    """Group sorted (extent, slot, ...) locations into runs of consecutive slots."""
    runs: list[list[tuple[int, int, int, Path, int, int]]] = []
    for loc in locs:
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and last[0] == loc[0]
            and last[1] + 1 == loc[1]
            and len(runs[-1]) < max_blocks
        ):
            runs[-1].append(loc)
        else:
            runs.append([loc])
    return runs
