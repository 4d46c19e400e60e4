"""Engine commands: `tokenfab generate`, `tokenfab model ...`. (Owned by the engine.)"""

from __future__ import annotations

import typer

model_app = typer.Typer(help="Make, convert and inspect models.", no_args_is_help=True)


@model_app.command("make-tiny")
def make_tiny(
    dir: str = typer.Argument(..., help="Folder to write the model into."),
    family: str = typer.Option("llama", help="llama, mistral, qwen2 or qwen3."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Write a random-weight HF-format model (a few million parameters) with a tokenizer."""
    from tokenfab.engine.tools.tiny import TINY_FAMILIES, make_tiny_model

    if family not in TINY_FAMILIES:
        typer.echo(f"error: --family must be one of {', '.join(TINY_FAMILIES)}", err=True)
        raise typer.Exit(2)
    typer.echo(str(make_tiny_model(dir, family, seed=seed)))


@model_app.command("convert")
def convert(
    gguf: str = typer.Argument(None, help="A .gguf file; default: the bundled SmolLM2-135M."),
) -> None:
    """Dequantize a GGUF into a cached HF folder (once) and print the folder."""
    from tokenfab.engine.model.loader import resolve_model

    if gguf is not None and not gguf.endswith(".gguf"):
        typer.echo(f"error: {gguf} is not a .gguf file", err=True)
        raise typer.Exit(2)
    try:
        typer.echo(str(resolve_model(gguf)))
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@model_app.command("info")
def info(
    model: str = typer.Argument(None, help="HF folder or .gguf; default: SmolLM2-135M."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a model's shape, dtype, eos ids and KV bytes per token."""
    import json

    from tokenfab.engine.model.loader import model_name, resolve_model
    from tokenfab.engine.model.model import load_model_config
    from tokenfab.engine.model.runner import kv_bytes_per_block

    try:
        path = resolve_model(model)
        cfg = load_model_config(path)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    data = {
        "name": model_name(path),
        "path": str(path),
        "family": cfg.family,
        "dtype": str(cfg.native_dtype).removeprefix("torch."),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "eos_token_ids": cfg.eos_token_ids,
        "bos_token_id": cfg.bos_token_id,
        "kv_bytes_per_token": kv_bytes_per_block(cfg, 1),
    }
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=data["name"], show_header=False)
    for k, v in data.items():
        table.add_row(k, str(v))
    Console().print(table)


def generate(
    prompt: str = typer.Argument(..., help="The user message to answer."),
    model: str = typer.Option(
        None, "--model", "-m", help="HF folder or .gguf file; default: SmolLM2-135M-Instruct."
    ),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed (with --temperature > 0)."),
    system: str = typer.Option(None, "--system", help="An optional system message."),
    raw: bool = typer.Option(False, "--raw", help="Complete the text as is, no chat template."),
    dtype: str = typer.Option("auto", help="auto, float32 or bfloat16."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
) -> None:
    """Answer one prompt with the default (or given) model, streaming the text as it comes.

    The prompt goes through the model's chat template (as a user message) unless --raw.
    """
    import json
    import sys
    import time

    from tokenfab.engine.tools.cli_generate import run_generate

    try:
        result = run_generate(
            prompt,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            system=system,
            raw=raw,
            dtype=dtype,
            stream=None if json_out else sys.stdout,
            clock=time.perf_counter,
        )
    except (ValueError, FileNotFoundError) as e:  # InvalidRequestError is a ValueError
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if json_out:
        typer.echo(json.dumps(result))
    else:
        typer.echo("")
