"""Typed settings for every component, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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


@dataclass
class ServerConfig:
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
    external_router: bool = False
    """Ask a standalone `tokenfab router` on the runtime (routing here when none answers)."""
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
