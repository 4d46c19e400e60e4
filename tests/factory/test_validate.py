"""`tokenfab plan validate`: every computable row predicted, stable JSON keys, clear errors."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenfab.factory.cli import app
from tokenfab.factory.errorbars import bundled_error_bars
from tokenfab.factory.measured import case_from_row, concurrency_of, read_rows
from tokenfab.factory.serving import AggDeployment, DisaggDeployment

KEYS = {"rows", "predicted", "skipped", "ttft_mdape", "tpot_mdape", "ttft_p90_ape", "tpot_p90_ape"}
if bundled_error_bars().known:  # the share inside the error bars, when they are shipped
    KEYS |= {"ttft_in_interval", "tpot_in_interval"}


@pytest.fixture(scope="module")
def bundled_csv() -> Path:
    return Path(str(resources.files("tokenfab.factory").joinpath("data/measured_serving.csv")))


@pytest.fixture(scope="module")
def rows(bundled_csv) -> list[dict]:
    return read_rows(bundled_csv)


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_json_keys_and_skips(tmp_path, rows):
    pick = rows[:20]
    alien = dict(rows[0], id="alien", model_path="acme/NoSuchModel-7B")
    other_gpu = dict(rows[1], id="newgpu", system="gb300")  # held-out systems still predicted
    f = _write(tmp_path / "few.csv", [*pick, alien, other_gpu])
    res = CliRunner().invoke(app, ["validate", "--data", str(f), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert set(out) == KEYS
    assert out["rows"] == 22 and out["predicted"] == 21 and out["skipped"] == 1
    assert 0 <= out["tpot_mdape"] <= out["tpot_p90_ape"]


def test_table_output(tmp_path, rows):
    f = _write(tmp_path / "t.csv", rows[:3])
    res = CliRunner().invoke(app, ["validate", "--data", str(f)])
    assert res.exit_code == 0 and "TPOT MdAPE" in res.output


def test_missing_file_is_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["validate", "--data", str(tmp_path / "nope.csv")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_column_mapping(rows):
    agg = next(r for r in rows if r["mode"] == "agg" and r["attention_dp_size"] == "4")
    c = case_from_row(agg)
    assert isinstance(c.deployment, AggDeployment)
    lay = c.deployment.layout
    # batch_size is per attention-DP rank; the run's concurrency is on the source column
    assert c.deployment.concurrency == int(agg["batch_size"]) * 4
    assert lay.num_gpus == int(agg["tp_size"]) * 4
    assert lay.moe_tp_size * lay.ep == lay.moe_group
    dis = next(r for r in rows if r["mode"] == "disagg" and r["decode_num_workers"])
    d = case_from_row(dis).deployment
    assert isinstance(d, DisaggDeployment)
    assert d.decode_workers == int(dis["decode_num_workers"])
    assert d.concurrency == concurrency_of(dis)
    assert d.concurrency == d.decode_workers * d.decode_batch


def test_whole_bundled_file_predicted(bundled_csv):
    from tokenfab.factory.validate_report import validate_file

    summary, results, skipped = validate_file(bundled_csv)
    assert summary["rows"] == 3298 and summary["skipped"] == 0 and not skipped
    assert all(r.ttft_ms > 0 and r.tpot_ms > 0 for r in results)


def test_kfold_random_and_grouped(rows):
    from tokenfab.factory.crossval import kfold

    cases = [case_from_row(r) for r in rows[:200]]
    folds = kfold(cases, 5, seed=0)
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    assert max(folds.count(f) for f in range(5)) - min(folds.count(f) for f in range(5)) <= 1
    grouped = kfold(cases, 5, seed=0, key=lambda c: c.model.name)
    by_model: dict[str, set[int]] = {}
    for c, f in zip(cases, grouped, strict=True):
        by_model.setdefault(c.model.name, set()).add(f)
    assert all(len(fs) == 1 for fs in by_model.values())  # a model never spans two folds


def test_cross_validation_cli(tmp_path, rows):
    # two folds of a dozen rows: refits twice (a few seconds), same stable keys
    f = _write(tmp_path / "cv.csv", rows[100:112])
    res = CliRunner().invoke(app, ["validate", "--data", str(f), "--json", "--cv", "2"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert set(out) == KEYS and out["predicted"] == 12
    bad = CliRunner().invoke(app, ["validate", "--data", str(f), "--cv", "1"])
    assert bad.exit_code == 2


def test_odd_quant_names_and_empty_values_still_predicted(tmp_path, rows):
    odd = [
        dict(rows[0], id="w8a8", precision="int8", gemm_quant_mode="w8a8", moe_quant_mode=""),
        dict(rows[1], id="weird", precision="q3_k_m", gemm_quant_mode="", moe_quant_mode=""),
        dict(rows[2], id="nomeas", silicon_ttft_ms="", silicon_tpot_ms=""),
    ]
    f = _write(tmp_path / "odd.csv", odd)
    res = CliRunner().invoke(app, ["validate", "--data", str(f), "--json"])
    out = json.loads(res.output)
    assert out["predicted"] == 3 and out["skipped"] == 0


def test_bundled_file_has_each_measurement_once(rows):
    from tokenfab.factory.measured import dedupe_rows

    kept, dropped = dedupe_rows(rows)
    assert not dropped and len(kept) == len(rows)
    # the same run exported again under another id and config id is one measurement
    again = dict(rows[5], id="renamed", silicon_data_source=rows[5]["silicon_data_source"]
                 .replace("config_id=", "config_id=9"))  # fmt: skip
    kept, dropped = dedupe_rows([*rows[:10], again])
    assert len(kept) == 10 and dropped == [("renamed", rows[5]["id"])]
    # a re-measurement (other TTFT) is not a duplicate
    other = dict(again, silicon_ttft_ms=str(float(rows[5]["silicon_ttft_ms"]) * 1.01))
    assert len(dedupe_rows([*rows[:10], other])[0]) == 11
