"""KV tiers below G1: (a) cold G3 reads, coalesced vs naive, and warm G2 reads; (b) engine TTFT
on a long shared-prefix workload with G1 too small to hold it, tiers on vs off (recompute).

(a) `--blocks` SmolLM2-135M blocks (360 KiB each: 30 layers x K,V x 16 tokens x 3 heads x 64
dims, bf16) written through `DiskKVStore` as extents of 64 blocks in a temp dir on the disk
under /tmp. Cold: every extent's pages are dropped from the page cache (posix_fadvise
DONTNEED), then all blocks are read with `read_into` (runs of consecutive blocks, 8 preadv
in flight, checksums verified). Naive: pages dropped again, then a subset of blocks read
block by block in 4 KiB preads with readahead off (POSIX_FADV_RANDOM), one in flight.
Warm: the same blocks read from a `HostKVStore` (shared memory, checksums verified).
G4: `--remote-blocks` blocks written to and read back from a `RemoteKVStore` on a local
`nats-server -js` (JetStream object store, loopback).

(b) SmolLM2-135M (1 thread): 2 prefixes of `--prefix` tokens asked in turns with distinct
8-token suffixes, one request at a time, max_tokens 1; the pool holds one prefix only, so
without tiers each request recomputes most of its prefix. By default through what a user runs:
a fresh `tokenfab serve --kv-blocks N --num-threads 1 [--kv-host-gb 0.25 --kv-disk-dir D]`
per setting, TTFT timed by a streaming HTTP client; `--path engine` times LLMEngine alone
(add_request to first output, no HTTP). p50 over all but the first two (cold) requests.

    .venv/bin/python benchmarks/kv_tiers.py [--json] [--blocks N] [--prefix N] [--requests N]
        [--path served|engine]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tokenfab.kv.disk import DiskKVStore
from tokenfab.kv.host import HostKVStore

BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 2
EXTENT_BLOCKS = 64


def drop_cache(directory: Path) -> None:
    for path in directory.glob("*.kve"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def naive_read(directory: Path, disk: DiskKVStore, hashes: list[int]) -> int:
    """Block by block, 4 KiB preads, no readahead, one in flight; returns bytes read."""
    total = 0
    buf = bytearray(4096)
    for h in hashes:
        ext_id, slot = disk._index[h]  # the benchmark's baseline reads the same layout
        ext = disk._extents[ext_id]
        fd = os.open(ext.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            base = ext.data_off + slot * BLOCK_BYTES
            for off in range(0, BLOCK_BYTES, 4096):
                total += os.preadv(fd, [buf], base + off)
        finally:
            os.close(fd)
    return total


def read_throughput(num_blocks: int, naive_blocks: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (EXTENT_BLOCKS, BLOCK_BYTES), dtype=np.uint8)
    hashes = [int(x) for x in rng.integers(1, 2**63, num_blocks)]
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="kv-tiers-") as tmp:
        directory = Path(tmp)
        disk = DiskKVStore(directory, BLOCK_BYTES, 1 << 40, inflight=8)
        host = HostKVStore(f"bench-{os.getpid()}", BLOCK_BYTES, (num_blocks + 1) * BLOCK_BYTES)
        try:
            for start in range(0, num_blocks, EXTENT_BLOCKS):
                chunk = hashes[start : start + EXTENT_BLOCKS]
                disk.put_many(chunk, data[: len(chunk)])
                host.put_many(chunk, data[: len(chunk)])
            out = np.empty((num_blocks, BLOCK_BYTES), dtype=np.uint8)
            out.fill(0)  # touch the pages: first-touch faults are not reads
            nbytes = num_blocks * BLOCK_BYTES

            drop_cache(directory)
            t0 = time.perf_counter()
            ok = disk.read_into(hashes, out)
            cold = time.perf_counter() - t0
            assert all(ok), "a block failed its check"

            drop_cache(directory)
            subset = hashes[:naive_blocks]
            t0 = time.perf_counter()
            got = naive_read(directory, disk, subset)
            naive = time.perf_counter() - t0

            host.read_into(hashes, out)  # once to warm the mapping's page tables
            t0 = time.perf_counter()
            ok = host.read_into(hashes, out)
            warm = time.perf_counter() - t0
            assert all(ok)
        finally:
            disk.close()
            host.close()
            host.unlink()
    return {
        "cold_gbps": nbytes / cold / 1e9,
        "naive_gbps": got / naive / 1e9,
        "warm_gbps": nbytes / warm / 1e9,
    }


def remote_throughput(num_blocks: int) -> dict[str, float]:
    """G4 on a local `nats-server -js` (loopback, file storage under /tmp): write the blocks,
    then read them back (`inflight` concurrent object gets, checksums verified)."""
    from tokenfab.kv.remote import RemoteKVStore
    from tokenfab.runtime.nats_server import NatsServer

    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, (num_blocks, BLOCK_BYTES), dtype=np.uint8)
    hashes = [int(x) for x in rng.integers(1, 2**63, num_blocks)]
    nbytes = num_blocks * BLOCK_BYTES
    server = NatsServer(jetstream=True)
    server.start()
    try:
        remote = RemoteKVStore(server.url, BLOCK_BYTES, 2 * nbytes)
        try:
            t0 = time.perf_counter()
            remote.put_many(hashes, data)
            write = time.perf_counter() - t0
            out = np.zeros_like(data)
            t0 = time.perf_counter()
            ok = remote.read_into(hashes, out)
            read = time.perf_counter() - t0
            assert all(ok) and np.array_equal(out, data), "a remote block came back wrong"
        finally:
            remote.close()
    finally:
        server.stop()
    return {"remote_write_gbps": nbytes / write / 1e9, "remote_read_gbps": nbytes / read / 1e9}


def prompts(prefix: int, requests: int) -> list[list[int]]:
    """Two long prefixes asked in turns, each with a fresh 8-token suffix."""
    rng = np.random.default_rng(1)
    prefixes = [[int(x) for x in rng.integers(100, 40000, prefix)] for _ in range(2)]
    return [
        prefixes[i % 2] + [int(x) for x in rng.integers(100, 40000, 8)] for i in range(requests)
    ]


def pool_blocks(prefix: int) -> int:
    return -(-(prefix + 16) // 16) + 2  # one request's blocks, a little slack


def ttft_served(prefix: int, requests: int, tiers: bool, tmp: str) -> float:
    """TTFT p50 (ms) against a fresh `tokenfab serve`, one streaming request at a time."""
    import asyncio
    import sys

    import _peers
    import httpx

    from tokenfab.bench.client import ClientConfig, send_streaming
    from tokenfab.bench.workload import RequestSpec

    port = _peers.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).with_name("tokenfab")), "serve", "--port", str(port)]
    cmd += ["--kv-blocks", str(pool_blocks(prefix)), "--num-threads", "1"]
    if tiers:
        cmd += ["--kv-host-gb", "0.25", "--kv-disk-dir", tmp]

    async def run() -> list[float]:
        async with httpx.AsyncClient(timeout=600) as client:
            model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
            cfg = ClientConfig(url, model)
            times = []
            for i, ids in enumerate(prompts(prefix, requests)):
                res = await send_streaming(client, cfg, RequestSpec(i, ids, 1, 0.0), 0.0)
                if res.error or res.ttft is None:
                    raise RuntimeError(f"request {i} failed: {res.error}")
                times.append(res.ttft)
            return times

    log = Path(tempfile.gettempdir()) / f"kv-tiers-serve-{'on' if tiers else 'off'}.log"
    with _peers.server_process(cmd, dict(os.environ), url, log, startup_s=300):
        times = asyncio.run(run())
    return statistics.median(times[2:]) * 1000


def ttft_engine(prefix: int, requests: int, tiers: bool, tmp: str) -> float:
    import torch

    from tokenfab.config import EngineConfig
    from tokenfab.engine.engine import LLMEngine
    from tokenfab.engine.model.loader import load_model
    from tokenfab.protocol import GenerateRequest, SamplingParams

    torch.set_num_threads(1)
    loaded = load_model(None, "auto", "cpu")
    blocks = pool_blocks(prefix)
    extra = {"kv_host_gb": 0.25, "kv_disk_dir": tmp} if tiers else {}
    cfg = EngineConfig(num_kv_blocks=blocks, num_threads=1, **extra)
    engine = LLMEngine(cfg, loaded=loaded)
    engine.warm_up()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times: list[float] = []
    for i, ids in enumerate(prompts(prefix, requests)):
        t0 = time.perf_counter()
        engine.add_request(
            GenerateRequest(request_id=f"r{i}", prompt_token_ids=ids, sampling=params)
        )
        first = None
        while engine.has_unfinished():
            outs = engine.step()
            if first is None and any(o.token_ids for o in outs):
                first = time.perf_counter() - t0
        times.append(first or 0.0)
    engine.close()
    return statistics.median(times[2:]) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--blocks", type=int, default=1024, help="blocks read cold and warm")
    ap.add_argument("--naive-blocks", type=int, default=96, help="blocks read naively")
    ap.add_argument("--prefix", type=int, default=1024, help="shared prefix tokens")
    ap.add_argument("--requests", type=int, default=10, help="requests per TTFT run")
    ap.add_argument("--remote-blocks", type=int, default=256, help="blocks through G4")
    ap.add_argument(
        "--path",
        choices=("served", "engine"),
        default="served",
        help="TTFT through `tokenfab serve` (default) or of the engine alone",
    )
    args = ap.parse_args()
    res: dict[str, float | str] = dict(read_throughput(args.blocks, args.naive_blocks))
    res.update(remote_throughput(args.remote_blocks))
    ttft = ttft_served if args.path == "served" else ttft_engine
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="kv-tiers-g3-") as tmp:
        res["ttft_p50_on_ms"] = ttft(args.prefix, args.requests, True, tmp)
    res["ttft_p50_off_ms"] = ttft(args.prefix, args.requests, False, "")
    res["ttft_path"] = args.path
    if args.json:
        print(json.dumps(res))
        return
    print(f"G3 cold read, coalesced (8 in flight): {res['cold_gbps']:.2f} GB/s")
    print(f"G3 cold read, naive 4 KiB preads:      {res['naive_gbps']:.3f} GB/s")
    print(f"  coalesced / naive: {res['cold_gbps'] / res['naive_gbps']:.1f}x")
    print(f"G2 warm read (shared memory):          {res['warm_gbps']:.2f} GB/s")
    print(f"G4 write / read (NATS JetStream objects): {res['remote_write_gbps']:.3f} / "
          f"{res['remote_read_gbps']:.3f} GB/s")  # fmt: skip
    on, off = res["ttft_p50_on_ms"], res["ttft_p50_off_ms"]
    print(f"TTFT p50 tiers on {on:.0f} ms, off {off:.0f} ms: {off / on:.2f}x")


if __name__ == "__main__":
    main()
