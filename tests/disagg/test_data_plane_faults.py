"""The KV data plane of disaggregated serving through a TCP fault proxy (tests/fault_proxy.py):
latency slows a pull but it arrives intact; a stream truncated or reset mid-transfer, or a peer
that stalls past the timeout, fails the pull with a TransferError (never a hang) and the server
goes on serving. End to end, a decode worker whose pull fails computes the prompt itself: the
greedy output is unchanged and the prefill worker's held blocks are released."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fault_proxy import FaultProxy, Faults

from tokenfab.config import DataPlaneConfig, EngineConfig
from tokenfab.kv.transfer import KVDataServer, KVTransferClient, TransferError
from tokenfab.protocol import GenerateOutput, GenerateRequest, RemotePrefill, SamplingParams
from tokenfab.runtime import Runtime
from tokenfab.worker.launch import start_engines, stop_engines

BLOCK = 64 * 1024
HASHES = list(range(1, 65))  # 4 MiB: many proxy chunks, so faults land mid-transfer


class PatternSource:
    """Held blocks whose bytes are a function of their hash, under hold "h"."""

    block_bytes = BLOCK

    def __init__(self) -> None:
        self.released: list[str] = []

    async def read_blocks(self, hold_id: str, block_hashes: list[int]) -> memoryview:
        if hold_id != "h":
            raise TransferError(f"nothing held under {hold_id!r}")
        return memoryview(b"".join(bytes([h % 251]) * BLOCK for h in block_hashes))

    async def release(self, hold_id: str) -> None:
        self.released.append(hold_id)


def _expected(hashes: list[int]) -> bytes:
    return b"".join(bytes([h % 251]) * BLOCK for h in hashes)


@pytest.fixture
async def plane() -> AsyncIterator[tuple[KVDataServer, FaultProxy]]:
    server = KVDataServer(PatternSource())
    await server.start()
    host, port = server.address.rsplit(":", 1)
    proxy = FaultProxy(host, int(port))
    await proxy.start()
    yield server, proxy
    await proxy.close()
    await server.close()


async def _pull(address: str, timeout_s: float = 10.0) -> bytes:
    client = KVTransferClient(timeout_s=timeout_s)
    data = await client.pull(address, "h", HASHES, BLOCK, release=False)
    return bytes(data)


async def test_latency_slows_a_pull_but_it_arrives_intact(plane) -> None:
    server, proxy = plane
    proxy.faults = Faults(latency_s=0.002)
    assert await _pull(f"127.0.0.1:{proxy.port}") == _expected(HASHES)


async def test_a_truncated_stream_fails_the_pull_and_the_server_serves_on(plane) -> None:
    server, proxy = plane
    proxy.faults = Faults(truncate_after=BLOCK * 5 + 1000)  # mid-block, mid-frame
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        await _pull(f"127.0.0.1:{proxy.port}")
    assert time.monotonic() - t0 < 5  # failed at once, not at the timeout
    assert await _pull(server.address) == _expected(HASHES)


async def test_a_reset_mid_transfer_fails_the_pull(plane) -> None:
    server, proxy = plane
    proxy.faults = Faults(latency_s=0.02)  # ~64 chunks: over a second in flight
    pull = asyncio.create_task(_pull(f"127.0.0.1:{proxy.port}"))
    await asyncio.sleep(0.2)
    assert proxy.reset_all() > 0
    with pytest.raises(TransferError):
        await asyncio.wait_for(pull, 5)
    assert await _pull(server.address) == _expected(HASHES)


async def test_a_stalled_peer_fails_the_pull_at_the_timeout(plane) -> None:
    _, proxy = plane
    proxy.faults = Faults(latency_s=30.0)  # nothing gets through in time
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="took over"):
        await _pull(f"127.0.0.1:{proxy.port}", timeout_s=0.5)
    assert time.monotonic() - t0 < 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _generate(runtime: Runtime, worker: str, request: GenerateRequest) -> list[int]:
    stream = await runtime.call(worker, "generate", request, GenerateOutput)
    async with stream:
        return [t async for out in stream for t in out.token_ids]


@pytest.mark.integration
async def test_decode_worker_computes_the_prompt_itself_when_the_pull_breaks(
    tiny_llama: Path,
) -> None:
    engine = EngineConfig(model=str(tiny_llama), num_kv_blocks=128, max_model_len=256)
    data_port = _free_port()
    proxy = FaultProxy("127.0.0.1", data_port)
    await proxy.start()
    runtime = Runtime.local()
    # The prefill worker advertises the proxy: decode workers pull through it.
    pre_engines, pre = await start_engines(
        runtime,
        engine,
        1,
        "prefill",
        roles=["prefill"],
        data=DataPlaneConfig(port=data_port, advertise=f"127.0.0.1:{proxy.port}"),
    )
    dec_engines, dec = await start_engines(runtime, engine, 1, "decode", roles=["decode"])
    try:
        sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

        def request(i: int, prompt: list[int]) -> GenerateRequest:
            return GenerateRequest(
                request_id=f"r{i}",
                prompt_token_ids=prompt,
                sampling=sampling,
                remote_prefill=RemotePrefill(worker_id="prefill", hold_s=30.0),
            )

        prompts = [[(i * 31 + k) % 200 + 3 for k in range(100)] for i in range(3)]
        clean = await _generate(runtime, "decode", request(0, prompts[0]))
        assert dec[0].transfers.blocks_pulled == 6  # 100 tokens: 6 full blocks
        assert len(clean) == 8
        for i, faults in enumerate([Faults(truncate_after=3000), Faults(latency_s=0.01)], 1):
            proxy.faults = faults
            expected = await _generate(runtime, "decode", request(10 + i, prompts[i]))
            # the reference: the same prompt computed on the decode worker alone
            alone = GenerateRequest(
                request_id=f"ref{i}", prompt_token_ids=prompts[i], sampling=sampling
            )
            assert expected == await _generate(runtime, "prefill", alone)
        assert dec[0].transfers.pulls_failed == 1  # the truncated one
        assert dec[0].transfers.blocks_pulled == 12  # the clean and the slow one
        # The failed pull asked for release too, but the answer never arrived: the hold
        # lingers until its deadline, or the release the server took with the pull.
        deadline = time.monotonic() + 40
        while pre_engines[0].stats().kv_blocks_held and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert pre_engines[0].stats().kv_blocks_held == 0
    finally:
        await stop_engines(dec_engines, dec)
        await stop_engines(pre_engines, pre)
        await runtime.close()
        await proxy.close()


def test_data_plane_addresses() -> None:
    bound = DataPlaneConfig(host="0.0.0.0")
    assert bound.advertised("0.0.0.0", 4100) == "0.0.0.0:4100"
    named = DataPlaneConfig(host="0.0.0.0", port=4100, advertise="gpu-node-7")
    assert named.advertised("0.0.0.0", 4100) == "gpu-node-7:4100"
    assert [named.for_engine(i).port for i in range(3)] == [4100, 4101, 4102]
    assert DataPlaneConfig().for_engine(2).port == 0  # any free port, each its own
    proxied = DataPlaneConfig(advertise="proxy:9000")
    assert proxied.advertised("127.0.0.1", 4100) == "proxy:9000"
