"""The fitted calibration the physics runs with (`data/calibration.json`).

Loading the shipped parameters is kept apart from fitting them (`calibrate.py`), so the
physics (`serving`, `search`) reads its defaults without importing the fitter or the
measured data it was fitted on.
"""

from __future__ import annotations

import json
from dataclasses import fields
from functools import cache
from importlib import resources

import numpy as np

from tokenfab.factory.perf import DEFAULT_CAL, Calibration


def calibration_from_dict(d: dict) -> Calibration:
    names = {f.name for f in fields(Calibration)}
    return Calibration(**{k: float(v) for k, v in d.items() if k in names})


@cache
def bundled_raw() -> dict:
    """calibration.json as stored ({"common", "backends"}; {} when absent)."""
    f = resources.files("tokenfab.factory").joinpath("data/calibration.json")
    return json.loads(f.read_text()) if f.is_file() else {}


def mean_backend(per: dict[str, dict[str, float]]) -> dict[str, float]:
    """Geometric mean of the per-backend parameters: the calibration of an unnamed engine."""
    if not per:
        return {}
    keys = set.intersection(*(set(v) for v in per.values()))
    return {k: float(np.exp(np.mean([np.log(v[k]) for v in per.values()]))) for k in keys}


@cache
def bundled_calibration(backend: str | None = None) -> Calibration:
    """The shipped calibration for a backend (unknown/None: the backends' geometric mean)."""
    raw = bundled_raw()
    if not raw:
        return DEFAULT_CAL
    per = raw.get("backends", {})
    if backend in per:
        return calibration_from_dict({**raw["common"], **per[backend]})
    return calibration_from_dict({**raw["common"], **mean_backend(per)})
