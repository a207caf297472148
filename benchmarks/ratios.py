"""Ratios of labels or times between benchmark variants, with a bootstrap interval
over seeds; a run that never reached its target counts as infinitely costly.

Shared by ``extrapolation.py`` (labels to a target against random) and
``remote_oracle.py`` (wall time to a target, streaming against serial).
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES, BOOTSTRAP_SEED = 2000, 0


def median_inf(values: list[float]) -> float:
    """The median, with ``inf`` for a run that never reached the target."""
    ordered = sorted(values)
    n = len(ordered)
    if n % 2:
        return ordered[n // 2]
    low, high = ordered[n // 2 - 1], ordered[n // 2]
    return math.inf if math.isinf(high) else (low + high) / 2


def _ratio(mine: float, theirs: float) -> float:
    """``mine / theirs``: 1 when both need no label, ``inf`` when only ``mine`` never
    gets there (or ``theirs`` needs none), NaN (undefined) when neither does."""
    if math.isinf(mine) and math.isinf(theirs):
        return math.nan
    if theirs == 0:
        return 1.0 if mine == 0 else math.inf
    return mine / theirs


def bootstrap_ratio(mine: dict[int, float], theirs: dict[int, float]) -> dict:
    """Median labels-to-target of ``mine`` over ``theirs`` (per seed; ``inf`` when a
    run never reached it), and its bootstrap 95% interval over seeds resampled with
    replacement: paired over the seeds both have, else each resampled alone."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    shared = sorted(set(mine) & set(theirs))
    ratios = []
    for _ in range(RESAMPLES):
        if shared and len(shared) == len(mine) == len(theirs):
            draw = rng.choice(shared, size=len(shared))
            a, b = [mine[s] for s in draw], [theirs[s] for s in draw]
        else:
            a = rng.choice(list(mine.values()), size=len(mine)).tolist()
            b = rng.choice(list(theirs.values()), size=len(theirs)).tolist()
        ratios.append(_ratio(median_inf(a), median_inf(b)))
    defined = sorted(r for r in ratios if not math.isnan(r))
    if defined:  # order statistics: an infinite bound stays infinite
        n = len(defined)
        low, high = defined[int(0.025 * (n - 1))], defined[math.ceil(0.975 * (n - 1))]
    else:
        low = high = math.nan
    return {
        "median_ratio": _ratio(median_inf(list(mine.values())), median_inf(list(theirs.values()))),
        "ci95": [low, high],
        "undefined_resamples": len(ratios) - len(defined),
    }
