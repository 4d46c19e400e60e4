"""Chaos run: 4 tokenfab engine workers (tiny random model, engine processes on a private NATS
server) under steady closed-loop load while a fault schedule runs: SIGKILL of one engine,
SIGSTOP/SIGCONT of another, a third whose logits turn to NaN, and the NATS server killed (it
is restarted by the supervisor). Prints requests sent, completed, failed, migrated and the
detection times (fault to the frontend draining or dropping the worker).

    PYTHONPATH=src python benchmarks/chaos.py [--json] [--requests 800] [--concurrency 8]

Goal: failed = 0 and detect_max_s <= 3. There is no peer here: the figure is tokenfab's own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tokenfab.config import EngineConfig, ServerConfig
from tokenfab.engine.tools.tiny import make_tiny_model
from tokenfab.serve.server import ServerThread


def one_request(client: httpx.Client, model: str, i: int, max_tokens: int) -> bool:
    body = {
        "model": model, "prompt": f"chaos request {i}: once upon a time", "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "ignore_eos": True,
    }  # fmt: skip
    try:
        with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return False
            text = "".join(r.iter_lines())
        return '"error"' not in text and "[DONE]" in text and '"finish_reason":"length"' in text
    except httpx.HTTPError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    model = make_tiny_model(Path(tempfile.mkdtemp(prefix="chaos-")) / "llama", "llama", seed=0)
    engine = EngineConfig(model=str(model), num_kv_blocks=512, max_model_len=256, num_threads=1)
    nan_worker = dataclasses.replace(engine, fault="nan", fault_after_steps=400)
    server = ServerConfig(port=0, workers=4, engine_processes=True, router_policy="round_robin")
    srv = ServerThread(engine, server, engine_overrides={"worker-3": nan_worker})
    url = srv.start()
    assert srv.stack is not None and srv.stack.processes is not None and srv.stack.pool
    procs, pool = srv.stack.processes, srv.stack.pool
    faults: list[tuple[float, str, str]] = []  # (time, worker, kind)
    done = threading.Event()

    def schedule() -> None:
        steps = [
            (2.0, "kill", "worker-0"),
            (5.0, "stop", "worker-1"),
            (9.0, "cont", "worker-1"),
            (12.0, "nats", ""),
        ]
        t0 = time.monotonic()
        for at, kind, wid in steps:
            while time.monotonic() - t0 < at:
                if done.wait(0.05):
                    return
            now = time.monotonic()
            if kind == "kill":
                os.kill(procs.pid_of(wid), signal.SIGKILL)
            elif kind == "stop":
                os.kill(procs.pid_of(wid), signal.SIGSTOP)
            elif kind == "cont":
                os.kill(procs.pid_of(wid), signal.SIGCONT)
            elif procs.nats is not None and procs.nats.pid is not None:
                os.kill(procs.nats.pid, signal.SIGKILL)
            faults.append((now, wid, kind))

    chaos = threading.Thread(target=schedule)
    ok = 0
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            name = client.get("/v1/models").json()["data"][0]["id"]
            chaos.start()
            with ThreadPoolExecutor(args.concurrency) as ex:
                results = list(
                    ex.map(
                        lambda i: one_request(client, name, i, args.max_tokens),
                        range(args.requests),
                    )
                )
            ok = sum(results)
            metrics = client.get("/metrics").text
    finally:
        done.set()
        chaos.join(30)
        for _, wid, kind in faults:  # never leave a stopped engine behind
            if kind == "stop":
                with contextlib.suppress(ProcessLookupError, KeyError):
                    os.kill(procs.pid_of(wid), signal.SIGCONT)
        srv.stop()
    m = re.search(r"^tokenfab_request_migrations_total (\S+)$", metrics, re.M)
    migrated = int(float(m.group(1))) if m else 0
    detects = []
    for at, wid, kind in faults:
        if kind in ("kill", "stop"):
            seen = [t for t, w, _ in pool.incidents if w == wid and t >= at]
            if seen:
                detects.append(seen[0] - at)
    quarantined = any(w == "worker-3" and r == "quarantined" for _, w, r in pool.incidents)
    out = {
        "sent": args.requests,
        "completed": ok,
        "failed": args.requests - ok,
        "migrated": migrated,
        "detect_p50_s": round(statistics.median(detects), 3) if detects else None,
        "detect_max_s": round(max(detects), 3) if detects else None,
        "nan_worker_quarantined": quarantined,
        "faults": [kind for _, _, kind in faults],
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>24}: {v}")
        goal = out["failed"] == 0 and detects and max(detects) <= 3.0
        print(f"{'goal (failed=0, detect<=3s)':>24}: {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
