"""Cross-validation of the calibrated physics: fold assignments and refits per fold.

Every fold's calibration is refitted from the uncalibrated defaults on the other folds, so
nothing of a held-out row (nor a duplicate of it: the bundled data is de-duplicated) reaches
its prediction. This is the only source of the accuracy figures and of the error bars.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tokenfab.factory.calibrate import cals_from_fit, fit
from tokenfab.factory.measured import Case
from tokenfab.factory.validate import RowResult, predict_cases


def kfold(cases: Sequence[Case], k: int, seed: int = 0, key=None) -> list[int]:
    """Fold index per case: random (`key` None) or grouped so all cases with the same
    `key(case)` fall in one fold (e.g. a whole concurrency sweep, or a whole model)."""
    rng = np.random.default_rng(seed)
    if key is None:
        idx = rng.permutation(len(cases))
        folds = [0] * len(cases)
        for j, i in enumerate(idx):
            folds[i] = j % k
        return folds
    groups = sorted({key(c) for c in cases}, key=str)
    order = rng.permutation(len(groups))
    # greedy balance: biggest groups first onto the lightest fold
    sizes = {g: 0 for g in groups}
    for c in cases:
        sizes[key(c)] += 1
    load = [0] * k
    where: dict = {}
    for gi in sorted(order, key=lambda i: -sizes[groups[i]]):
        f = int(np.argmin(load))
        where[groups[gi]] = f
        load[f] += sizes[groups[gi]]
    return [where[key(c)] for c in cases]


def cross_validate(
    cases: Sequence[Case],
    folds: Sequence[int],
    sweeps: int = 25,
    progress: Callable[[str], None] | None = None,
) -> list[RowResult]:
    """Fit on all folds but one, predict the held-out one, for every fold (each fit starts
    from the uncalibrated defaults). Returns the held-out RowResults in case order."""
    out: list = [None] * len(cases)
    for f in sorted(set(folds)):
        train = [c for c, g in zip(cases, folds, strict=True) if g != f]
        test_idx = [i for i, g in enumerate(folds) if g == f]
        cal_for = cals_from_fit(fit(train, sweeps=sweeps))
        preds = predict_cases([cases[i] for i in test_idx], cal_for)
        for i, r in zip(test_idx, preds, strict=True):
            out[i] = r
        if progress:
            progress(f"fold {f}: trained on {len(train)}, predicted {len(test_idx)}")
    return out
