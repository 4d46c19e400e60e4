"""`tokenfab bench`: load generator. (Owned by bench.)"""

from __future__ import annotations

import typer

app = typer.Typer(help="Load-test an OpenAI-compatible server.", no_args_is_help=True)
