"""GPU system catalog: the hardware figures the performance model runs on.

The figures live in `data/systems.toml`, each with its source; units are documented there.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

PRECISIONS = ("bf16", "fp8", "fp4")


@dataclass(frozen=True)
class System:
    """One GPU system; all figures are per GPU unless the name says otherwise."""

    key: str
    name: str
    gpu: str
    scaleup_size: int  # GPUs in one NVLink / Infinity Fabric domain
    gpus_per_node: int
    # dense tensor TFLOPS by precision; 0 = no native path
    tflops: dict[str, float] = field(hash=False, compare=False)
    hbm_gb: float
    hbm_tbps: float
    scaleup_gbps: float  # GB/s per GPU per direction
    scaleout_gbps: float  # GB/s per GPU per direction
    gpu_power_w: float
    allin_power_w: float  # system IT power / GPUs (no PUE)
    preliminary: bool = False
    planning: bool = True  # offered by load_systems (False: kept for validation only)
    sources: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    aliases: tuple[str, ...] = ()

    def peak_tflops(self, precision: str) -> float:
        """Dense TFLOPS for a precision; falls back to the next wider native precision."""
        order = PRECISIONS[PRECISIONS.index(precision) :: -1]
        for p in order:
            if self.tflops.get(p, 0.0) > 0:
                return self.tflops[p]
        raise ValueError(f"{self.name} has no tensor-core rate for {precision}")

    def native(self, precision: str) -> bool:
        return self.tflops.get(precision, 0.0) > 0


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", " ").replace("_", " ")


@cache
def load_systems() -> dict[str, System]:
    """The planning catalog by key (e.g. "gb200", "h100_sxm"): the systems the planner offers."""
    return {k: s for k, s in all_systems().items() if s.planning}


@cache
def all_systems() -> dict[str, System]:
    """Every system in the data file, including ones kept only so that measurements taken on
    them can be predicted (A100, H800, H20, L40S, ...)."""
    text = resources.files("tokenfab.factory").joinpath("data/systems.toml").read_text()
    raw = tomllib.loads(text)
    refs: dict[str, str] = raw["sources"]
    out: dict[str, System] = {}
    for key, s in raw["systems"].items():
        out[key] = System(
            key=key,
            name=s["name"],
            gpu=s["gpu"],
            scaleup_size=int(s["scaleup_size"]),
            gpus_per_node=int(s["gpus_per_node"]),
            tflops={p: float(s[f"tflops_{p}"]) for p in PRECISIONS},
            hbm_gb=float(s["hbm_gb"]),
            hbm_tbps=float(s["hbm_tbps"]),
            scaleup_gbps=float(s["scaleup_gbps"]),
            scaleout_gbps=float(s["scaleout_gbps"]),
            gpu_power_w=float(s["gpu_power_w"]),
            allin_power_w=float(s["allin_power_w"]),
            preliminary=bool(s.get("preliminary", False)),
            planning=bool(s.get("planning", True)),
            sources={f: refs[r] for f, r in s["sources"].items()},
            aliases=tuple(s.get("aliases", ())),
        )
    return out


@cache
def _alias_index() -> dict[str, str]:
    idx: dict[str, str] = {}
    for key, s in all_systems().items():
        for a in (key, s.name, s.gpu, *s.aliases):
            idx[_norm(a)] = key
    return idx


def get_system(name: str) -> System:
    """A system by key, display name or alias (case, '-', '_' and spaces ignored)."""
    key = _alias_index().get(_norm(name))
    if key is None:
        known = ", ".join(sorted(all_systems()))
        raise KeyError(f"unknown system {name!r}; known: {known}")
    return all_systems()[key]
