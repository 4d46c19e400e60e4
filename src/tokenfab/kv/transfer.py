"""Moving KV blocks between workers: the data plane of disaggregated serving.

A worker that holds blocks for others (a prefill worker) serves them with `KVDataServer` on a
TCP address it advertises in its `WorkerInfo.data_address`; a worker that needs them (a decode
worker) pulls with `KVTransferClient`. In one process (`tokenfab serve --in-process`) the
client copies straight from the source (`LocalDataPlane`, addresses `inproc://<id>`).

Wire format, both directions, no pickle:

    frame   = magic b"TFKV" | u32 header length (big-endian) | header | payload
    header  = msgpack KVFrameHeader (protocol.py)
    payload = header.payload_bytes raw bytes (concatenated blocks for kind "blocks")

A pull is one "pull" frame (hold id, wanted hashes in chain order, release flag); the answer
is "blocks" frames of up to `blocks_per_frame` blocks each, then "done" — or an "error" frame.
The receiver checks every frame: magic, sizes under limits, the blocks' hashes are exactly the
next ones it asked for, the payload's xxh3-64. Anything else is a `TransferError` and the
connection is dropped; the server keeps serving other connections.

The bytes are read straight into one preallocated buffer (`sock_recv_into`) and sent from the
source's buffer (`sock_sendall`), so a block is copied once on each side beyond the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import Protocol

import msgspec
import xxhash

from tokenfab.protocol import KVFrameHeader

log = logging.getLogger(__name__)

MAGIC = b"TFKV"
_PREFIX = struct.Struct("!4sI")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 30
BLOCKS_PER_FRAME = 16
"""Blocks per message: large enough that per-frame costs vanish, small enough that the sender
can read the next frame's blocks while the kernel sends this one."""
LOCAL_SCHEME = "inproc://"
SOCKET_BUFFER_BYTES = 4 << 20

_header_decoder = msgspec.msgpack.Decoder(KVFrameHeader)
_encoder = msgspec.msgpack.Encoder()


class TransferError(RuntimeError):
    """A pull failed: the peer is gone, sent a bad frame, or refused (e.g. unknown hold)."""


class BlockSource(Protocol):
    """What a data server serves: held blocks by (hold id, hashes)."""

    block_bytes: int

    async def read_blocks(self, hold_id: str, block_hashes: list[int]) -> memoryview:
        """The blocks' bytes, concatenated in the order asked; raises TransferError if any
        is not held under `hold_id`."""
        ...

    async def release(self, hold_id: str) -> None: ...


def encode_frame(header: KVFrameHeader) -> bytes:
    """Magic, length and header of a frame (its payload, if any, follows separately)."""
    body = _encoder.encode(header)
    return _PREFIX.pack(MAGIC, len(body)) + body


async def _recv_exact(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, buf: memoryview
) -> None:
    got = 0
    while got < len(buf):
        n = await loop.sock_recv_into(sock, buf[got:])
        if n == 0:
            raise TransferError(f"connection closed after {got} of {len(buf)} bytes")
        got += n


