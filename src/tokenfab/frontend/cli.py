"""Serving commands: `tokenfab serve` (frontend + N engine workers in one process).

Heavy imports (torch, fastapi, uvicorn) happen inside the command, so `tokenfab --help` is fast.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: str = typer.Option(
            None,
            "--model",
            "-m",
            help="HF model folder or .gguf file. Default: SmolLM2-135M-Instruct (bundled GGUF).",
        ),
        host: str = typer.Option("127.0.0.1", help="Address to listen on."),
        port: int = typer.Option(8000, help="TCP port (0: any free port)."),
        workers: int = typer.Option(1, min=1, help="Engine workers behind the frontend."),
        max_model_len: int = typer.Option(None, help="Context length cap (default: the model's)."),
        kv_blocks: int = typer.Option(
            None, help="KV-cache blocks per worker (default: sized from --kv-cache-gb)."
        ),
        kv_cache_gb: float = typer.Option(2.0, help="KV-cache memory per worker, GiB."),
        block_size: int = typer.Option(16, help="Tokens per KV block."),
        max_num_seqs: int = typer.Option(256, help="Max requests in a running batch."),
        max_num_batched_tokens: int = typer.Option(2048, help="Token budget of one step."),
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
        num_threads: int = typer.Option(None, help="Torch threads (default: torch's choice)."),
        log_level: str = typer.Option("info", help="debug | info | warning | error."),
    ) -> None:
        """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models, /health,
        /metrics) with N engine workers in this process."""
        import asyncio
        import logging

        from tokenfab.config import EngineConfig, ServerConfig
        from tokenfab.frontend.server import serve as run

        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise typer.BadParameter(f"unknown dtype {dtype!r}", param_hint="--dtype")
        logging.basicConfig(
            level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        engine = EngineConfig(
            model=model,
            dtype=dtype,  # type: ignore[arg-type]
            block_size=block_size,
            num_kv_blocks=kv_blocks,
            kv_cache_memory_gb=kv_cache_gb,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_waiting=max_waiting,
            enable_prefix_caching=not no_prefix_caching,
            num_threads=num_threads,
        )
        server = ServerConfig(
            host=host,
            port=port,
            api_key=api_key or None,
            workers=workers,
            served_model_name=served_model_name,
        )
        try:
            asyncio.run(run(engine, server, log_level=log_level.lower()))
        except KeyboardInterrupt:
            pass
        except OSError as e:
            typer.echo(f"error: cannot serve on {host}:{port}: {e.strerror or e}", err=True)
            raise typer.Exit(1) from None
