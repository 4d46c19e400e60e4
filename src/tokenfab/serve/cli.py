"""Serving commands: `tokenfab serve` (the frontend, and N engine workers in processes of their
own), and the distributed shape: `tokenfab worker` and `tokenfab frontend` on a shared NATS runtime.

Heavy imports (torch, fastapi, uvicorn) happen inside the commands, so `tokenfab --help` is fast.
"""

from __future__ import annotations

from typing import Any

import typer

MODEL_HELP = "HF model folder or .gguf file. Default: SmolLM2-135M-Instruct (bundled GGUF)."
RUNTIME_HELP = "Runtime to join: nats://host:port (start one with the `nats-server` binary)."
ROUTER_HELP = (
    "How requests pick a worker: kv (the worker holding most of the prompt's KV blocks, "
    "weighed against load), round_robin, random, least_loaded."
)
POLICIES = ("kv", "round_robin", "random", "least_loaded")
# Options the serve and frontend commands share (typer reads these defaults as declarations).
DEFAULT_MAX_TOKENS_OPTION = typer.Option(
    1024, min=0, help="Cap for chat requests without max_tokens (0: the context's room)."
)
ROUTER_OPTION = typer.Option("kv", "--router", help=ROUTER_HELP)
OVERLAP_WEIGHT_OPTION = typer.Option(
    1.0, help="kv router: weight of uncached prompt blocks against active blocks."
)
ROUTER_TEMPERATURE_OPTION = typer.Option(
    0.0, help="kv router: 0 picks the cheapest worker; > 0 samples (softmax of costs)."
)

DECODE_BUDGET_OPTION = typer.Option(
    32,
    "--decode-max-prefill-tokens",
    min=0,
    help="Prompt tokens one step computes on decode-role workers (0: no limit beyond "
    "--max-num-batched-tokens). Small chunks keep the prompts a decode worker computes itself "
    "from stalling its streams.",
)
KV_HOST_OPTION = typer.Option(
    0.0,
    "--kv-host-gb",
    min=0.0,
    help="KV tier G2: GiB of host shared memory keeping blocks evicted from the engines' pools "
    "(serve: one segment shared by all its workers). 0: none.",
)
KV_DISK_OPTION = typer.Option(
    None,
    "--kv-disk-dir",
    help="KV tier G3: directory keeping evicted blocks on disk, kept across restarts (with "
    "several engines, one subdirectory per worker id).",
)
KV_DISK_GB_OPTION = typer.Option(8.0, "--kv-disk-gb", min=0.0, help="G3 capacity per engine, GiB.")
KV_REMOTE_OPTION = typer.Option(
    None,
    "--kv-remote",
    help="KV tier G4: nats://host:port of a NATS server with JetStream (`nats-server -js`) "
    "keeping evicted blocks in an object store shared by every host.",
)
KV_REMOTE_GB_OPTION = typer.Option(8.0, "--kv-remote-gb", min=0.0, help="G4 capacity, GiB.")
KV_MIN_REUSE_OPTION = typer.Option(
    0,
    "--kv-offload-min-reuse",
    min=0,
    help="Keep an evicted block in the tiers only if it served this many prefix hits.",
)


def _router_options(policy: str, overlap_weight: float, temperature: float) -> dict[str, Any]:
    if policy not in POLICIES:
        raise typer.BadParameter(
            f"unknown policy {policy!r} (one of {', '.join(POLICIES)})", param_hint="--router"
        )
    if overlap_weight < 0 or temperature < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--overlap-weight/--temperature")
    return {
        "router_policy": policy,
        "router_overlap_weight": overlap_weight,
        "router_temperature": temperature,
    }


