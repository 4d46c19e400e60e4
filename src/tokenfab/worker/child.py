"""The body of one engine process that `tokenfab serve` starts:
`python -m tokenfab.worker.child '<ChildSpec as JSON>'`.

Not a user command (that is `tokenfab worker`): the spec carries the whole engine config, so no
option has to be spelled twice.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable

import msgspec

from tokenfab.config import EngineConfig
from tokenfab.protocol import WorkerRole

_PR_SET_PDEATHSIG = 1


def libc_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


def die_with_parent(prctl: Callable[..., int] | None = None) -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so a killed server leaves no
    engine or nats-server behind (engines also poll their parent). No-op elsewhere."""
    prctl = prctl or libc_prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildSpec(msgspec.Struct, frozen=True):
    runtime_url: str
    namespace: str
    worker_id: str
    engine: EngineConfig
    parent_pid: int
    log_level: str = "info"
    cpus: list[int] | None = None
    """CPU affinity of this engine process; None: every CPU of the parent."""
    switch_interval_s: float = 1e-4
    role: WorkerRole = "aggregated"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tokenfab.worker.child SPEC_JSON", file=sys.stderr)
        return 2
    spec = msgspec.json.decode(args[0], type=ChildSpec)
    die_with_parent()
    if os.getppid() != spec.parent_pid:  # the parent died before the line above
        return 0
    if spec.cpus and hasattr(os, "sched_setaffinity"):
        # Before torch starts its thread pool, so the pool is sized to these CPUs.
        os.sched_setaffinity(0, spec.cpus)
    sys.setswitchinterval(spec.switch_interval_s)
    logging.basicConfig(
        level=spec.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {spec.worker_id} %(name)s: %(message)s",
    )
    from tokenfab.worker.launch import run_worker

    try:
        asyncio.run(
            run_worker(
                spec.engine,
                spec.runtime_url,
                spec.namespace,
                spec.worker_id,
                parent_pid=spec.parent_pid,
                role=spec.role,
            )
        )
    except KeyboardInterrupt:
        return 0
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {spec.worker_id}: {e or type(e).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
