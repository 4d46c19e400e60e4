"""A TCP fault proxy for chaos tests (asyncio): forwards loopback connections to a target and
injects latency, connection resets and truncated streams on command."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field


@dataclass
class Faults:
    latency_s: float = 0.0
    """Delay added to every chunk forwarded (both directions)."""
    truncate_after: int | None = None
    """Close a connection (FIN, mid-message) after this many bytes downstream."""


@dataclass
class FaultProxy:
    target_host: str
    target_port: int
    faults: Faults = field(default_factory=Faults)
    port: int = 0
    connections: int = 0
    """Connections accepted so far."""
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_w}
        budget = [self.faults.truncate_after]
        await asyncio.gather(
            self._pipe(reader, up_w, None), self._pipe(up_r, writer, budget),
            return_exceptions=True,
        )  # fmt: skip
        for w in (writer, up_w):
            self._writers.discard(w)
            w.close()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, budget: list[int | None] | None
    ) -> None:
        try:
            while data := await src.read(65536):
                if self.faults.latency_s:
                    await asyncio.sleep(self.faults.latency_s)
                if budget is not None and budget[0] is not None:
                    data = data[: budget[0]]
                    budget[0] -= len(data)
                dst.write(data)
                await dst.drain()
                if budget is not None and budget[0] == 0:
                    break  # truncated: the peer sees the stream end mid-message
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    def reset_all(self) -> int:
        """Reset every open connection (RST, not FIN); returns how many were reset."""
        n = 0
        for w in list(self._writers):
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
            n += 1
        self._writers.clear()
        return n

    async def close(self) -> None:
        self.reset_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
