"""The KV data plane over real loopback TCP: pulls arrive intact and in order, several blocks
per frame; bad, truncated or mislabeled frames are rejected with a TransferError and the
server goes on serving."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from tokenfab.kv.transfer import (
    KVDataServer,
    KVTransferClient,
    LocalDataPlane,
    TransferError,
    encode_frame,
    parse_address,
)
from tokenfab.protocol import KVFrameHeader

BLOCK = 1000


class FakeSource:
    """Blocks whose bytes are a function of their hash; one hold "h" over hashes 1..40."""

    block_bytes = BLOCK

    def __init__(self) -> None:
        self.held = {"h": set(range(1, 41))}
        self.released: list[str] = []

    async def read_blocks(self, hold_id: str, block_hashes: list[int]) -> memoryview:
        if not set(block_hashes) <= self.held.get(hold_id, set()):
            raise TransferError(f"blocks not held under {hold_id!r}")
        return memoryview(b"".join(bytes([h % 256]) * BLOCK for h in block_hashes))

    async def release(self, hold_id: str) -> None:
        self.released.append(hold_id)
        self.held.pop(hold_id, None)


def _expected(hashes: list[int]) -> bytes:
    return b"".join(bytes([h % 256]) * BLOCK for h in hashes)


async def _raw_exchange(address: str, payload: bytes) -> bytes:
    host, port = parse_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:  # the server closed on unread bytes: a rejection too
        data = b""
    writer.close()
    return data


def test_pull_over_tcp_many_blocks_per_frame_then_release() -> None:
    async def main() -> None:
        src = FakeSource()
        server = KVDataServer(src, blocks_per_frame=16)
        await server.start()
        client = KVTransferClient()
        hashes = list(range(3, 40))
        data = await client.pull(server.address, "h", hashes, BLOCK, release=False)
        assert bytes(data) == _expected(hashes)
        assert server.blocks_sent == 37 and src.released == []
        data = await client.pull(server.address, "h", [1, 2], BLOCK, release=True)
        assert bytes(data) == _expected([1, 2]) and src.released == ["h"]
        with pytest.raises(TransferError, match="refused"):  # released: nothing held now
            await client.pull(server.address, "h", [1], BLOCK)
        assert client.blocks_pulled == 39 and client.pulls_failed == 1
        await server.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        struct.pack("!4sI", b"TFKV", 1 << 30),  # header far over the limit
        struct.pack("!4sI", b"TFKV", 5) + b"\xc1\xc1\xc1\xc1\xc1",  # not msgpack
        struct.pack("!4sI", b"TFKV", 100) + b"short",  # truncated
        encode_frame(KVFrameHeader(kind="blocks", payload_bytes=3)) + b"abc",  # wrong kind
    ],
    ids=["http", "huge-header", "bad-msgpack", "truncated", "wrong-kind"],
)
def test_bad_frames_are_rejected_and_the_server_keeps_serving(garbage: bytes) -> None:
    async def main() -> None:
        server = KVDataServer(FakeSource())
        await server.start()
        answer = await _raw_exchange(server.address, garbage)
        # Either an error frame back, or (truncated input) just a closed connection.
        assert answer == b"" or b"error" in answer
        assert server.frames_rejected == 1
        data = await KVTransferClient().pull(server.address, "h", [5, 6], BLOCK, release=False)
        assert bytes(data) == _expected([5, 6])
        await server.close()

    asyncio.run(main())


async def _fake_server(frames: bytes) -> tuple[socket.socket, str, asyncio.Task[None]]:
    """A peer that reads a pull and answers with these raw bytes, then closes."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.setblocking(False)

    async def serve() -> None:
        conn, _ = await loop.sock_accept(lsock)
        await loop.sock_recv(conn, 65536)
        await loop.sock_sendall(conn, frames)
        conn.close()

    host, port = lsock.getsockname()
    return lsock, f"{host}:{port}", loop.create_task(serve())


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        (
            encode_frame(KVFrameHeader(kind="blocks", block_hashes=[9], block_bytes=BLOCK,
                                       payload_bytes=BLOCK)) + b"x" * BLOCK,
            "not asked for",
        ),
        (
            encode_frame(KVFrameHeader(kind="blocks", block_hashes=[1], block_bytes=BLOCK,
                                       payload_bytes=BLOCK, checksum=1)) + b"x" * BLOCK,
            "checksum",
        ),
        (
            encode_frame(KVFrameHeader(kind="blocks", block_hashes=[1], block_bytes=BLOCK,
                                       payload_bytes=BLOCK)) + b"x" * 10,
            "closed after 10",
        ),
        (encode_frame(KVFrameHeader(kind="done")), "sent 0 of 1"),
    ],
    ids=["unasked-hash", "checksum", "truncated-payload", "too-few"],
)  # fmt: skip
def test_client_rejects_bad_answers(frames: bytes, error: str) -> None:
    async def main() -> None:
        lsock, address, task = await _fake_server(frames)
        with pytest.raises(TransferError, match=error):
            await KVTransferClient(timeout_s=10).pull(address, "h", [1], BLOCK)
        await task
        lsock.close()

    asyncio.run(main())


def test_in_process_pull_is_a_copy() -> None:
    async def main() -> None:
        plane = LocalDataPlane()
        src = FakeSource()
        address = plane.register("w0", src)
        data = await KVTransferClient(plane).pull(address, "h", [7, 8], BLOCK)
        assert bytes(data) == _expected([7, 8]) and src.released == ["h"]
        with pytest.raises(TransferError, match="no in-process"):
            await KVTransferClient(plane).pull("inproc://nope", "h", [7], BLOCK)

    asyncio.run(main())
