"""KV transfer throughput between two processes over loopback TCP (tokenfab.kv.transfer).

A server process holds `--blocks` blocks of `--block-kib` KiB (SmolLM2-135M bf16: 360 KiB per
16-token block) and serves them with KVDataServer; this process pulls them all with
KVTransferClient `--rounds` times (hashes and checksums checked) and prints GB/s.

    python benchmarks/kv_transfer.py [--blocks 256 --block-kib 360 --rounds 5 --json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

SERVER = """
import asyncio, sys
from tokenfab.kv.transfer import KVDataServer
class Src:
    def __init__(self, n, size):
        self.block_bytes = size
        self.data = memoryview(bytearray(b"x" * (n * size)))
    async def read_blocks(self, hold_id, hashes):
        return self.data[: len(hashes) * self.block_bytes]
    async def release(self, hold_id):
        pass
async def main():
    s = KVDataServer(Src(int(sys.argv[1]), int(sys.argv[2])))
    await s.start()
    print(s.address, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def pull(address: str, blocks: int, size: int, rounds: int) -> list[float]:
    from tokenfab.kv.transfer import KVTransferClient

    client = KVTransferClient()
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        data = await client.pull(address, "h", list(range(1, blocks + 1)), size, release=False)
        rates.append(len(data) / (time.perf_counter() - t0) / 1e9)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--block-kib", type=int, default=360)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    size = a.block_kib * 1024
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(a.blocks), str(size)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        rates = asyncio.run(pull(address, a.blocks, size, a.rounds))
    finally:
        proc.kill()
        proc.wait()
    rates.sort()
    result = {
        "tcp_gb_per_s_median": rates[len(rates) // 2],
        "tcp_gb_per_s_best": rates[-1],
        "bytes_per_pull": a.blocks * size,
        "goal_gb_per_s": 1.0,
    }
    if a.json:
        print(json.dumps(result))
    else:
        print(
            f"KV transfer over loopback TCP: {result['tcp_gb_per_s_median']:.2f} GB/s median, "
            f"{result['tcp_gb_per_s_best']:.2f} best ({a.blocks} blocks x {a.block_kib} KiB per "
            f"pull, {a.rounds} pulls); goal >= 1 GB/s"
        )


if __name__ == "__main__":
    main()
