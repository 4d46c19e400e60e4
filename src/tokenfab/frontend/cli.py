"""Serving commands: `tokenfab serve`, `frontend`, `worker`. (Owned by the frontend.)"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve() -> None:
        """Serve the OpenAI API (placeholder)."""
        raise typer.Exit(1)
