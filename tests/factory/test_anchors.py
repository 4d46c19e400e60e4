"""Measured anchors: a prediction is pulled toward other measurements of the same deployment,
shrunk by hand-checkable amounts, never toward the row's own measurement, and not at all
for a deployment without measurements."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenfab.factory.anchors import (
    Anchors,
    build_anchors,
    bundled_anchors,
    family_key,
    sweep_key,
)
from tokenfab.factory.cli import app
from tokenfab.factory.measured import Case, case_from_row, read_rows
from tokenfab.factory.serving import AggDeployment
from tokenfab.factory.validate import RowResult, predict_cases


@pytest.fixture(scope="module")
def bundled_csv() -> Path:
    return Path(str(resources.files("tokenfab.factory").joinpath("data/measured_serving.csv")))


@pytest.fixture(scope="module")
def agg_case(bundled_csv) -> Case:
    row = next(r for r in read_rows(bundled_csv) if r["mode"] == "agg")
    return case_from_row(row)


def _at(case: Case, row_id: str, users: int, ttft: float, tpot: float) -> Case:
    d = case.deployment
    assert isinstance(d, AggDeployment)
    return replace(
        case,
        row_id=row_id,
        deployment=replace(d, concurrency=users),
        ttft_ms=ttft,
        tpot_ms=tpot,
    )


def _physics(cases: list[Case], ttft: float, tpot: float) -> list[RowResult]:
    return [RowResult(c.row_id, c.backend, ttft, tpot, c.ttft_ms, c.tpot_ms) for c in cases]


def test_shrinkage_worked_by_hand(agg_case):
    # two measurements of one sweep at 8 users, each TPOT 2x the physics (log ratio r):
    # family level r * 2/3; sweep level of the rest (r/3) * 2/3 = 2r/9; local mean of the
    # remaining r/9 at weight 1 each: 2 (r/9) / (2 + 1) = 2r/27. Total 26r/27.
    pts = [_at(agg_case, f"m{i}", 8, 100.0, 20.0) for i in range(2)]
    anchors = build_anchors(pts, _physics(pts, 100.0, 10.0))
    lt, lp = anchors.log_correction(_at(agg_case, "new", 8, 0.0, 0.0))
    assert lt == pytest.approx(0.0)  # TTFT measured = physics
    assert lp == pytest.approx(math.log(2.0) * 26 / 27)


def test_far_concurrency_pulls_less(agg_case):
    pts = [_at(agg_case, f"m{i}", 8, 100.0, 20.0) for i in range(2)]
    anchors = build_anchors(pts, _physics(pts, 100.0, 10.0))
    near = anchors.log_correction(_at(agg_case, "q", 8, 0, 0))[1]
    far = anchors.log_correction(_at(agg_case, "q", 512, 0, 0))[1]
    assert math.log(2.0) * 8 / 9 == pytest.approx(far, rel=1e-3)  # family + sweep only
    assert far < near < math.log(2.0)


def test_own_measurement_never_used(agg_case):
    pts = [_at(agg_case, "only", 8, 100.0, 20.0)]
    anchors = build_anchors(pts, _physics(pts, 100.0, 10.0))
    assert anchors.log_correction(pts[0]) == (0.0, 0.0)
    assert anchors.log_correction(_at(agg_case, "other", 8, 0, 0))[1] > 0
    # the same id measured again (another run) is another measurement: it is anchored
    again = _at(agg_case, "only", 8, 100.0, 21.0)
    assert anchors.log_correction(again)[1] > 0
    back = Anchors.from_dict(json.loads(json.dumps(anchors.to_dict())))
    assert back.log_correction(pts[0]) == (0.0, 0.0)


def test_unmeasured_family_keeps_the_physics(agg_case):
    pts = [_at(agg_case, f"m{i}", 8, 100.0, 20.0) for i in range(3)]
    anchors = build_anchors(pts, _physics(pts, 100.0, 10.0))
    other_version = replace(_at(agg_case, "v", 8, 0, 0), version="99.0")
    assert family_key(other_version) != family_key(pts[0])
    assert anchors.log_correction(other_version) == (0.0, 0.0)
    # another sweep of the same family gets the family level only
    d = agg_case.deployment
    longer = replace(_at(agg_case, "l", 8, 0, 0), deployment=replace(d, isl=d.isl * 2))
    assert sweep_key(longer) != sweep_key(pts[0])
    assert anchors.log_correction(longer)[1] == pytest.approx(math.log(2.0) * 3 / 4)


def test_missing_measurements_are_ignored(agg_case):
    pts = [_at(agg_case, "t", 8, 100.0, 20.0), replace(_at(agg_case, "u", 8, 0, 0), tpot_ms=None)]
    anchors = build_anchors(pts, _physics(pts, 100.0, 10.0))
    # the TPOT-less point neither adds to nor dilutes the TPOT estimate
    assert anchors.log_correction(_at(agg_case, "q", 8, 0, 0))[1] == pytest.approx(
        math.log(2.0) * (1 / 2 + 1 / 4 + 1 / 8)
    )


def test_json_round_trip(agg_case):
    pts = [_at(agg_case, f"m{i}", 2**i, 100.0 * (i + 1), 20.0) for i in range(4)]
    anchors = build_anchors(pts, _physics(pts, 100.0, 10.0))
    back = Anchors.from_dict(json.loads(json.dumps(anchors.to_dict())))
    q = _at(agg_case, "q", 6, 0, 0)
    assert back.log_correction(q) == pytest.approx(anchors.log_correction(q), abs=1e-4)


def test_bundled_anchors_move_measured_rows_only(bundled_csv):
    rows = read_rows(bundled_csv)[:40]
    cases = [case_from_row(r) for r in rows]
    assert bundled_anchors() is not None
    anchored = predict_cases(cases)
    physics = predict_cases(cases, physics_only=True)
    assert any(
        abs(a.tpot_ms / p.tpot_ms - 1) > 1e-3 for a, p in zip(anchored, physics, strict=True)
    )
    assert all(a.physics().tpot_ms == p.tpot_ms for a, p in zip(anchored, physics, strict=True))
    alien = [replace(c, version="0.0-unmeasured") for c in cases]
    for a, p in zip(predict_cases(alien), physics, strict=True):
        assert (a.ttft_ms, a.tpot_ms) == (p.ttft_ms, p.tpot_ms)


def test_validate_physics_only_flag(tmp_path, bundled_csv):
    src = bundled_csv.read_text().splitlines()
    f = tmp_path / "few.csv"
    f.write_text("\n".join(src[:31]) + "\n")
    outs = {}
    for flag in ([], ["--physics-only"]):
        res = CliRunner().invoke(app, ["validate", "--data", str(f), "--json", *flag])
        assert res.exit_code == 0, res.output
        outs[bool(flag)] = json.loads(res.output)
    assert outs[True].keys() == outs[False].keys()
    assert outs[True]["predicted"] == outs[False]["predicted"] == 30
    assert outs[True]["tpot_mdape"] != outs[False]["tpot_mdape"]
    # per-row CSV: anchored and physics predictions side by side, errors that match the summary
    rows_csv = tmp_path / "rows.csv"
    res = CliRunner().invoke(app, ["validate", "--data", str(f), "--json", "--out", str(rows_csv)])
    assert res.exit_code == 0, res.output
    got = read_rows(rows_csv)
    assert len(got) == 30 and {"ttft_physics_ms", "tpot_ape"} <= set(got[0])
    apes = sorted(float(r["tpot_ape"]) for r in got)
    assert (apes[14] + apes[15]) / 2 == pytest.approx(outs[False]["tpot_mdape"], abs=0.01)
    bad = CliRunner().invoke(
        app, ["validate", "--data", str(f), "--out", str(tmp_path / "no/x.csv")]
    )
    assert bad.exit_code == 2 and "cannot write" in bad.output


def test_non_finite_measurements_are_not_measurements(tmp_path, bundled_csv):
    lines = bundled_csv.read_text().splitlines()
    head, rows = lines[0], lines[1:9]
    rows[-1] = ",".join(rows[-1].split(",")[:-2] + ["inf", "nan"])
    f = tmp_path / "inf.csv"
    f.write_text("\n".join([head, *rows]) + "\n")
    res = CliRunner().invoke(app, ["validate", "--data", str(f), "--json", "--cv", "2"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["predicted"] == 8 and math.isfinite(out["ttft_mdape"])
    assert math.isfinite(out["ttft_p90_ape"]) and math.isfinite(out["tpot_p90_ape"])
