"""Calibration of the performance model's efficiencies on measured serving data.

The fitted parameters ship in `data/calibration.json`; `bundled_calibration()` loads them.
"""

from __future__ import annotations

import json
from dataclasses import fields
from functools import cache
from importlib import resources

from tokenfab.factory.perf import DEFAULT_CAL, Calibration


def calibration_from_dict(d: dict) -> Calibration:
    names = {f.name for f in fields(Calibration)} - {"extras"}
    return Calibration(
        **{k: float(v) if k != "prefill_chunk" else int(v) for k, v in d.items() if k in names}
    )


@cache
def bundled_calibration(backend: str | None = None) -> Calibration:
    """The shipped calibration (per backend when the file has one, else the common one)."""
    f = resources.files("tokenfab.factory").joinpath("data/calibration.json")
    if not f.is_file():
        return DEFAULT_CAL
    raw = json.loads(f.read_text())
    common = raw.get("common", {})
    per = raw.get("backends", {}).get(backend or "", {})
    return calibration_from_dict({**common, **per})
