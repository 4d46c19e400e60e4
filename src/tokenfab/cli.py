"""`tokenfab` command line: one entry point, each part contributing its own commands.

Each part keeps its commands in its own `cli.py` with heavy imports inside the functions,
so `tokenfab --help` starts fast.
"""

from __future__ import annotations

import typer

from tokenfab.bench import cli as bench_cli
from tokenfab.engine.tools import cli as engine_cli
from tokenfab.factory import cli as factory_cli
from tokenfab.planner import cli as planner_cli
from tokenfab.serve import cli as serve_cli
from tokenfab.twin import cli as twin_cli

app = typer.Typer(
    name="tokenfab",
    help="An operating system for AI factories: serve LLMs (OpenAI API), plan GPU factories, "
    "replay them in a digital twin.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("generate")(engine_cli.generate)
app.add_typer(engine_cli.model_app, name="model")
serve_cli.register(app)
app.add_typer(bench_cli.app, name="bench")
app.add_typer(factory_cli.app, name="plan")
app.add_typer(twin_cli.app, name="twin")
app.command("planner")(planner_cli.planner)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
