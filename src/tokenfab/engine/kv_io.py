"""Bytes in and out of the runner's KV pool, one block at a time: what disaggregated serving
moves between workers.

A block's bytes are its K and V for every layer, laid out `[layers, 2, block_size, kv_heads,
head_dim]` in the model's dtype, so two workers of the same model and block size exchange them
as they are. On CPU the copies go through numpy views of the pool (single-threaded memcpy: a
torch op here would start a second OpenMP thread team beside the engine's, see threads.py); on
other devices through torch.

Reading blocks is safe from any thread while the engine steps, as long as the blocks are held
(the KV cache will neither evict nor rewrite them); writing is done on the engine thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


class KVBlockIO:
    def __init__(self, pool: torch.Tensor) -> None:
        """`pool`: the runner's `[layers, 2, num_blocks, block_size, kv_heads, head_dim]`."""
        self.pool = pool
        self.block_bytes: int = pool[:, :, 0].numel() * pool.element_size()
        self._array: np.ndarray | None = None
        if pool.device.type == "cpu":
            # A uint8 view of the same memory (numpy has no bfloat16).
            self._array = _bytes_view(pool).numpy()

    def read(self, block_ids: list[int], out: memoryview | None = None) -> memoryview:
        """The blocks' bytes, concatenated in the order given (into `out` if passed)."""
        import numpy as np

        n = len(block_ids)
        buf = out if out is not None else memoryview(bytearray(n * self.block_bytes))
        if len(buf) != n * self.block_bytes:
            raise ValueError(f"buffer of {len(buf)} bytes for {n} blocks of {self.block_bytes}")
        if self._array is not None:
            dst = np.frombuffer(buf, dtype=np.uint8).reshape(n, *self._block_shape())
            for i, b in enumerate(block_ids):
                dst[i] = self._array[:, :, b]
            return buf
        t = self.pool[:, :, block_ids].movedim(2, 0).contiguous().cpu()
        np.frombuffer(buf, dtype=np.uint8)[:] = _bytes_view(t).numpy().reshape(-1)
        return buf

    def write(self, block_ids: list[int], data: memoryview | bytes) -> None:
        """Store concatenated block bytes (as `read` returns them) into these blocks."""
        import numpy as np

        n = len(block_ids)
        if len(data) != n * self.block_bytes:
            raise ValueError(f"{len(data)} bytes for {n} blocks of {self.block_bytes}")
        src = np.frombuffer(data, dtype=np.uint8).reshape(n, *self._block_shape())
        if self._array is not None:
            for i, b in enumerate(block_ids):
                self._array[:, :, b] = src[i]
            return
        import torch

        shape = (n, *self.pool.shape[:2], *self.pool.shape[3:])
        t = torch.from_numpy(src.copy()).view(self.pool.dtype).reshape(shape).to(self.pool.device)
        self.pool[:, :, block_ids] = t.movedim(0, 2)

    def _block_shape(self) -> tuple[int, ...]:
        s = self.pool.shape
        return (s[0], s[1], s[3], s[4], s[5] * self.pool.element_size())


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    """The same memory as uint8, the last dimension scaled by the element size."""
    import torch

    return t.contiguous().view(torch.uint8)
