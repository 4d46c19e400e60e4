"""The system catalog: every figure present and sourced, aliases resolve, fallbacks hold."""

from __future__ import annotations

import pytest

from tokenfab.factory.catalog import PRECISIONS, get_system, load_systems

REQUIRED = ("h100_sxm", "h200_sxm", "b200_sxm", "b300_sxm", "gb200", "gb300", "mi300x", "mi355x")


def test_all_systems_present_with_sources():
    systems = load_systems()
    for key in (*REQUIRED, "rubin_nvl144"):
        s = systems[key]
        assert s.hbm_gb > 0 and s.hbm_tbps > 0 and s.scaleup_gbps > 0 and s.scaleout_gbps > 0
        assert s.allin_power_w > s.gpu_power_w > 0
        assert s.tflops["bf16"] > 0 and s.tflops["fp8"] >= 2 * s.tflops["bf16"] * 0.99
        for f in ("tflops", "hbm", "scaleup", "scaleout", "gpu_power", "allin_power"):
            assert s.sources.get(f), f"{key} has no source for {f}"
    assert systems["rubin_nvl144"].preliminary
    assert not any(systems[k].preliminary for k in REQUIRED)


def test_known_datasheet_figures():
    h100 = get_system("h100_sxm")
    assert h100.hbm_gb == 80 and h100.hbm_tbps == pytest.approx(3.35)
    assert h100.tflops["bf16"] == pytest.approx(989.4)  # dense, not the 1979 sparse figure
    gb200 = get_system("gb200")
    assert gb200.scaleup_size == 72 and get_system("b200").scaleup_size == 8


@pytest.mark.parametrize(
    ("alias", "key"),
    [
        ("GB200 NVL72", "gb200"),
        ("h100_sxm", "h100_sxm"),
        ("H100", "h100_sxm"),
        ("gb300-nvl72", "gb300"),
        ("Rubin", "rubin_nvl144"),
        ("h200_sxm", "h200_sxm"),
    ],
)
def test_aliases(alias, key):
    assert get_system(alias).key == key


def test_unknown_system_lists_known():
    with pytest.raises(KeyError, match="known: .*gb200"):
        get_system("tpu-v5p")


def test_precision_fallback():
    h100 = get_system("h100_sxm")
    assert not h100.native("fp4")
    assert h100.peak_tflops("fp4") == h100.tflops["fp8"]  # fp4 weights, fp8 math on Hopper
    assert get_system("b200").peak_tflops("fp4") == 2 * get_system("b200").peak_tflops("fp8")
    assert set(PRECISIONS) == set(h100.tflops)


def test_validation_only_systems_resolve_but_are_not_planned():
    from tokenfab.factory.catalog import all_systems

    a100 = get_system("a100_sxm")
    assert not a100.planning and "a100_sxm" not in load_systems() and "a100_sxm" in all_systems()
    assert a100.peak_tflops("fp8") == a100.tflops["bf16"]  # no fp8 tensor cores on Ampere
    assert get_system("gb200_sxm").key == "gb200"
