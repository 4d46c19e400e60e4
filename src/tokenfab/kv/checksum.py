"""The integrity check every tier below G1 applies to a block before serving it.

A block's checksum is xxh3-64 of its bytes seeded with the block's own chained hash, so bytes
stored under the wrong hash fail the check as surely as flipped or truncated ones do. A block
that fails is dropped and recomputed, never served.
"""

from __future__ import annotations

import xxhash

_U64 = (1 << 64) - 1


def block_checksum(block_hash: int, data: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(data, seed=block_hash & _U64)
