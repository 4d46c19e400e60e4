"""`tokenfab plan`: the factory model. (Owned by factory.)"""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Plan an AI factory: performance model, Pareto frontier, economics.", no_args_is_help=True
)
