"""The index's table: block hash -> bitmask of the worker slots holding it.

Two implementations of one small interface. `NativeHolders` keeps the table in C
(`holders.c`: open addressing, one cache line per probe, probes of a batch overlapped with
prefetches) and takes a whole event batch per call; at a million hashes it ingests ~2-3x the
events of `DictHolders`, a Python dict whose every probe of a table far larger than the CPU's
caches costs several memory misses (benchmarks/router_index.py). `DictHolders` is the fallback
where no C compiler is available (and under TOKENFAB_NO_NATIVE=1); both pass the same tests.

Masks are Python ints (bit `slot` set for each holder), of any width: the native table widens
its rows as slots grow past 64.

Pure bookkeeping: no I/O, no clock.
"""

from __future__ import annotations

import ctypes
import weakref
from array import array
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from itertools import chain, compress, repeat
from typing import Protocol

from tokenfab.native import load_library

CLEAR = -(2**63)
"""`Holders.apply`'s operations are ints, one per event: n >= 0 stores the next n hashes, ~n
(negative) removes the next n, CLEAR drops every hash of the worker. Plain ints, because the
native table takes them as one array without conversion."""

MAX_SLOTS = 64 * 64
"""Worker slots the native table supports (its walk keeps 64 mask words on the stack)."""

Walk = list[tuple[int, int]]
"""find_matches' raw result: (depth, mask of the workers holding exactly `depth` leading
blocks), in increasing depth."""


class Holders(Protocol):
    def __len__(self) -> int: ...

    def reserve(self, slot: int) -> None:
        """Make room for a worker slot before its bit appears in any mask."""
        ...

    def apply(self, slot: int, ops: Sequence[int], runs: Sequence[Sequence[int]]) -> int:
        """Apply operations in order for one worker slot (`runs` holds the hashes of the store
        and remove operations, in order); returns the change in the slot's block count."""
        ...

    def mask(self, block_hash: int) -> int: ...

    def walk(self, hashes: Sequence[int], overlay: Callable[[int], int] | None) -> Walk:
        """The longest-prefix walk along `hashes` (`overlay(h)` adds holders per hash)."""
        ...


_BULK = 4
"""Runs of at least this many hashes take DictHolders' C-level path."""


class DictHolders:
    """The table as a Python dict (hash -> mask; never 0: empty entries go)."""

    def __init__(self) -> None:
        self._holders: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def reserve(self, slot: int) -> None:
        pass  # Python ints grow as needed

    def apply(self, slot: int, ops: Sequence[int], runs: Sequence[Sequence[int]]) -> int:
        bit = 1 << slot
        delta = 0
        it = iter(runs)
        for op in ops:
            if op >= 0:
                delta += self._store(bit, next(it))
            elif op != CLEAR:
                delta -= self._remove(bit, next(it))
            else:
                delta -= self._clear(bit)
        return delta

    def mask(self, block_hash: int) -> int:
        return self._holders.get(block_hash, 0)

    # Runs of `_BULK` or more hashes do their per-hash work inside C-level builtins (map over
    # dict methods, list.count), with a Python loop only for hashes other workers also hold;
    # shorter runs (a decoding sequence filled one block) take a plain loop.

    def _store(self, bit: int, hashes: Sequence[int]) -> int:
        holders = self._holders
        before = len(holders)
        added = 0
        # setdefault inserts a new hash with this worker's bit, or returns the existing mask.
        if len(hashes) < _BULK:
            for h in hashes:
                mask = holders.setdefault(h, bit)
                if mask != bit:
                    added += not mask & bit
                    holders[h] = mask | bit
        else:
            masks = list(map(holders.setdefault, hashes, repeat(bit)))
            if masks.count(bit) != len(masks):
                for h, mask in zip(hashes, masks, strict=True):
                    if mask != bit:
                        mask = holders[h]  # again: the run may hold this hash twice
                        added += not mask & bit
                        holders[h] = mask | bit
        return added + len(holders) - before

    def _remove(self, bit: int, hashes: Sequence[int]) -> int:
        holders = self._holders
        if len(hashes) < _BULK:
            masks = [holders.pop(h, 0) for h in hashes]
        else:
            masks = list(map(holders.pop, hashes, repeat(0)))
            if masks.count(bit) == len(masks):
                return len(masks)  # all were this worker's alone
        keep = ~bit
        removed = 0
        for h, mask in zip(hashes, masks, strict=True):
            if mask != bit:
                rest = mask & keep
                if rest:
                    holders[h] = rest  # others still hold it
                if not mask & bit:
                    continue
            removed += 1
        return removed

    def _clear(self, bit: int) -> int:
        """A scan of the whole map, paid only on AllBlocksCleared, worker removal and
        snapshots, so that the hot path keeps no per-worker set."""
        holders = self._holders
        mine = list(compress(holders, map(bit.__and__, holders.values())))
        masks = list(map(holders.pop, mine))
        if masks.count(bit) != len(masks):
            keep = ~bit
            for h, mask in zip(mine, masks, strict=True):
                rest = mask & keep
                if rest:
                    holders[h] = rest
        return len(mine)

    def walk(self, hashes: Sequence[int], overlay: Callable[[int], int] | None) -> Walk:
        holders = self._holders
        mask_of: Callable[[int], int | None] = holders.get  # the bound method: no extra call
        if overlay is not None:
            extra = overlay

            def with_overlay(h: int) -> int | None:
                return holders.get(h, 0) | extra(h)

            mask_of = with_overlay
        current = mask_of(hashes[0]) or 0
        if not current:
            return []
        out: Walk = []
        for depth in range(1, len(hashes)):
            mask = (mask_of(hashes[depth]) or 0) & current
            if mask != current:
                out.append((depth, current & ~mask))
                if not mask:
                    return out
                current = mask
        out.append((len(hashes), current))
        return out


