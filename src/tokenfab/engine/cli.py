"""Engine commands: `tokenfab generate`, `tokenfab model ...`. (Owned by the engine.)"""

from __future__ import annotations

import typer

model_app = typer.Typer(help="Make, convert and inspect models.", no_args_is_help=True)


def generate(
    prompt: str = typer.Argument(..., help="The user message to answer."),
) -> None:
    """Answer one prompt with the default (or given) model."""
    raise typer.Exit(1)
