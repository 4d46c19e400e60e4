"""Token economics: what a deployment's throughput is worth in dollars and megawatts.

Two views of cost, because buyers ask both:
- renting: $ per million tokens = ($ per GPU-hour) / (tokens per GPU-hour / 1e6);
- owning: the energy part of that cost, from all-in power per GPU x PUE x $/kWh.
And the power-limited view of the keynote: tokens/s per MW of (IT x PUE) power, tokens per
MW-year, and revenue per MW-year at a selling price per million tokens.

Default prices come from `data/prices.toml`, each with its source.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_YEAR = 365.25 * 24 * SECONDS_PER_HOUR


@dataclass(frozen=True)
class PriceBook:
    """Default prices with their sources (see data/prices.toml)."""

    gpu_hour_usd: dict[str, float]
    gpu_hour_note: dict[str, str]  # short note and source key, for tables
    gpu_hour_source: dict[str, str]  # the full source text
    usd_per_kwh: float
    pue: float
    usd_per_mtok: float
    sources: dict[str, str]

    def gpu_hour(self, system_key: str) -> float:
        if system_key not in self.gpu_hour_usd:
            raise KeyError(f"no default $/GPU-hour for {system_key!r}; pass --price-per-gpu-hour")
        return self.gpu_hour_usd[system_key]


@cache
def load_prices() -> PriceBook:
    text = resources.files("tokenfab.factory").joinpath("data/prices.toml").read_text()
    raw = tomllib.loads(text)
    refs: dict[str, str] = raw["sources"]
    gpu = raw["gpu_hour"]
    return PriceBook(
        gpu_hour_usd={k: float(v["usd"]) for k, v in gpu.items()},
        gpu_hour_note={k: f"{v.get('note', '')} [{v['source']}]" for k, v in gpu.items()},
        gpu_hour_source={k: refs[v["source"]] for k, v in gpu.items()},
        usd_per_kwh=float(raw["energy"]["usd_per_kwh"]),
        pue=float(raw["energy"]["pue"]),
        usd_per_mtok=float(raw["token_price"]["usd_per_mtok"]),
        sources=refs,
    )


def usd_per_mtok(tokens_per_s_per_gpu: float, usd_per_gpu_hour: float) -> float:
    """Rental cost of one million tokens; inf when the deployment produces nothing."""
    if tokens_per_s_per_gpu <= 0:
        return float("inf")
    return usd_per_gpu_hour / (tokens_per_s_per_gpu * SECONDS_PER_HOUR / 1e6)


def tokens_per_s_per_mw(
    tokens_per_s_per_gpu: float, allin_power_w: float, pue: float = 1.0
) -> float:
    """Tokens/s one megawatt of facility power buys (IT power per GPU x PUE)."""
    return tokens_per_s_per_gpu * 1e6 / (allin_power_w * pue)


def energy_usd_per_mtok(
    tokens_per_s_per_gpu: float, allin_power_w: float, usd_per_kwh: float, pue: float = 1.0
) -> float:
    """Electricity cost of one million tokens for an owner (capital not included)."""
    if tokens_per_s_per_gpu <= 0:
        return float("inf")
    usd_per_gpu_hour = allin_power_w * pue / 1000.0 * usd_per_kwh
    return usd_per_mtok(tokens_per_s_per_gpu, usd_per_gpu_hour)


@dataclass(frozen=True)
class Economics:
    """The money and power figures of one operating point."""

    tokens_per_s_per_gpu: float
    usd_per_gpu_hour: float
    usd_per_mtok: float  # rental cost
    energy_usd_per_mtok: float  # electricity only (owner)
    tokens_per_s_per_mw: float
    tokens_per_mw_year: float
    price_usd_per_mtok: float  # selling price used for revenue
    revenue_usd_per_mw_year: float
    energy_usd_per_mw_year: float
    gpus_per_mw: float
    usd_per_kwh: float
    pue: float

    @property
    def margin_usd_per_mtok(self) -> float:
        """Selling price minus rental cost (negative: renting these GPUs loses money)."""
        return self.price_usd_per_mtok - self.usd_per_mtok


def economics(
    tokens_per_s_per_gpu: float,
    allin_power_w: float,
    usd_per_gpu_hour: float,
    *,
    price_usd_per_mtok: float,
    usd_per_kwh: float,
    pue: float = 1.0,
) -> Economics:
    """All economics of an operating point from its throughput per GPU and the prices."""
    per_mw = tokens_per_s_per_mw(tokens_per_s_per_gpu, allin_power_w, pue)
    per_mw_year = per_mw * SECONDS_PER_YEAR
    return Economics(
        tokens_per_s_per_gpu=tokens_per_s_per_gpu,
        usd_per_gpu_hour=usd_per_gpu_hour,
        usd_per_mtok=usd_per_mtok(tokens_per_s_per_gpu, usd_per_gpu_hour),
        energy_usd_per_mtok=energy_usd_per_mtok(
            tokens_per_s_per_gpu, allin_power_w, usd_per_kwh, pue
        ),
        tokens_per_s_per_mw=per_mw,
        tokens_per_mw_year=per_mw_year,
        price_usd_per_mtok=price_usd_per_mtok,
        revenue_usd_per_mw_year=per_mw_year / 1e6 * price_usd_per_mtok,
        energy_usd_per_mw_year=1000.0 * SECONDS_PER_YEAR / SECONDS_PER_HOUR * usd_per_kwh,
        gpus_per_mw=1e6 / (allin_power_w * pue),
        usd_per_kwh=usd_per_kwh,
        pue=pue,
    )
