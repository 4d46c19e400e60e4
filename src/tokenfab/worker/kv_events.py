"""Carries KV events from the engine's thread to the worker's event loop.

The engine calls its `event_sink` from whatever thread runs its step loop; the runtime lives on
an asyncio loop. `KVEventForwarder` is that sink: thread-safe, it hands batches to the loop with
`call_soon_threadsafe` (buffering whatever arrives before the loop is bound), never blocking
the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence

from tokenfab.protocol import KVEvent


class KVEventForwarder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[list[KVEvent]] | None = None
        self._pending: list[KVEvent] = []

    def __call__(self, events: Sequence[KVEvent]) -> None:
        if not events:
            return
        batch = list(events)
        with self._lock:
            if self._loop is None or self._queue is None:
                self._pending.extend(batch)
                return
            loop, queue = self._loop, self._queue
        # RuntimeError: the loop is closed, the worker is shutting down.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, batch)

    def bind(self) -> asyncio.Queue[list[KVEvent]]:
        """Attach to the running loop; returns the queue the events arrive on."""
        queue: asyncio.Queue[list[KVEvent]] = asyncio.Queue()
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._queue = queue
            if self._pending:
                queue.put_nowait(self._pending)
                self._pending = []
        return queue

    def unbind(self) -> None:
        with self._lock:
            self._loop = None
            self._queue = None
