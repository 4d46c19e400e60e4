"""G4: KV blocks in a remote store shared by every worker: a NATS JetStream object store.

One object per block, named by its hash in hex; the object is a 16-byte header (hash,
checksum) and the block's bytes. The object store checks its own SHA-256 digest, and the
header's checksum is checked too, so a truncated or altered object is a miss (and is deleted),
never served. Reads of many blocks run concurrently (`inflight` at a time). The client keeps
its own LRU of the objects it knows (listed at start, then those it writes) and deletes the
oldest beyond `capacity_bytes`: JetStream itself only discards by age or insertion order.

nats-py is asyncio; the engine is not, so this store runs a private event loop in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import nats
import numpy as np
from nats.js.api import ObjectStoreConfig

from tokenfab.kv.checksum import block_checksum

_HEAD = struct.Struct("<QQ")
_U64 = (1 << 64) - 1
T = TypeVar("T")


def object_name(block_hash: int) -> str:
    return f"{block_hash & _U64:016x}"


class RemoteKVStore:
    def __init__(
        self,
        url: str,
        block_bytes: int,
        capacity_bytes: int,
        bucket: str = "tokenfab-kv",
        inflight: int = 16,
        timeout: float = 10.0,
    ) -> None:
        self.block_bytes = block_bytes
        self.capacity_blocks = max(1, capacity_bytes // block_bytes)
        self.bucket = bucket
        self.timeout = timeout
        self._sem_size = inflight
        self._known: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self._lock = threading.Lock()
        self._nc: nats.NATS | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tokenfab-kv-remote", daemon=True
        )
        self._thread.start()
        try:
            self._run(self._connect(url))
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout * 4)

    async def _connect(self, url: str) -> None:
        nc = self._nc = await nats.connect(url, connect_timeout=self.timeout)
        js = nc.jetstream()
        self._obs = await js.create_object_store(self.bucket, ObjectStoreConfig())
        self._sem = asyncio.Semaphore(self._sem_size)
        try:
            infos = await self._obs.list()
        except Exception:  # an empty bucket raises NotFoundError
            infos = []
        for info in infos:
            if not info.deleted:
                try:
                    self._known[int(info.name, 16)] = None
                except ValueError:
                    continue

    # ------------------------------------------------------------------ index

    def __contains__(self, block_hash: int) -> bool:
        return (block_hash & _U64) in self._known

    def __len__(self) -> int:
        return len(self._known)

    def hashes(self) -> list[int]:
        with self._lock:
            return list(self._known)

    def leading(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if (h & _U64) not in self._known:
                break
            n += 1
        return n

    # ------------------------------------------------------------------ writes

    def put_many(self, hashes: Sequence[int], blocks: np.ndarray) -> list[int]:
        new = [(i, h & _U64) for i, h in enumerate(hashes) if (h & _U64) not in self._known]
        if new:
            self._run(self._put_all([(h, blocks[i]) for i, h in new]))
        with self._lock:
            for h in hashes:
                self._known[h & _U64] = None
                self._known.move_to_end(h & _U64)
            evicted: list[int] = []
            while len(self._known) > self.capacity_blocks:
                evicted.append(self._known.popitem(last=False)[0])
        if evicted:
            self._run(self._delete_all(evicted))
        return evicted

    async def _put_all(self, items: list[tuple[int, np.ndarray]]) -> None:
        async def put(h: int, data: np.ndarray) -> None:
            payload = _HEAD.pack(h, block_checksum(h, data.data)) + data.tobytes()
            async with self._sem:
                await self._obs.put(object_name(h), payload)

        await asyncio.gather(*(put(h, d) for h, d in items))

    async def _delete_all(self, hashes: list[int]) -> None:
        async def delete(h: int) -> None:
            async with self._sem:
                # Already gone: nothing to free.
                with contextlib.suppress(Exception):
                    await self._obs.delete(object_name(h))

        await asyncio.gather(*(delete(h) for h in hashes))

    def drop(self, block_hash: int) -> None:
        with self._lock:
            self._known.pop(block_hash & _U64, None)
        self._run(self._delete_all([block_hash & _U64]))

    def put_raw_for_test(self, block_hash: int, payload: bytes) -> None:
        """Store arbitrary bytes under a block's name (tests of the integrity check)."""

        async def put() -> None:
            await self._obs.put(object_name(block_hash), payload)

        self._run(put())

    # ------------------------------------------------------------------ reads

    def read_into(self, hashes: Sequence[int], out: np.ndarray) -> list[bool]:
        """Fetch the blocks concurrently into out[i]; False where absent or failing a check
        (a failing object is deleted)."""
        want = [(i, h & _U64) for i, h in enumerate(hashes) if (h & _U64) in self._known]
        found = [False] * len(hashes)
        if not want:
            return found
        results = self._run(self._get_all([h for _, h in want]))
        bad: list[int] = []
        for (i, h), payload in zip(want, results, strict=True):
            if payload is not None and self._verify(h, payload):
                out[i] = np.frombuffer(payload, np.uint8, self.block_bytes, _HEAD.size)
                found[i] = True
                with self._lock:
                    if h in self._known:
                        self._known.move_to_end(h)
            else:
                bad.append(h)
        for h in bad:
            self.drop(h)
        return found

    def _verify(self, h: int, payload: bytes) -> bool:
        if len(payload) != _HEAD.size + self.block_bytes:
            return False
        stored_hash, checksum = _HEAD.unpack_from(payload)
        data = memoryview(payload)[_HEAD.size :]
        return stored_hash == h and block_checksum(h, data) == checksum

    async def _get_all(self, hashes: list[int]) -> list[bytes | None]:
        async def get(h: int) -> bytes | None:
            async with self._sem:
                try:
                    res = await asyncio.wait_for(self._obs.get(object_name(h)), self.timeout)
                except Exception:  # missing, digest mismatch, timeout: all a miss
                    return None
                return res.data

        return list(await asyncio.gather(*(get(h) for h in hashes)))

    # ------------------------------------------------------------------ life cycle

    def close(self) -> None:
        if self._loop.is_running():
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    self._run(self._nc.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()
