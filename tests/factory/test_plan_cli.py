"""`tokenfab plan`: JSON, CSV, plot, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from tokenfab.cli import app

SMALL = ["plan", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--system", "h100", "--gpus", "4"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def test_plan_json(runner: CliRunner) -> None:
    res = runner.invoke(app, [*SMALL, "--isl", "512", "--osl", "256", "--tpot", "20", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["query"]["system"] == "h100_sxm" and d["query"]["precision"] == "bf16"
    assert d["best"]["tpot_ms"] <= 20
    assert d["frontier"] and d["search"]["evaluated"] > 0
    e = d["economics"]
    # $/Mtok follows from $/GPU-hour and tokens/s/GPU of the best point
    tps = d["best"]["tokens_per_s_per_gpu"]
    assert e["usd_per_mtok"] == pytest.approx(e["usd_per_gpu_hour"] / (tps * 3600 / 1e6), rel=1e-3)
    assert e["usd_per_gpu_hour"] == 3.0  # the cited default for H100 SXM


def test_plan_table_csv_and_plot(runner: CliRunner, tmp_path) -> None:
    out_csv, out_png = tmp_path / "f.csv", tmp_path / "f.png"
    res = runner.invoke(
        app,
        [*SMALL, "--price-per-gpu-hour", "2.5", "--csv", str(out_csv), "--plot", str(out_png)],
    )
    assert res.exit_code == 0, res.output
    assert "Pareto frontier" in res.stdout and "$2.50" in res.stdout
    rows = list(csv.DictReader(out_csv.open()))
    assert rows and float(rows[0]["tokens_per_s_per_gpu"]) > 0
    assert out_png.stat().st_size > 10_000
    assert out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["plan", "--model", "no/such-model", "--system", "h100"], "unknown model"),
        (["plan", "--model", "meta-llama/Llama-3.1-70B", "--system", "tpu9"], "unknown system"),
        (
            ["plan", "--model", "meta-llama/Llama-3.1-70B", "--system", "h100", "--gpus", "0"],
            "gpus",
        ),
        (
            ["plan", "--model", "deepseek-ai/DeepSeek-R1", "--system", "h100", "--gpus", "2"],
            "does not fit",
        ),
        (
            ["plan", "--model", "meta-llama/Llama-3.1-70B", "--system", "h100", "--mode", "x"],
            "mode",
        ),
        (["plan", "--system", "h100"], "--model"),
    ],
)
def test_bad_input_is_one_line_exit_2(runner: CliRunner, args: list[str], needle: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert needle in err and "\n" not in err and err.startswith("error:")


def test_subcommands_stay_reachable(runner: CliRunner) -> None:
    res = runner.invoke(app, ["plan", "validate", "--help"])
    assert res.exit_code == 0 and "--data" in res.stdout
    res = runner.invoke(app, ["plan", "keynote", "--help"])
    assert res.exit_code == 0 and "--osl" in res.stdout


def test_disagg_layouts_print_literally(runner: CliRunner) -> None:
    # "2P[tp1 b4] + 1D[tp2 b64]" must not be eaten as rich markup
    res = runner.invoke(app, [*SMALL, "--mode", "disagg", "--top", "5"])
    assert res.exit_code == 0, res.output
    assert "P[tp" in res.stdout and "D[tp" in res.stdout


def test_system_without_default_price_still_plans(runner: CliRunner) -> None:
    from tokenfab.factory.catalog import get_system, load_systems
    from tokenfab.factory.economics import load_prices

    try:
        sysm = get_system("a100")
    except KeyError:
        pytest.skip("no validation-only system in this catalog")
    if sysm.key in load_systems() or sysm.key in load_prices().gpu_hour_usd:
        pytest.skip("a100 has a default price here")
    res = runner.invoke(app, ["plan", "-m", "meta-llama/Llama-3.1-8B-Instruct", "-s", "a100",
                              "-n", "2", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    e = json.loads(res.stdout)["economics"]
    assert e["usd_per_mtok"] is None and e["tokens_per_s_per_mw"] > 0


def test_unknown_hf_id_says_pass_a_config_json(runner: CliRunner) -> None:
    res = runner.invoke(app, ["plan", "-m", "acme/Brand-New-13B", "-s", "h100", "--json"])
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert err.startswith("error: unknown model 'acme/Brand-New-13B'") and "\n" not in err
    assert "config.json" in err
    res = runner.invoke(app, ["plan", "-m", "/nonexistent/config.json", "-s", "h100"])
    assert res.exit_code == 2 and "no such config file" in res.stderr


def test_default_limits_pick_an_interactive_point(runner: CliRunner) -> None:
    res = runner.invoke(app, [*SMALL, "--json"])
    d = json.loads(res.stdout)
    assert d["query"]["ttft_ms"] == 2000 and d["query"]["tpot_ms"] == 50
    assert d["best"]["ttft_ms"] <= 2000 and d["best"]["tpot_ms"] <= 50
    # 0 lifts a limit: the best point is then the most tokens/s per GPU there is
    res = runner.invoke(app, [*SMALL, "--ttft", "0", "--tpot", "0", "--json"])
    free = json.loads(res.stdout)
    assert free["query"]["ttft_ms"] is None and free["query"]["tpot_ms"] is None
    assert free["best"]["tokens_per_s_per_gpu"] >= d["best"]["tokens_per_s_per_gpu"]
    bad = runner.invoke(app, [*SMALL, "--ttft", "-1"])
    assert bad.exit_code == 2 and "--ttft" in bad.stderr


def test_frontier_carries_error_bars(runner: CliRunner) -> None:
    from tokenfab.factory.errorbars import bundled_error_bars

    if not bundled_error_bars().known:
        pytest.skip("no data/error_bars.json shipped")
    d = json.loads(runner.invoke(app, [*SMALL, "--json"]).stdout)
    for c in [d["best"], *d["frontier"]]:
        lo, hi = c["ttft_ms_interval"]
        assert lo <= c["ttft_ms"] <= hi
        lo, hi = c["tpot_ms_interval"]
        assert lo <= c["tpot_ms"] <= hi
        lo, hi = c["tokens_per_s_per_gpu_interval"]
        assert lo <= c["tokens_per_s_per_gpu"] <= hi
        assert c["interval_level"] == 0.8