def _engine_config(**kw: Any) -> Any:
    from tokenfab.config import EngineConfig

    if kw["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        raise typer.BadParameter(f"unknown dtype {kw['dtype']!r}", param_hint="--dtype")
    return EngineConfig(
        model=kw["model"],
        dtype=kw["dtype"],
        block_size=kw["block_size"],
        num_kv_blocks=kw["kv_blocks"],
        kv_cache_memory_gb=kw["kv_cache_gb"],
        max_model_len=kw["max_model_len"],
        max_num_seqs=kw["max_num_seqs"],
        max_num_batched_tokens=kw["max_num_batched_tokens"],
        decode_max_prefill_tokens=kw["decode_max_prefill_tokens"] or None,
        max_waiting=kw["max_waiting"],
        enable_prefix_caching=not kw["no_prefix_caching"],
        num_threads=kw["num_threads"],
        kv_host_gb=kw["kv_host_gb"],
        kv_host_name=kw.get("kv_host_name"),
        kv_disk_dir=kw["kv_disk_dir"],
        kv_disk_gb=kw["kv_disk_gb"],
        kv_remote_url=kw["kv_remote"],
        kv_remote_gb=kw["kv_remote_gb"],
        kv_offload_min_reuse=kw["kv_offload_min_reuse"],
    )


def _logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


# The engine's step loop (a thread) releases the GIL around every torch op and must take it
# back hundreds of times per step, while the event loop thread serves HTTP. With CPython's
# default 5 ms switch interval each hand-back can wait a whole interval behind the busy event
# loop; at 32 concurrent streams that cost ~25% of throughput and ~40% of TTFT here
# (benchmarks/README.md). A short interval keeps the engine fed.
GIL_SWITCH_INTERVAL_S = 1e-4


def _run(coro: Any, host: str | None = None, port: int | None = None) -> None:
    import asyncio
    import sys

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
    except OSError as e:
        where = f" on {host}:{port}" if host is not None else ""
        typer.echo(f"error: cannot serve{where}: {e.strerror or e}", err=True)
        raise typer.Exit(1) from None
    except (TimeoutError, ValueError, RuntimeError) as e:
        typer.echo(f"error: {e or type(e).__name__}", err=True)
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
        host: str = typer.Option("127.0.0.1", help="Address to listen on."),
        port: int = typer.Option(8000, help="TCP port (0: any free port)."),
        workers: int = typer.Option(1, min=1, help="Engine workers behind the frontend."),
        prefill: int = typer.Option(
            0, "--prefill", min=0, help="Disaggregated: prefill workers (with --decode)."
        ),
        decode: int = typer.Option(
            0, "--decode", min=0, help="Disaggregated: decode workers (with --prefill)."
        ),
        disagg_min_uncached: int = typer.Option(
            256, min=0, help="Disaggregated: prompts missing fewer tokens prefill on decode."
        ),
        max_model_len: int = typer.Option(None, help="Context length cap (default: the model's)."),
        kv_blocks: int = typer.Option(
            None, help="KV-cache blocks per worker (default: sized from --kv-cache-gb)."
        ),
        kv_cache_gb: float = typer.Option(2.0, help="KV-cache memory per worker, GiB."),
        block_size: int = typer.Option(16, help="Tokens per KV block."),
        max_num_seqs: int = typer.Option(256, help="Max requests in a running batch."),
        max_num_batched_tokens: int = typer.Option(2048, help="Token budget of one step."),
        decode_max_prefill_tokens: int = DECODE_BUDGET_OPTION,
        max_waiting: int = typer.Option(
            4096, help="Queued requests beyond this get 503 + Retry-After."
        ),
        dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16."),
        api_key: str = typer.Option(
            None,
            envvar="TOKENFAB_API_KEY",
            help="Require `Authorization: Bearer KEY` (not on /health and /metrics).",
        ),
        served_model_name: str = typer.Option(
            None, help="Model id clients send (default: the model folder's name)."
        ),
        no_prefix_caching: bool = typer.Option(False, help="Disable prefix caching."),
        num_threads: int = typer.Option(
            None, help="Torch threads per engine (default: tuned while running)."
        ),
        kv_host_gb: float = KV_HOST_OPTION,
        kv_disk_dir: str = KV_DISK_OPTION,
        kv_disk_gb: float = KV_DISK_GB_OPTION,
        kv_remote: str = KV_REMOTE_OPTION,
        kv_remote_gb: float = KV_REMOTE_GB_OPTION,
        kv_offload_min_reuse: int = KV_MIN_REUSE_OPTION,
        in_process: bool = typer.Option(
            False,
            "--in-process",
            help="Run the engines in the server's process (default: a process per engine).",
        ),
        default_max_tokens: int = DEFAULT_MAX_TOKENS_OPTION,
        router: str = ROUTER_OPTION,
        overlap_weight: float = OVERLAP_WEIGHT_OPTION,
        router_temperature: float = ROUTER_TEMPERATURE_OPTION,
        planner: bool = typer.Option(
            False,
            "--planner",
            help="Run the planner here: it moves these workers between the prefill and "
            "decode roles as traffic shifts (with --prefill/--decode).",
        ),
        ttft_ms: float = typer.Option(1000.0, help="Planner: time-to-first-token target, ms."),
        itl_ms: float = typer.Option(100.0, help="Planner: inter-token latency target, ms."),
        budget: int = typer.Option(None, help="Planner: most workers (default: all started)."),
        prefill_tps: float = typer.Option(
            1000.0, help="Planner: prompt tokens/s one worker computes (measured)."
        ),
        decode_tps: float = typer.Option(
            100.0, help="Planner: output tokens/s one worker decodes (measured)."
        ),
        planner_interval: float = typer.Option(10.0, help="Planner: seconds between steps."),
        planner_cooldown: float = typer.Option(30.0, help="Planner: seconds between moves."),
        spares: int = typer.Option(
            0, min=0, help="Hot spares: extra idle workers swapped in when one fails."
        ),
        drain_grace: float = typer.Option(
            10.0, help="Seconds a SIGTERMed worker may finish its requests before they migrate."
        ),
        hang_timeout: float = typer.Option(
            1.5, help="Seconds with requests and no engine step before a worker is drained."
        ),
        canary_interval: float = typer.Option(
            30.0, help="Seconds between canary checks of each worker (0: none)."
        ),
        log_level: str = typer.Option("info", help="debug | info | warning | error."),
    ) -> None:
        """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models, /health,
        /metrics) with N engine workers, each in its own process."""
        from tokenfab.config import EmbeddedPlanner, ServerConfig
        from tokenfab.serve.server import serve as run

        engine = _engine_config(**locals())
        _logging(log_level)
        server = ServerConfig(
            host=host,
            port=port,
            api_key=api_key or None,
            workers=workers,
            prefill_workers=prefill,
            decode_workers=decode,
            disagg_min_uncached_tokens=disagg_min_uncached,
            served_model_name=served_model_name,
            engine_processes=not in_process,
            default_max_tokens=default_max_tokens or None,
            planner=EmbeddedPlanner(
                ttft_ms=ttft_ms,
                itl_ms=itl_ms,
                prefill_tps=prefill_tps,
                decode_tps=decode_tps,
                budget=budget,
                interval_s=planner_interval,
                cooldown_s=planner_cooldown,
            )
            if planner
            else None,
            spares=spares,
            drain_grace_s=drain_grace,
            hang_timeout_s=hang_timeout,
            canary_interval_s=canary_interval,
            **_router_options(router, overlap_weight, router_temperature),
        )
        _run(run(engine, server, log_level=log_level.lower()), host, port)

    @app.command("worker")
    def worker(
        runtime: str = typer.Option(..., "--runtime", help=RUNTIME_HELP),
        namespace: str = typer.Option("default", help="Runtime namespace (one deployment)."),
        worker_id: str = typer.Option(None, help="Instance id (default: worker-HOST-PID)."),
        workers: int = typer.Option(1, min=1, help="Engines in this process."),
        role: str = typer.Option(
            "aggregated",
            help="aggregated (prefill and decode) | prefill (computes prompts, serves their KV "
            "blocks) | decode (pulls prompts' KV from prefill workers, decodes).",
        ),
        model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
        max_model_len: int = typer.Option(None, help="Context length cap (default: the model's)."),
        kv_blocks: int = typer.Option(None, help="KV-cache blocks per engine."),
        kv_cache_gb: float = typer.Option(2.0, help="KV-cache memory per engine, GiB."),
        block_size: int = typer.Option(16, help="Tokens per KV block."),
        max_num_seqs: int = typer.Option(256, help="Max requests in a running batch."),
        max_num_batched_tokens: int = typer.Option(2048, help="Token budget of one step."),
        decode_max_prefill_tokens: int = DECODE_BUDGET_OPTION,
        max_waiting: int = typer.Option(4096, help="Queued requests beyond this are refused."),
        dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16."),
        no_prefix_caching: bool = typer.Option(False, help="Disable prefix caching."),
        num_threads: int = typer.Option(
            None, help="Torch threads per engine (default: tuned while running)."
        ),
        kv_host_gb: float = KV_HOST_OPTION,
        kv_host_name: str = typer.Option(
            None,
            help="Name of the G2 segment (/dev/shm/tokenfab-kv-NAME): worker processes given "
            "the same name share it (default: each engine its own).",
        ),
        kv_disk_dir: str = KV_DISK_OPTION,
        kv_disk_gb: float = KV_DISK_GB_OPTION,
        kv_remote: str = KV_REMOTE_OPTION,
        kv_remote_gb: float = KV_REMOTE_GB_OPTION,
        kv_offload_min_reuse: int = KV_MIN_REUSE_OPTION,
        drain_grace: float = typer.Option(
            10.0,
            help="On SIGTERM: seconds in-flight requests may run on (no new work is taken); "
            "the frontend migrates what is left.",
        ),
        data_host: str = typer.Option(
            "127.0.0.1",
            help="KV data plane (disaggregated serving): address to bind; 0.0.0.0 when decode "
            "workers run on other hosts.",
        ),
        data_port: int = typer.Option(
            0, min=0, max=65535, help="KV data plane port (0: any free; engine i binds +i)."
        ),
        data_advertise: str = typer.Option(
            None,
            help="KV data plane address other workers dial: HOST (the bound port added) or "
            "HOST:PORT (default: the bound address).",
        ),
        log_level: str = typer.Option("info", help="debug | info | warning | error."),
    ) -> None:
        """Run engine worker(s) on a shared runtime (no HTTP); `tokenfab frontend` serves them."""
        from tokenfab.config import DataPlaneConfig
        from tokenfab.worker.launch import run_worker

        if role not in ("aggregated", "prefill", "decode"):
            raise typer.BadParameter(f"unknown role {role!r}", param_hint="--role")
        engine = _engine_config(**locals())
        _logging(log_level)
        _run(
            run_worker(
                engine,
                runtime,
                namespace,
                worker_id,
                workers,
                role=role,  # type: ignore[arg-type]
                drain_grace_s=drain_grace,
                data=DataPlaneConfig(data_host, data_port, data_advertise or None),
            )
        )

    @app.command("frontend")
    def frontend(
        runtime: str = typer.Option(..., "--runtime", help=RUNTIME_HELP),
        namespace: str = typer.Option("default", help="Runtime namespace (one deployment)."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on."),
        port: int = typer.Option(8000, help="TCP port (0: any free port)."),
        tokenizer: str = typer.Option(
            None, help="Tokenizer folder (default: the model folder the first worker reports)."
        ),
        api_key: str = typer.Option(
            None,
            envvar="TOKENFAB_API_KEY",
            help="Require `Authorization: Bearer KEY` (not on /health and /metrics).",
        ),
        served_model_name: str = typer.Option(None, help="Model id clients send."),
        wait: float = typer.Option(300.0, help="Seconds to wait for the first worker."),
        default_max_tokens: int = DEFAULT_MAX_TOKENS_OPTION,
        router: str = ROUTER_OPTION,
        overlap_weight: float = OVERLAP_WEIGHT_OPTION,
        router_temperature: float = ROUTER_TEMPERATURE_OPTION,
        external_router: bool = typer.Option(
            False,
            "--external-router",
            help="Ask a `tokenfab router` on the runtime (route here when none answers).",
        ),
        log_level: str = typer.Option("info", help="debug | info | warning | error."),
    ) -> None:
        """Serve the OpenAI API for the workers registered on a shared runtime."""
        from tokenfab.config import ServerConfig
        from tokenfab.serve.server import run_frontend

        _logging(log_level)
        server = ServerConfig(
            host=host,
            port=port,
            api_key=api_key or None,
            served_model_name=served_model_name,
            external_router=external_router,
            default_max_tokens=default_max_tokens or None,
            **_router_options(router, overlap_weight, router_temperature),
        )
        _run(
            run_frontend(server, runtime, namespace, tokenizer, wait, log_level.lower()), host, port
        )

    @app.command("router")
    def router(
        runtime: str = typer.Option(..., "--runtime", help=RUNTIME_HELP),
        namespace: str = typer.Option("default", help="Runtime namespace (one deployment)."),
        router_id: str = typer.Option(None, help="Instance id (default: router-<random>)."),
        policy: str = typer.Option("kv", "--policy", help=ROUTER_HELP),
        overlap_weight: float = typer.Option(
            1.0, help="kv: weight of uncached prompt blocks against active blocks."
        ),
        temperature: float = typer.Option(
            0.0, help="kv: 0 picks the cheapest worker; > 0 samples (softmax of costs)."
        ),
        seed: int = typer.Option(
            0, help="Tie-break and sampling seed (equal seeds: routers agree)."
        ),
        log_level: str = typer.Option("info", help="debug | info | warning | error."),
    ) -> None:
        """Run the KV-aware router standalone: it follows the workers' KV events and load on
        the runtime and answers frontends started with --external-router."""
        from tokenfab.router.router import RouterConfig
        from tokenfab.serve.router_service import run_router

        opts = _router_options(policy, overlap_weight, temperature)
        config = RouterConfig(
            policy=opts["router_policy"],
            overlap_weight=overlap_weight,
            temperature=temperature,
            seed=seed,
        )
        _logging(log_level)
        _run(run_router(runtime, namespace, config, router_id))