@cache
def _library() -> ctypes.CDLL | None:
    source = resources.files("tokenfab.router").joinpath("holders.c").read_text()
    lib = load_library("holders", source, ["-O2", "-shared", "-fPIC", "-std=c11"])
    if lib is None:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ht_new.argtypes, lib.ht_new.restype = [i32], p
    lib.ht_free.argtypes, lib.ht_free.restype = [p], None
    lib.ht_len.argtypes, lib.ht_len.restype = [p], i64
    lib.ht_widen.argtypes, lib.ht_widen.restype = [p, i32], i32
    lib.ht_apply.argtypes, lib.ht_apply.restype = [p, p, p, i64, i32], i64
    lib.ht_get.argtypes, lib.ht_get.restype = [p, ctypes.c_uint64, p], None
    lib.ht_walk.argtypes, lib.ht_walk.restype = [p, p, i64, p, p, p], i64
    return lib


def _address(buf: array) -> int:
    return buf.buffer_info()[0]


class NativeHolders:
    """The table in C (holders.c). Hashes must be unsigned 64-bit ints, as block hashes are."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._words = 1
        self._table = lib.ht_new(self._words)
        if not self._table:
            raise MemoryError("router index: cannot allocate the hash table")
        weakref.finalize(self, lib.ht_free, self._table)

    def __len__(self) -> int:
        return self._lib.ht_len(self._table)

    def reserve(self, slot: int) -> None:
        if slot < 64 * self._words:
            return
        if slot >= MAX_SLOTS:
            raise ValueError(f"router index: more than {MAX_SLOTS} workers")
        words = self._words
        while slot >= 64 * words:
            words *= 2
        if self._lib.ht_widen(self._table, words):
            raise MemoryError("router index: cannot widen the hash table")
        self._words = words

    def apply(self, slot: int, ops: Sequence[int], runs: Sequence[Sequence[int]]) -> int:
        keys = array("Q", chain.from_iterable(runs))
        codes = array("q", ops)
        delta = self._lib.ht_apply(self._table, _address(keys), _address(codes), len(codes), slot)
        if delta == -(2**63):
            raise MemoryError("router index: cannot grow the hash table")
        return delta

    def mask(self, block_hash: int) -> int:
        out = array("Q", bytes(8 * self._words))
        self._lib.ht_get(self._table, block_hash, _address(out))
        return self._join(out)

    def walk(self, hashes: Sequence[int], overlay: Callable[[int], int] | None) -> Walk:
        n = len(hashes)
        words = self._words
        keys = array("Q", hashes)
        extra = 0
        if overlay is not None:
            extra_buf = self._split(map(overlay, hashes), n)
            extra = _address(extra_buf)
        depths = array("q", bytes(8 * (n + 1)))
        dropped = array("Q", bytes(8 * (n + 1) * words))
        count = self._lib.ht_walk(
            self._table, _address(keys), n, extra, _address(depths), _address(dropped)
        )
        if words == 1:
            return list(zip(depths[:count], dropped[:count], strict=True))
        return [(depths[r], self._join(dropped[r * words : (r + 1) * words])) for r in range(count)]

    def _split(self, masks: object, n: int) -> array:
        """Masks (Python ints) as `words` 64-bit words each, little end first."""
        words = self._words
        if words == 1:
            return array("Q", masks)  # type: ignore[arg-type]
        raw = b"".join(m.to_bytes(8 * words, "little") for m in masks)  # type: ignore[attr-defined]
        out = array("Q")
        out.frombytes(raw)
        assert len(out) == n * words
        return out

    @staticmethod
    def _join(words: array) -> int:
        return int.from_bytes(words.tobytes(), "little")


def make_holders() -> Holders:
    """The native table where it builds, else the dict."""
    lib = _library()
    return NativeHolders(lib) if lib is not None else DictHolders()
