"""Chained block hashes, computed identically by the engine's KV cache, the frontend and the router.

A block's hash covers its parent's hash, its token ids and any extra keys (LoRA name, cache
salt), so equal hashes mean equal prefixes. xxh3-64 is stable across processes and machines
(unlike Python's `hash`) and fast enough to hash every block of every request.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

# The root "parent" of the first block of a sequence with no extra keys.
ROOT_HASH = 0


def request_extra_keys(lora_name: str | None, cache_salt: str | None) -> tuple[str, ...]:
    """Extra keys folded into a request's block hashes: the engine's cache and the router use
    this one function, so the router predicts the engine's hashes exactly."""
    keys: list[str] = []
    if lora_name:
        keys.append(f"lora={lora_name}")
    if cache_salt:
        keys.append(f"salt={cache_salt}")
    return tuple(keys)


def root_hash(extra_keys: Sequence[str] = ()) -> int:
    """The parent hash of a sequence's first block; extra keys (cache salt, LoRA name) fold in
    here so every block of a salted sequence differs from the unsalted one."""
    if not extra_keys:
        return ROOT_HASH
    return xxhash.xxh3_64_intdigest("\x1f".join(extra_keys).encode(), seed=1)


def hash_block(parent: int, token_ids: Sequence[int]) -> int:
    """Hash of one full block given its parent's hash."""
    return xxhash.xxh3_64_intdigest(array("Q", token_ids).tobytes(), seed=parent)


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[str] = (),
    parent: int | None = None,
) -> list[int]:
    """Hashes of every *full* block of `token_ids`; a trailing partial block has none."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    h = root_hash(extra_keys) if parent is None else parent
    out: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hash_block(h, token_ids[start : start + block_size])
        out.append(h)
    return out
