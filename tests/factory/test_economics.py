"""Economics worked by hand."""

from __future__ import annotations

import math

import pytest

from tokenfab.factory.economics import (
    SECONDS_PER_YEAR,
    economics,
    energy_usd_per_mtok,
    load_prices,
    tokens_per_s_per_mw,
    usd_per_mtok,
)


def test_usd_per_mtok_by_hand() -> None:
    # 1,000 tok/s/GPU = 3.6 M tok per GPU-hour; at $3.60/GPU-h that is $1.00 per M tokens.
    assert usd_per_mtok(1000.0, 3.60) == pytest.approx(1.0)
    # Twice the throughput halves the cost.
    assert usd_per_mtok(2000.0, 3.60) == pytest.approx(0.5)
    assert math.isinf(usd_per_mtok(0.0, 3.60))


def test_per_megawatt_and_energy_by_hand() -> None:
    # 1,000 W all-in per GPU: 1,000 GPUs per MW; 500 tok/s/GPU -> 500,000 tok/s per MW.
    assert tokens_per_s_per_mw(500.0, 1000.0) == pytest.approx(5e5)
    # PUE 1.25: only 800 GPUs fit in a facility MW.
    assert tokens_per_s_per_mw(500.0, 1000.0, pue=1.25) == pytest.approx(4e5)
    # 1 kW at $0.10/kWh = $0.10 per GPU-hour; 1,000 tok/s -> 3.6 M tok/h -> $0.0278 per M.
    assert energy_usd_per_mtok(1000.0, 1000.0, 0.10) == pytest.approx(0.10 / 3.6)


def test_economics_bundle() -> None:
    e = economics(1000.0, 1250.0, 3.60, price_usd_per_mtok=2.0, usd_per_kwh=0.08)
    assert e.usd_per_mtok == pytest.approx(1.0)
    assert e.gpus_per_mw == pytest.approx(800.0)
    assert e.tokens_per_s_per_mw == pytest.approx(8e5)
    assert e.tokens_per_mw_year == pytest.approx(8e5 * SECONDS_PER_YEAR)
    # 8e5 tok/s for a year = 2.52e13 tokens = 2.52e7 M tokens; at $2 per M ~ $50.5M.
    assert e.revenue_usd_per_mw_year == pytest.approx(8e5 * SECONDS_PER_YEAR / 1e6 * 2.0)
    assert 5.0e7 < e.revenue_usd_per_mw_year < 5.1e7
    # 1 MW for 8,766 h at $0.08/kWh = $701,280.
    assert e.energy_usd_per_mw_year == pytest.approx(1000 * 8766 * 0.08)
    assert e.margin_usd_per_mtok == pytest.approx(1.0)


def test_price_book_has_a_sourced_price_for_every_system() -> None:
    from tokenfab.factory.catalog import load_systems

    book = load_prices()
    for key in load_systems():
        assert book.gpu_hour(key) > 0
        src = book.gpu_hour_source[key]
        assert "http" in src or "estimate" in src
    with pytest.raises(KeyError):
        book.gpu_hour("no_such_system")
