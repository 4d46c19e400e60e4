"""Choose torch's intra-op thread count by measuring steps.

On a CPU shared with other busy processes, every parallel region waits at its barrier for the
slowest thread; a descheduled thread turns a 30 microsecond add into milliseconds, and two
threads can be 10x slower than one (measured here: a 64-sequence decode step of SmolLM2-135M
took ~1.5 s with 2 threads and ~80 ms with 1 while five other jobs ran). On a quiet machine
more threads win. So the engine measures: it runs with the most threads, and now and then
runs one step with another count; a probe that is faster per token than the recent steps at
the current count (by a margin) becomes the new count. Losing probes back off exponentially,
so a settled choice costs little. Comparisons are between adjacent steps, whose batches are
alike.

A settled choice is not trusted for ever: when the steps at the current count get much slower
than when it was last judged (another process started competing for the cores, e.g. a load
generator on the same machine), every other count is probed again at once. Without that, a
choice made on a quiet machine kept two threads for up to 2,048 steps after contention began,
and two threads fighting a busy client process ran ~20x slower than one (measured: a batch-1
decode at ~1.6 tokens/s beside aiperf's client).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class ThreadTuner:
    max_threads: int
    first_probe: int = 4
    """Steps before the first probe."""
    min_interval: int = 32
    max_interval: int = 2048
    margin: float = 0.15
    slowdown: float = 1.6
    """Recent steps this much slower than at the last judgement re-open every probe."""
    current: int = field(init=False)
    _recent: deque[tuple[int, float]] = field(init=False)
    """(work, seconds per token) of the latest steps at the current count."""
    _interval: dict[int, int] = field(init=False)
    _next_probe: dict[int, int] = field(init=False)
    _step: int = field(init=False, default=0)
    _probing: int | None = field(init=False, default=None)
    _last_work: int = field(init=False, default=0)
    _reference: tuple[int, float] | None = field(init=False, default=None)
    """(work, median cost per token) of the current count when it was last judged."""

    def __post_init__(self) -> None:
        self.current = self.max_threads
        self._recent = deque(maxlen=8)
        others = [n for n in (1, self.max_threads // 2, self.max_threads) if n != self.current]
        self._interval = {n: self.min_interval for n in set(others) if n >= 1}
        self._next_probe = {n: self.first_probe for n in self._interval}

    def threads_for_next_step(self, work: int) -> int:
        """Thread count to run the coming step with (work: its batched tokens)."""
        self._step += 1
        self._probing = None
        if len(self._baseline(work)) >= 2 and _alike(work, self._last_work):
            due = [n for n, at in self._next_probe.items() if self._step >= at]
            if due:
                self._probing = min(due, key=lambda n: self._next_probe[n])
        self._last_work = work
        return self._probing if self._probing is not None else self.current

    def record(self, seconds: float, work: int) -> None:
        """Report how long the step took."""
        cost = seconds / max(work, 1)
        n = self._probing
        if n is None:
            self._recent.append((work, cost))
            self._watch_for_slowdown(work)
            return
        alike = sorted(self._baseline(work))
        baseline = alike[len(alike) // 2]
        if cost < baseline * (1.0 - self.margin):
            # The probe won: switch, and give the old count a fresh chance later.
            old = self.current
            self.current = n
            del self._interval[n], self._next_probe[n]
            self._interval[old] = self.min_interval
            self._next_probe[old] = self._step + self.min_interval
            self._recent.clear()
            self._reference = None
        else:
            self._interval[n] = min(self._interval[n] * 4, self.max_interval)
            self._next_probe[n] = self._step + self._interval[n]
            self._reference = (work, baseline)

    def _watch_for_slowdown(self, work: int) -> None:
        alike = sorted(self._baseline(work))
        if len(alike) < 4:
            return
        median = alike[len(alike) // 2]
        ref = self._reference
        if ref is None or not _alike(ref[0], work):
            self._reference = (work, median)
            return
        if median > ref[1] * self.slowdown:
            # Conditions changed: judge every count again, soon.
            for n in self._next_probe:
                self._interval[n] = self.min_interval
                self._next_probe[n] = self._step + 1
            self._reference = (work, median)

    def _baseline(self, work: int) -> list[float]:
        return [c for w, c in self._recent if _alike(w, work)]


def _alike(a: int, b: int) -> bool:
    return b > 0 and max(a, b) <= 2 * min(a, b)


def settle_threadsafe(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future[T], value: T | BaseException
) -> None:
    """From any thread: complete `fut` (on `loop`) with `value`, or fail it if `value` is an
    exception. A future already done (e.g. its waiter was cancelled) is left alone."""

    def settle() -> None:
        if fut.done():
            return
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)

    loop.call_soon_threadsafe(settle)


async def in_fresh_thread(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` on a new thread that ends with it. Unlike `asyncio.to_thread`, whose
    executor threads live on, the OpenMP thread team any torch work creates there goes away
    with the thread, so it cannot slow the engine thread's team (see `AsyncEngine.start`)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def body() -> None:
        try:
            result: T | BaseException = fn(*args)
        except BaseException as e:
            result = e
        settle_threadsafe(loop, fut, result)

    thread = threading.Thread(target=body, name="tokenfab-load", daemon=True)
    thread.start()
    try:
        return await fut
    finally:
        await asyncio.to_thread(thread.join)
