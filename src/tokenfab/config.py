"""Typed settings for every component, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Literal

from tokenfab.protocol import WorkerRole

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
RouterPolicy = Literal["kv", "round_robin", "random", "least_loaded"]
LogitsFault = Literal["", "nan", "flip"]


@dataclass
class EngineConfig:
    model: str | None = None
    """HF folder or .gguf file; None means the default model (SmolLM2-135M-Instruct)."""
    dtype: Dtype = "auto"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None
    """None: size the pool from `kv_cache_memory_gb`."""
    kv_cache_memory_gb: float = 2.0
    max_model_len: int | None = None
    """None: the model's own context length."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    decode_max_prefill_tokens: int | None = 32
    """Prompt tokens one step computes while the worker has the decode role (None: up to
    max_num_batched_tokens); decode tokens are not limited. Small prompt chunks keep the
    prompts a decode worker computes itself (short ones, or any while the prefill workers are
    busy) from stalling its streams for a whole long step."""
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_waiting: int = 4096
    """Requests queued beyond this are refused (the frontend answers 503)."""
    num_threads: int | None = None
    seed: int = 0
    warm_up: bool = True
    """AsyncEngine runs one short request before serving (see LLMEngine.warm_up)."""
    fault: LogitsFault = ""
    """Fault injection for resilience tests, never for serving: from runner step
    `fault_after_steps` on, the runner poisons its logits with NaN ("nan") or negates them
    ("flip": silent corruption, wrong greedy tokens)."""
    fault_after_steps: int = 0
    # KV tiers below the engine's pool (tokenfab.kv): blocks evicted from G1 are kept there
    # and loaded back on a prefix hit instead of recomputed. All off by default.
    kv_host_gb: float = 0.0
    """G2: host shared memory for KV blocks (0: none)."""
    kv_host_name: str | None = None
    """Name of the G2 segment shared by the workers of a host (None: private to this engine)."""
    kv_disk_dir: str | None = None
    """G3: directory for KV extents (None: none); kept across restarts."""
    kv_disk_gb: float = 8.0
    kv_remote_url: str | None = None
    """G4: NATS server with JetStream holding KV blocks in an object store (None: none)."""
    kv_remote_bucket: str = "tokenfab-kv"
    kv_remote_gb: float = 8.0
    kv_offload_min_reuse: int = 0
    """Admit an evicted block to the tiers only if it served this many prefix hits."""

    def for_worker(self, worker_id: str, engines: int) -> EngineConfig:
        """This config for engine `worker_id` of `engines` on one host: a G3 directory of its
        own when several share the given one (a subdirectory named for the worker, so the
        worker restarted under its id finds its extents again; two engines cannot share one
        directory)."""
        if engines < 2 or not self.kv_disk_dir:
            return replace(self)
        return replace(self, kv_disk_dir=os.path.join(self.kv_disk_dir, worker_id))


@dataclass
class DataPlaneConfig:
    """Where a worker serves the KV blocks it holds for others (disaggregated serving)."""

    host: str = "127.0.0.1"
    """Address to bind (0.0.0.0: every interface, for decode workers on other hosts)."""
    port: int = 0
    """0: any free port; with several engines in one process, engine i binds port + i."""
    advertise: str | None = None
    """What others dial: a host (the bound port is added) or host:port (e.g. a proxy's);
    default: the bound address."""

    def for_engine(self, i: int) -> DataPlaneConfig:
        return replace(self, port=self.port + i if self.port else 0)

    def advertised(self, bound_host: str, bound_port: int) -> str:
        if not self.advertise:
            return f"{bound_host}:{bound_port}"
        if ":" in self.advertise.rsplit("]", 1)[-1]:
            return self.advertise
        return f"{self.advertise}:{bound_port}"


@dataclass
class EmbeddedPlanner:
    """`tokenfab serve --planner`: the planner run beside the serving stack, moving the
    deployment's own workers between the prefill and decode roles."""

    ttft_ms: float = 1000.0
    itl_ms: float = 100.0
    prefill_tps: float = 1000.0
    """Measured prompt tokens/s one worker computes (refined from load reports)."""
    decode_tps: float = 100.0
    """Measured output tokens/s one worker decodes."""
    budget: int | None = None
    """Most workers in all (default: the deployment's)."""
    interval_s: float = 10.0
    cooldown_s: float = 30.0


@dataclass
class ServerConfig:
    def roles(self) -> list[WorkerRole]:
        """Each engine worker's role, in start order."""
        if self.prefill_workers or self.decode_workers:
            if self.prefill_workers < 1 or self.decode_workers < 1:
                raise ValueError(
                    "disaggregated serving needs at least one prefill and one decode worker "
                    f"(got --prefill {self.prefill_workers} --decode {self.decode_workers})"
                )
            return ["prefill"] * self.prefill_workers + ["decode"] * self.decode_workers
        return ["aggregated"] * self.workers

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    workers: int = 1
    served_model_name: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    engine_processes: bool = True
    """Each engine in its own process (on a private runtime); False: all in the server's."""
    startup_timeout_s: float = 300.0
    """How long the engines may take to load before serving gives up."""
    router_policy: RouterPolicy = "kv"
    """How the frontend picks a worker: by KV overlap and load (kv), or round_robin, random,
    least_loaded."""
    router_overlap_weight: float = 1.0
    """Weight of prefill cost (uncached prompt blocks) against decode cost (active blocks)."""
    router_temperature: float = 0.0
    """0: always the cheapest worker; > 0: softmax sampling over costs."""
    router_seed: int = 0
    default_max_tokens: int | None = 1024
    """Chat requests without max_tokens generate at most this many (capped by the context's
    room); None: up to the whole room."""
    prefill_workers: int = 0
    """Disaggregated serving: this many prefill workers beside `decode_workers` decode
    workers (both > 0), instead of `workers` aggregated ones."""
    decode_workers: int = 0
    disagg_min_uncached_tokens: int = 256
    """Prompts missing fewer tokens on the decode worker are prefilled there."""
    disagg_max_prefill_queue_tokens: int = 16384
    """A prefill worker queued deeper than this is skipped (the decode worker prefills)."""
    external_router: bool = False
    """Ask a standalone `tokenfab router` on the runtime (routing here when none answers)."""
    planner: EmbeddedPlanner | None = None
    """Run the planner in the server (disaggregated deployments), None: no planner."""
    spares: int = 0
    """Extra engine workers kept registered but idle, swapped in when a serving one fails,
    hangs, straggles, drains or is quarantined."""
    drain_grace_s: float = 10.0
    """On SIGTERM a worker takes no new work and finishes its requests for up to this long;
    what is left then is migrated by the frontend."""
    hang_timeout_s: float = 1.5
    """A worker with requests and no engine step for this long (or 4 of its mean steps, if
    longer) is drained and its requests migrated."""
    canary_interval_s: float = 0.0
    """How often each worker answers a canary prompt whose greedy answer is known (the one
    its peers give); a mismatch quarantines it. 0: no canary (`tokenfab serve` defaults to
    30 s; the library to none, so embedded engines see only their callers' requests)."""
