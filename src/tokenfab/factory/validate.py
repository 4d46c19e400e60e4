"""`tokenfab plan validate`: predict every row of a measured-serving CSV (placeholder)."""

from __future__ import annotations

from pathlib import Path


def run_validate(path: Path, as_json: bool = False) -> None:
    raise NotImplementedError("validate is being written")
