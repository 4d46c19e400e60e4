"""Plan -> deployment: the settings and Kubernetes manifests of one planned point.

`tokenfab plan ... --emit DIR` writes, for the chosen deployment:
- `deployment.json`: roles (aggregated, or prefill + decode), worker counts, each worker's
  parallelism and batch limits, the engine backend and its launch arguments, and the
  `capacity` block (the prediction with its error bars) that an autoscaling planner reads;
- `serve.sh`: the `tokenfab frontend` / `tokenfab worker` commands of that deployment;
- `k8s.yaml`: apply-able manifests: a ConfigMap with deployment.json, per role a
  Deployment (a worker fits on one node) or a StatefulSet plus headless Service (a worker
  spans nodes: pod ordinal // nodes-per-worker is the worker, ordinal % nodes-per-worker its
  node rank), and the frontend Deployment + Service.

Everything is derived from the search's `Candidate` and the query; nothing is predicted here.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from tokenfab.factory.errorbars import ErrorBars
from tokenfab.factory.perf import Layout
from tokenfab.factory.search import Candidate, PlanQuery, layout_dict
from tokenfab.factory.serving import AggDeployment

DEFAULT_IMAGE = "ghcr.io/tokenfab/tokenfab:latest"
RUNTIME_URL = "nats://tokenfab-runtime:4222"
FRONTEND_PORT = 8000


@dataclass(frozen=True)
class Role:
    """One pool of identical workers."""

    name: str  # aggregated | prefill | decode
    workers: int
    layout: Layout
    max_num_seqs: int  # running sequences per worker
    max_num_batched_tokens: int  # tokens per step per worker


def roles_of(c: Candidate, q: PlanQuery) -> list[Role]:
    """The worker pools of a planned point (replicas of a disaggregated unit multiply its
    pools)."""
    d = c.deployment
    if isinstance(d, AggDeployment):
        # one prompt chunk per attention-DP rank plus the decode batch fits a step
        tokens = max(q.isl, 2048) * d.layout.attn_dp + d.concurrency
        return [Role("aggregated", c.replicas, d.layout, d.concurrency, tokens)]
    pre = Role(
        "prefill",
        c.replicas * d.prefill_workers,
        d.prefill_layout,
        d.prefill_batch,
        q.isl * d.prefill_batch,
    )
    dec = Role(
        "decode", c.replicas * d.decode_workers, d.decode_layout, d.decode_batch, d.decode_batch
    )
    return [pre, dec]


def engine_args(backend: str, role: Role, model: str, nodes: int = 1) -> list[str]:
    """Launch command of the engine backend for one worker of a role (flags of vLLM
    `vllm serve`, SGLang `sglang.launch_server`, TensorRT-LLM `trtllm-serve`)."""
    lay = role.layout
    if backend == "sglang":
        args = ["python", "-m", "sglang.launch_server", "--model-path", model]
        args += ["--tp-size", str(lay.tp * lay.attn_dp), "--pp-size", str(lay.pp)]
        if lay.attn_dp > 1:
            args += ["--dp-size", str(lay.attn_dp), "--enable-dp-attention"]
        if lay.ep > 1:
            args += ["--ep-size", str(lay.ep)]
        args += ["--max-running-requests", str(role.max_num_seqs)]
        if nodes > 1:  # each pod adds --node-rank and --dist-init-addr (StatefulSet ordinal)
            args += ["--nnodes", str(nodes)]
        if role.name != "aggregated":
            args += ["--disaggregation-mode", role.name]
        return args
    if backend == "vllm":
        args = ["vllm", "serve", model, "--tensor-parallel-size", str(lay.tp)]
        args += ["--pipeline-parallel-size", str(lay.pp)]
        if lay.attn_dp > 1:
            args += ["--data-parallel-size", str(lay.attn_dp)]
        if lay.ep > 1:
            args += ["--enable-expert-parallel"]
        return args + ["--max-num-seqs", str(role.max_num_seqs)]
    args = ["trtllm-serve", model, "--tp_size", str(lay.tp * lay.attn_dp)]
    args += ["--pp_size", str(lay.pp), "--ep_size", str(lay.ep)]
    return args + ["--max_batch_size", str(role.max_num_seqs)]


def capacity(c: Candidate, q: PlanQuery, bars: ErrorBars) -> dict:
    """What a worker pool delivers at the planned point, with its error bars: the figures
    a planner scales workers by (requests/s and output tokens/s per GPU at this batch,
    within these latencies)."""
    p = c.prediction
    (tl, th), (pl, ph) = bars.interval(c.mode, q.backend, p.ttft_ms, p.tpot_ms)
    lo, hi = bars.throughput_factors(c.mode, q.backend, p.ttft_ms, p.tpot_ms, q.osl)
    if not bars.known:  # no held-out errors shipped: no interval rather than a point
        return {"users": c.users, "requests_per_s": round(c.replicas * p.requests_per_s, 4),
                "tokens_per_s_per_gpu": round(c.tokens_per_s_per_gpu, 3),
                "ttft_ms": round(p.ttft_ms, 3), "tpot_ms": round(p.tpot_ms, 4)}  # fmt: skip
    return {
        "users": c.users,
        "requests_per_s": round(c.replicas * p.requests_per_s, 4),
        "requests_per_s_interval": [
            round(c.replicas * p.requests_per_s * lo, 4),
            round(c.replicas * p.requests_per_s * hi, 4),
        ],
        "tokens_per_s_per_gpu": round(c.tokens_per_s_per_gpu, 3),
        "ttft_ms": round(p.ttft_ms, 3),
        "ttft_ms_interval": [round(tl, 3), round(th, 3)],
        "tpot_ms": round(p.tpot_ms, 4),
        "tpot_ms_interval": [round(pl, 4), round(ph, 4)],
        "interval_level": bars.level,
    }


def settings(c: Candidate, q: PlanQuery, model_ref: str, bars: ErrorBars) -> dict:
    """deployment.json: everything needed to run the planned point."""
    backend = q.backend or "trtllm"
    return {
        "model": model_ref,
        "system": q.system.key,
        "gpus": q.gpus,
        "gpus_used": c.gpus_used,
        "mode": c.mode,
        "describe": c.describe(),
        "engine_backend": backend,
        "isl": q.isl,
        "osl": q.osl,
        "limits": {"ttft_ms": q.ttft_ms, "tpot_ms": q.tpot_ms},
        "roles": [
            {
                "role": r.name,
                "workers": r.workers,
                "gpus_per_worker": r.layout.num_gpus,
                "nodes_per_worker": nodes_per_worker(r.layout, q),
                "layout": layout_dict(r.layout),
                "max_num_seqs": r.max_num_seqs,
                "max_num_batched_tokens": r.max_num_batched_tokens,
                "engine_command": engine_args(backend, r, model_ref, nodes_per_worker(r.layout, q)),
            }
            for r in roles_of(c, q)
        ],
        "capacity": capacity(c, q, bars),
    }


def nodes_per_worker(lay: Layout, q: PlanQuery) -> int:
    return max(1, math.ceil(lay.num_gpus / max(q.system.gpus_per_node, 1)))


def serve_script(s: dict) -> str:
    """serve.sh: the tokenfab runtime, frontend and one `tokenfab worker` per role."""
    lines = [
        "#!/bin/sh",
        f"# {s['describe']} on {s['gpus_used']} of {s['gpus']} x {s['system']} "
        f"({s['mode']}, engine backend {s['engine_backend']}); generated by tokenfab plan --emit",
        "set -e",
        "nats-server -p 4222 &",
        f"tokenfab frontend --runtime nats://127.0.0.1:4222 --port {FRONTEND_PORT} &",
    ]
    for r in s["roles"]:
        w = [
            "tokenfab", "worker", "--runtime", "nats://127.0.0.1:4222",
            "--namespace", "default", "--worker-id", f"{r['role']}-$i",
            "--model", s["model"],
            "--max-num-seqs", str(r["max_num_seqs"]),
            "--max-num-batched-tokens", str(r["max_num_batched_tokens"]),
        ]  # fmt: skip
        lines.append(f"# role {r['role']}: {r['workers']} worker(s), layout {r['layout']}")
        lines.append(f"# engine: {shlex.join(r['engine_command'])}")
        cmd = " ".join(shlex.quote(a) if "$" not in a else f'"{a}"' for a in w)
        lines.append(f"for i in $(seq 1 {r['workers']}); do {cmd} & done")
    return "\n".join([*lines, "wait", ""])


def _name(role: str) -> str:
    return f"tokenfab-{role}"


def _container(name: str, args: list[str], image: str, gpus: int, role: str) -> dict:
    c: dict = {
        "name": name,
        "image": image,
        "command": args,
        "env": [
            {"name": "TOKENFAB_ROLE", "value": role},
            {"name": "TOKENFAB_RUNTIME", "value": RUNTIME_URL},
        ],
    }
    if gpus:
        c["resources"] = {"limits": {"nvidia.com/gpu": gpus}}
    return c


def _workload(r: dict, image: str, gpus_per_node: int) -> list[dict]:
    """Deployment for a worker on one node; StatefulSet + headless Service across nodes."""
    name = _name(r["role"])
    nodes = r["nodes_per_worker"]
    labels = {"app": name, "tokenfab/role": r["role"]}
    gpus = min(r["gpus_per_worker"], gpus_per_node)
    pod = {
        "metadata": {"labels": labels},
        "spec": {"containers": [_container("engine", r["engine_command"], image, gpus, r["role"])]},
    }
    if nodes == 1:
        return [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "replicas": r["workers"],
                    "selector": {"matchLabels": labels},
                    "template": pod,
                },
            }
        ]
    pod["spec"]["containers"][0]["env"].append(
        {"name": "TOKENFAB_NODES_PER_WORKER", "value": str(nodes)}
    )
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "clusterIP": "None",
            "selector": labels,
            "ports": [{"name": "dist", "port": 29500}],
        },
    }
    sts = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "serviceName": name,
            "replicas": r["workers"] * nodes,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": pod,
        },
    }
    return [svc, sts]


def manifests(s: dict, image: str = DEFAULT_IMAGE, gpus_per_node: int = 8) -> list[dict]:
    """The Kubernetes objects of a deployment.json."""
    fe_labels = {"app": _name("frontend")}
    fe_args = ["tokenfab", "frontend", "--runtime", RUNTIME_URL, "--host", "0.0.0.0"]
    fe_args += ["--port", str(FRONTEND_PORT)]
    out: list[dict] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "tokenfab-plan"},
            "data": {"deployment.json": json.dumps(s, indent=1)},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": _name("frontend"), "labels": fe_labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": fe_labels},
                "template": {
                    "metadata": {"labels": fe_labels},
                    "spec": {"containers": [_container("frontend", fe_args, image, 0, "frontend")]},
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": _name("frontend")},
            "spec": {"selector": fe_labels, "ports": [{"name": "http", "port": FRONTEND_PORT}]},
        },
    ]
    for r in s["roles"]:
        out += _workload(r, image, gpus_per_node)
    return out


def emit(c: Candidate, q: PlanQuery, model_ref: str, bars: ErrorBars, out_dir: Path) -> list[Path]:
    """Write deployment.json, serve.sh and k8s.yaml into out_dir; returns the paths."""
    import yaml

    s = settings(c, q, model_ref, bars)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "deployment.json", out_dir / "serve.sh", out_dir / "k8s.yaml"]
    paths[0].write_text(json.dumps(s, indent=1) + "\n")
    paths[1].write_text(serve_script(s))
    paths[1].chmod(0o755)
    docs = manifests(s, gpus_per_node=q.system.gpus_per_node)
    paths[2].write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return paths
