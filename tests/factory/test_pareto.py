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
