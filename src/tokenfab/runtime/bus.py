"""The message bus a runtime backend provides: subjects carrying bytes, NATS-style.

The request and event planes are written once against `Bus`; a backend supplies a `Bus` and a
`Discovery`. `LocalBus` is the in-process one (asyncio queues, one event loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol


class BusSubscription(Protocol):
    subject: str

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def next(self) -> bytes:
        """The next message; raises `BusClosed` once unsubscribed."""
        ...

    def unsubscribe(self) -> None: ...


class Bus(Protocol):
    async def publish(self, subject: str, data: bytes) -> None: ...

    def publish_soon(self, subject: str, data: bytes) -> None:
        """Publish without awaiting: safe in `finally` blocks of cancelled tasks."""
        ...

    async def subscribe(self, subject: str) -> BusSubscription:
        """`subject` may use NATS wildcards: `*` (one token) and `>` (the rest)."""
        ...

    async def close(self) -> None: ...


class BusClosed(Exception):
    """The subscription (or the whole bus) was closed."""


def subject_matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


_CLOSED = object()


class QueuedSubscription:
    """A subscription whose messages wait in an asyncio queue until read; backends feed it
    with `deliver` and close it with `_close_queue`."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._closed = False

    def deliver(self, data: bytes) -> None:
        if not self._closed:
            self._queue.put_nowait(data)

    async def next(self) -> bytes:
        if self._closed and self._queue.empty():
            raise BusClosed(self.subject)
        item = await self._queue.get()
        if item is _CLOSED:
            raise BusClosed(self.subject)
        assert isinstance(item, bytes)
        return item

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                yield await self.next()
            except BusClosed:
                return

    def _close_queue(self) -> bool:
        """Mark closed and wake the reader; False if it was already closed."""
        if self._closed:
            return False
        self._closed = True
        self._queue.put_nowait(_CLOSED)
        return True


class LocalSubscription(QueuedSubscription):
    def __init__(self, bus: LocalBus, subject: str) -> None:
        super().__init__(subject)
        self._bus = bus

    def unsubscribe(self) -> None:
        if self._close_queue():
            self._bus._remove(self)


class LocalBus:
    """In-process bus: exact subjects are a dict lookup; wildcard subscriptions are scanned."""

    def __init__(self) -> None:
        self._exact: dict[str, list[LocalSubscription]] = {}
        self._wild: list[LocalSubscription] = []
        self._closed = False

    async def publish(self, subject: str, data: bytes) -> None:
        self.publish_soon(subject, data)

    def publish_soon(self, subject: str, data: bytes) -> None:
        if self._closed:
            return
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("the bus carries bytes only (encode messages with msgspec)")
        payload = bytes(data)
        for sub in self._exact.get(subject, ()):
            sub.deliver(payload)
        for sub in self._wild:
            if subject_matches(sub.subject, subject):
                sub.deliver(payload)

    async def subscribe(self, subject: str) -> LocalSubscription:
        if self._closed:
            raise BusClosed("bus closed")
        sub = LocalSubscription(self, subject)
        if "*" in subject.split(".") or ">" in subject.split("."):
            self._wild.append(sub)
        else:
            self._exact.setdefault(subject, []).append(sub)
        return sub

    def _remove(self, sub: LocalSubscription) -> None:
        subs = self._exact.get(sub.subject)
        if subs is not None and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._exact[sub.subject]
        elif sub in self._wild:
            self._wild.remove(sub)

    def has_subscribers(self, subject: str) -> bool:
        return bool(self._exact.get(subject)) or any(
            subject_matches(s.subject, subject) for s in self._wild
        )

    def num_subscriptions(self) -> int:
        return sum(len(v) for v in self._exact.values()) + len(self._wild)

    async def close(self) -> None:
        self._closed = True
        for sub in [s for subs in self._exact.values() for s in subs] + list(self._wild):
            sub.unsubscribe()
