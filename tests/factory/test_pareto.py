"""Pareto frontier on cases worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tokenfab.factory.pareto import pareto_front, pareto_indices, value_at


def test_dominated_points_are_dropped() -> None:
    # (x, y): (1, 5) (2, 4) (3, 1) are mutually non-dominated; (1, 3) is below (1, 5);
    # (2, 2) is below (2, 4); (0.5, 4.5) is dominated by (1, 5).
    x = [1, 2, 3, 1, 2, 0.5]
    y = [5, 4, 1, 3, 2, 4.5]
    assert pareto_indices(x, y).tolist() == [0, 1, 2]


def test_frontier_is_ordered_by_increasing_x_and_decreasing_y() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random(500), rng.random(500)
    idx = pareto_indices(x, y)
    assert np.all(np.diff(x[idx]) > 0)
    assert np.all(np.diff(y[idx]) < 0)
    # No point in the cloud dominates a frontier point.
    for i in idx:
        dominated = (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        assert not dominated.any()


def test_ties_and_duplicates_keep_one_point() -> None:
    # Equal x: only the higher y stays; exact duplicates: the first index stays.
    assert pareto_indices([1, 1, 2], [3, 4, 1]).tolist() == [1, 2]
    assert pareto_indices([1, 1], [2, 2]).tolist() == [0]


def test_nan_and_empty() -> None:
    assert pareto_indices([], []).tolist() == []
    assert pareto_indices([1, np.nan, 2], [1, 9, 0.5]).tolist() == [0, 2]
    with pytest.raises(ValueError):
        pareto_indices([1, 2], [1])


def test_pareto_front_on_objects_and_value_at() -> None:
    pts = [{"u": 10, "g": 100}, {"u": 50, "g": 60}, {"u": 30, "g": 50}, {"u": 100, "g": 10}]
    front = pareto_front(pts, x=lambda p: p["u"], y=lambda p: p["g"])
    assert [p["u"] for p in front] == [10, 50, 100]
    fx = np.array([p["u"] for p in front], dtype=float)
    fy = np.array([p["g"] for p in front], dtype=float)
    assert value_at(fx, fy, 40) == 60  # the 50 tok/s/user point still qualifies
    assert value_at(fx, fy, 5) == 100
    assert value_at(fx, fy, 101) == 0.0


def test_marginal_points_are_pruned():
    from tokenfab.factory.pareto import marginal_mask

    # x = tokens/s/user ascending, y = tokens/s/GPU descending (a frontier)
    x = [10.0, 50.0, 100.0, 110.0, 160.0]
    y = [900.0, 400.0, 100.0, 20.0, 10.0]
    keep = marginal_mask(x, y, 1.15, 2.0)
    # 110 is within 15% of 100 at a fifth of its throughput; 160 is 45% faster than 110: kept
    assert keep.tolist() == [True, True, True, False, True]


def test_plan_frontier_has_no_dear_points():
    from tokenfab.factory.catalog import get_system
    from tokenfab.factory.modelspec import load_model_spec
    from tokenfab.factory.search import PRUNE_GPU_COST, PRUNE_USER_GAIN, PlanQuery, run_search

    q = PlanQuery(load_model_spec("deepseek-ai/DeepSeek-R1"), get_system("gb200"), 72, 1024,
                  1024, 2000.0, 50.0, "fp8")  # fmt: skip
    r = run_search(q)
    f = r.frontier
    for a in f:
        for b in f:
            dear = (b.tokens_per_s_per_user * PRUNE_USER_GAIN >= a.tokens_per_s_per_user
                    and b.tokens_per_s_per_gpu >= PRUNE_GPU_COST * a.tokens_per_s_per_gpu)  # fmt: skip
            assert not dear or a is r.best
    assert any("not shown" in n for n in r.notes)
    assert r.best is not None and r.best in f
