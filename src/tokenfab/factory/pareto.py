"""Pareto frontier of two maximized objectives (e.g. tokens/s/GPU against tokens/s/user).

A point is on the frontier when no other point is at least as good in both objectives and
strictly better in one. One sort and one sweep: O(n log n), vectorized with numpy so the search
can hand it tens of thousands of candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def pareto_indices(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices of the points maximizing both x and y, ordered by increasing x.

    Exact duplicates keep one representative (the lowest index). NaNs are never on the frontier.
    """
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError("x and y must be 1-D arrays of the same length")
    ok = np.flatnonzero(~(np.isnan(xa) | np.isnan(ya)))
    if ok.size == 0:
        return np.empty(0, dtype=int)
    # Sort by x descending, then y descending, then index ascending (stable tie-break): walking
    # that order, a point is on the frontier iff its y beats every y seen so far.
    order = ok[np.lexsort((ok, -ya[ok], -xa[ok]))]
    ys = ya[order]
    best_before = np.concatenate(([-np.inf], np.maximum.accumulate(ys)[:-1]))
    keep = order[ys > best_before]
    return keep[::-1]


def pareto_front(items: Sequence[T], x: Callable[[T], float], y: Callable[[T], float]) -> list[T]:
    """The items on the frontier of (x(item), y(item)), both maximized, by increasing x."""
    if not items:
        return []
    idx = pareto_indices([x(i) for i in items], [y(i) for i in items])
    return [items[int(i)] for i in idx]


def value_at(frontier_x: np.ndarray, frontier_y: np.ndarray, x_min: float) -> float:
    """Best y among frontier points with x >= x_min (0.0 if none reaches x_min).

    The frontier is a staircase: at a required interactivity x_min, the achievable throughput
    is that of the cheapest frontier point still at least that interactive.
    """
    fx = np.asarray(frontier_x, dtype=float)
    fy = np.asarray(frontier_y, dtype=float)
    mask = fx >= x_min
    return float(fy[mask].max()) if mask.any() else 0.0


def marginal_mask(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, x_gain: float, y_cost: float
) -> np.ndarray:
    """Which frontier points (sorted by increasing x) are worth showing: a point is dropped
    when another point reaches within a factor `x_gain` of its x while delivering at least
    `y_cost` times its y. Such a point buys a sliver of x (interactivity) at a multiple of y
    (e.g. one user on 72 GPUs for 10% faster tokens than nine users on the same GPUs).
    The point of highest y always stays."""
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    keep = np.ones(len(xa), dtype=bool)
    for i in range(len(xa)):
        near = xa * x_gain >= xa[i]
        keep[i] = not np.any(near & (ya >= y_cost * ya[i]))
    return keep
