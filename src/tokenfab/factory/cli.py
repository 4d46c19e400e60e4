"""`tokenfab plan`: the factory model.

`validate` is the stable interface independent checks call; its implementation lives in
`validate.py`. The search (`tokenfab plan --model ...`) and `keynote` are registered below.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="Plan an AI factory: performance model, Pareto frontier, economics.",
    no_args_is_help=True,
)


@app.command("validate")
def validate(
    data: Path = typer.Option(..., "--data", help="CSV in the format of measured_serving.csv."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (stable keys)."),
) -> None:
    """Predict TTFT and TPOT for every row of a measured-serving CSV and report the errors."""
    from tokenfab.factory.validate import run_validate

    run_validate(data, as_json=as_json)