async def read_header(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> KVFrameHeader:
    """One frame's header, checked (magic, size limits, a decodable KVFrameHeader)."""
    prefix = bytearray(_PREFIX.size)
    await _recv_exact(loop, sock, memoryview(prefix))
    magic, size = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise TransferError(f"bad frame: magic {bytes(magic)!r} is not {MAGIC!r}")
    if size > MAX_HEADER_BYTES:
        raise TransferError(f"bad frame: header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    body = bytearray(size)
    await _recv_exact(loop, sock, memoryview(body))
    try:
        header = _header_decoder.decode(body)
    except msgspec.DecodeError as e:
        raise TransferError(f"bad frame header: {e}") from None
    if not 0 <= header.payload_bytes <= MAX_PAYLOAD_BYTES:
        raise TransferError(f"bad frame: payload of {header.payload_bytes} bytes")
    return header


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TransferError(f"bad data-plane address {address!r} (want host:port)")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------------- server


class KVDataServer:
    """Serves a BlockSource's held blocks over TCP."""

    def __init__(
        self,
        source: BlockSource,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        blocks_per_frame: int = BLOCKS_PER_FRAME,
    ) -> None:
        """What others dial may differ from the bound address (a proxy, a routable name when
        binding 0.0.0.0): the worker decides it (`config.DataPlaneConfig.advertised`)."""
        self.source = source
        self.host = host
        self.port = port
        self.blocks_per_frame = blocks_per_frame
        self._sock: socket.socket | None = None
        self._accept: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.frames_rejected = 0
        self.blocks_sent = 0

    @property
    def address(self) -> str:
        """The bound host:port."""
        assert self._sock is not None, "not started"
        host, port = self._sock.getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        self._accept = asyncio.get_running_loop().create_task(self._accept_loop(sock))

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
            task = loop.create_task(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    header = await read_header(loop, conn)
                except TransferError as e:
                    if "closed after 0 of" not in str(e):  # not a clean close between pulls
                        self.frames_rejected += 1
                        log.warning("KV data plane: rejected a frame: %s", e)
                        await self._send_error(loop, conn, str(e))
                    return
                if header.kind != "pull" or header.payload_bytes:
                    self.frames_rejected += 1
                    await self._send_error(loop, conn, f"expected a pull frame, got {header.kind}")
                    return
                await self._answer(loop, conn, header)
        except (ConnectionError, OSError) as e:
            log.info("KV data plane: connection dropped: %s", e)
        finally:
            conn.close()

    async def _answer(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, pull: KVFrameHeader
    ) -> None:
        src = self.source
        hashes = pull.block_hashes
        try:
            for start in range(0, len(hashes), self.blocks_per_frame):
                chunk = hashes[start : start + self.blocks_per_frame]
                data = await src.read_blocks(pull.hold_id, chunk)
                head = KVFrameHeader(
                    kind="blocks",
                    hold_id=pull.hold_id,
                    block_hashes=chunk,
                    block_bytes=src.block_bytes,
                    payload_bytes=len(data),
                    checksum=xxhash.xxh3_64_intdigest(data),
                )
                await loop.sock_sendall(conn, encode_frame(head))
                await loop.sock_sendall(conn, data)
                self.blocks_sent += len(chunk)
        except TransferError as e:
            await self._send_error(loop, conn, str(e))
            return
        await loop.sock_sendall(conn, encode_frame(KVFrameHeader(kind="done")))
        if pull.release:
            await src.release(pull.hold_id)

    async def _send_error(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, message: str
    ) -> None:
        with contextlib.suppress(OSError):
            await loop.sock_sendall(
                conn, encode_frame(KVFrameHeader(kind="error", message=message))
            )

    async def close(self) -> None:
        tasks = [t for t in (self._accept, *self._conns) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# ---------------------------------------------------------------------- client


class LocalDataPlane:
    """Block sources of workers in this process, by address `inproc://<name>`: a pull from
    one of them is a copy, no socket."""

    def __init__(self) -> None:
        self._sources: dict[str, BlockSource] = {}

    def register(self, name: str, source: BlockSource) -> str:
        address = f"{LOCAL_SCHEME}{name}"
        self._sources[address] = source
        return address

    def unregister(self, address: str) -> None:
        self._sources.pop(address, None)

    def source(self, address: str) -> BlockSource:
        src = self._sources.get(address)
        if src is None:
            raise TransferError(f"no in-process KV source at {address}")
        return src


class KVTransferClient:
    def __init__(self, local: LocalDataPlane | None = None, timeout_s: float = 30.0) -> None:
        self.local = local
        self.timeout_s = timeout_s
        self.blocks_pulled = 0
        self.pulls_failed = 0

    async def pull(
        self,
        address: str,
        hold_id: str,
        block_hashes: list[int],
        block_bytes: int,
        *,
        release: bool = True,
    ) -> memoryview:
        """The blocks' bytes, concatenated in chain order. Raises TransferError (the peer
        died, refused, sent a bad or truncated frame, or took longer than the timeout)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                if address.startswith(LOCAL_SCHEME):
                    data = await self._pull_local(address, hold_id, block_hashes, release)
                else:
                    data = await self._pull_tcp(
                        address, hold_id, block_hashes, block_bytes, release
                    )
        except TimeoutError:
            self.pulls_failed += 1
            raise TransferError(f"pull from {address} took over {self.timeout_s:.0f}s") from None
        except (TransferError, OSError) as e:
            self.pulls_failed += 1
            if isinstance(e, TransferError):
                raise
            raise TransferError(f"pull from {address} failed: {e}") from None
        self.blocks_pulled += len(block_hashes)
        return data

    async def _pull_local(
        self, address: str, hold_id: str, hashes: list[int], release: bool
    ) -> memoryview:
        assert self.local is not None, "no in-process data plane"
        src = self.local.source(address)
        data = await src.read_blocks(hold_id, hashes)
        if release:
            await src.release(hold_id)
        return data

    async def _pull_tcp(
        self, address: str, hold_id: str, hashes: list[int], block_bytes: int, release: bool
    ) -> memoryview:
        loop = asyncio.get_running_loop()
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        # Large kernel buffers: fewer wake-ups per megabyte (measured in benchmarks/README.md).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        try:
            await loop.sock_connect(sock, (host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pull = KVFrameHeader(kind="pull", hold_id=hold_id, block_hashes=hashes, release=release)
            await loop.sock_sendall(sock, encode_frame(pull))
            out = memoryview(bytearray(len(hashes) * block_bytes))
            got = 0
            while True:
                header = await read_header(loop, sock)
                if header.kind == "error":
                    raise TransferError(f"{address} refused the pull: {header.message}")
                if header.kind == "done":
                    break
                got = await _receive_blocks(loop, sock, header, hashes, got, block_bytes, out)
            if got != len(hashes):
                raise TransferError(f"{address} sent {got} of {len(hashes)} blocks")
            return out
        finally:
            sock.close()


async def _receive_blocks(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    header: KVFrameHeader,
    wanted: list[int],
    got: int,
    block_bytes: int,
    out: memoryview,
) -> int:
    """Check a "blocks" frame against what was asked and read its payload into place;
    returns the blocks received so far."""
    n = len(header.block_hashes)
    if header.kind != "blocks":
        raise TransferError(f"bad frame: unexpected kind {header.kind!r}")
    if header.block_hashes != wanted[got : got + n] or n == 0:
        raise TransferError("bad frame: blocks out of order or not asked for")
    if header.block_bytes != block_bytes or header.payload_bytes != n * block_bytes:
        raise TransferError(
            f"bad frame: {header.payload_bytes} bytes of {header.block_bytes}-byte blocks for "
            f"{n} blocks of {block_bytes}"
        )
    view = out[got * block_bytes : (got + n) * block_bytes]
    await _recv_exact(loop, sock, view)
    if xxhash.xxh3_64_intdigest(view) != header.checksum:
        raise TransferError("bad frame: payload checksum mismatch")
    return got + n
