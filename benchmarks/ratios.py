"""Paired comparisons of two benchmark variants over seeds, with every run kept.

A benchmark compares *mine* (the variant a claim says is better: uncertainty
selection, streaming, fine-tuning) with *theirs* (its baseline), seed by seed. Two
kinds of per-seed figure are compared, both "lower is better":

- **an area** under a learning curve (the error averaged over labels or time). The
  primary figure of a claim (``../shared`` proof rules): every run that produced a
  curve has one, so nothing is censored. A run without one counts as lost by its side.
- **a cost to a target** (labels or seconds until the error first reaches a target
  fixed before the runs). A run that stopped first is *censored*: :class:`Cost` keeps
  what it had spent, ``reached=False``. It is never dropped.

Censored pairs are resolved against the claim, so that censoring can only weaken it:

========================  ==========================================================
mine / theirs             the seed's ratio
========================  ==========================================================
both reached              ``mine / theirs``
neither reached           ``1`` (a tie)
only mine reached         ``mine / spent(theirs)``: an upper bound, as theirs would
                          have needed more than it spent
only theirs reached       ``inf``, "never reached": no finite bound is known
========================  ==========================================================

Over the seeds, :func:`compare` reports the median ratio, a bootstrap 95% interval of
that median (the seeds resampled in pairs; no resample is ever dropped), the exact
two-sided Wilcoxon signed-rank p on the log ratios (ties, ratio 1, carry no sign and
are left out, Wilcoxon's rule) and the share of seeds each side reached the target.
:func:`holm` corrects the p of the secondary comparisons for multiplicity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

RESAMPLES, BOOTSTRAP_SEED = 10_000, 0
EXACT_UP_TO = 50
"""Untied seeds up to which the Wilcoxon p is exact (counts of 2**50 stay exact floats)."""


@dataclass(frozen=True)
class Cost:
    """One run's cost to a target: ``value`` is the cost at the target where
    ``reached``, else what the run spent before it stopped (censored there)."""

    value: float
    reached: bool = True

    @classmethod
    def never(cls, spent: float) -> Cost:
        return cls(spent, reached=False)


def seed_ratio(mine: Cost | float | None, theirs: Cost | float | None) -> float:
    """One seed's ``mine / theirs``, censoring resolved against ``mine`` (see the
    module's table). A float is an uncensored figure (an area). None is a run that
    produced none (it failed): ``inf`` where mine has none, else 1, a tie, as a
    baseline's failure is no evidence for the claim."""
    if mine is None:
        return math.inf
    if theirs is None:
        return 1.0
    mine, theirs = _cost(mine), _cost(theirs)
    if math.isnan(mine.value) or math.isnan(theirs.value):
        raise ValueError("a NaN figure: give None for a run without one (it loses)")
    if not mine.reached:
        return 1.0 if not theirs.reached else math.inf
    if theirs.value <= 0:
        return 1.0 if mine.value <= 0 else math.inf
    return mine.value / theirs.value


def _cost(value: Cost | float) -> Cost:
    return value if isinstance(value, Cost) else Cost(float(value))


def median(values) -> float:
    """The median; ``inf`` when the middle reaches a run that never got there."""
    ordered = np.sort(np.asarray(values, dtype=float))
    n = len(ordered)
    if n == 0:
        return math.nan
    if n % 2:
        return float(ordered[n // 2])
    low, high = ordered[n // 2 - 1], ordered[n // 2]
    return math.inf if math.isinf(high) else float((low + high) / 2)


def bootstrap_interval(ratios: list[float], resamples: int = RESAMPLES) -> list[float]:
    """The 95% percentile interval of the median ratio, seeds resampled with
    replacement; order statistics, so that an infinite bound stays infinite."""
    values = np.asarray(ratios, dtype=float)
    if len(values) == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = np.sort(rng.choice(values, (resamples, len(values))), axis=1)
    n = len(values)
    if n % 2:
        medians = draws[:, n // 2]
    else:  # the mean of the middle two; inf + finite stays inf
        medians = np.where(
            np.isinf(draws[:, n // 2]), math.inf, (draws[:, n // 2 - 1] + draws[:, n // 2]) / 2
        )
    medians = np.sort(medians)
    low = medians[int(math.floor(0.025 * (resamples - 1)))]
    high = medians[int(math.ceil(0.975 * (resamples - 1)))]
    return [float(low), float(high)]


def wilcoxon_exact(ratios: list[float]) -> float | None:
    """The exact two-sided Wilcoxon signed-rank p of ``log(ratio)`` against 0.

    Ties (ratio 1) are left out; tied magnitudes share their mean rank; an infinite
    ratio ranks above every finite one. None with no untied seed, or above
    :data:`EXACT_UP_TO` untied seeds."""
    if any(math.isnan(r) for r in ratios):
        raise ValueError("a NaN ratio: a run without a figure is None, which loses")
    logs = [math.log(r) if r > 0 else -math.inf for r in ratios if r != 1.0]
    n = len(logs)
    if n == 0 or n > EXACT_UP_TO:
        return None
    finite = [abs(x) for x in logs if math.isfinite(x)]
    beyond = (max(finite) if finite else 0.0) + 1.0
    # rounded: |log(a/b)| and |log(b/a)| may differ in the last bit, a false non-tie
    magnitudes = np.round([abs(x) if math.isfinite(x) else beyond for x in logs], 12)
    doubled = np.rint(2 * _mean_ranks(magnitudes)).astype(int)  # mean ranks: halves
    positive = int(sum(r for r, x in zip(doubled, logs, strict=True) if x > 0))
    # the null distribution of 2 W+ over all 2**n sign sets, by convolution
    counts = np.zeros(int(doubled.sum()) + 1)
    counts[0] = 1.0
    for rank in doubled:
        counts[rank:] = counts[rank:] + counts[:-rank]
    centre = doubled.sum() / 2
    sums = np.arange(len(counts))
    extreme = np.abs(sums - centre) >= abs(positive - centre) - 1e-9
    return float(counts[extreme].sum() / counts.sum())


def _mean_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def compare(
    mine: Mapping[int, Cost | float | None], theirs: Mapping[int, Cost | float | None]
) -> dict:
    """Seed-by-seed ratios ``mine / theirs`` and their summary.

    Both maps are keyed by seed; a seed that only one side has is a run the other side
    lost (None). Returns ``ratios`` (per seed, ``inf`` as "never reached" once written
    as JSON by :func:`jsonable_ratios`), ``median``, ``interval_95``, ``wilcoxon_p``,
    ``seeds``, ``ties`` and, for costs, ``reached`` (the share of seeds per side)."""
    seeds = sorted(set(mine) | set(theirs))
    ratios = {seed: seed_ratio(mine.get(seed), theirs.get(seed)) for seed in seeds}
    values = list(ratios.values())
    result = {
        "seeds": len(seeds),
        "ratios": ratios,
        "median": median(values),
        "interval_95": bootstrap_interval(values),
        "wilcoxon_p": wilcoxon_exact(values),
        "ties": sum(r == 1.0 for r in values),
    }
    costs = [v for v in (*mine.values(), *theirs.values()) if isinstance(v, Cost)]
    if costs:  # over every seed: a side's missing run did not reach the target
        result["reached"] = {
            "mine": _share([mine.get(seed) for seed in seeds]),
            "theirs": _share([theirs.get(seed) for seed in seeds]),
        }
    return result


def _share(values: list) -> float:
    return sum(isinstance(v, Cost) and v.reached for v in values) / len(values) if values else 0.0


def holm(pvalues: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm's step-down adjusted p for a family of comparisons. A comparison without a
    p (None: every seed tied) stays None but counts in the family's size."""
    known = sorted((p, name) for name, p in pvalues.items() if p is not None)
    adjusted: dict[str, float | None] = {name: None for name in pvalues}
    running, m = 0.0, len(pvalues)  # a comparison without a p (all ties) still counts
    for i, (p, name) in enumerate(known):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[name] = running
    return adjusted


def words(ratio: float | None) -> str:
    """A ratio as a reader should see it: "never reached" rather than a number."""
    if ratio is None or math.isnan(ratio):
        return "undefined"
    return "never reached" if math.isinf(ratio) else f"{ratio:.2f}"


def jsonable_ratios(result: dict) -> dict:
    """``result`` of :func:`compare` with infinite ratios written as "never reached"
    (JSON has no infinity; a bare null would read as "missing")."""

    def word(value):
        return "never reached" if isinstance(value, float) and math.isinf(value) else value

    out = dict(result)
    out["ratios"] = {str(seed): word(r) for seed, r in result["ratios"].items()}
    out["median"] = word(result["median"])
    out["interval_95"] = [word(v) for v in result["interval_95"]]
    return out


def log_area(points: list[tuple[float, float]], start: float, end: float) -> float | None:
    """The geometric-mean error of a learning curve on ``[start, end]``: ``exp`` of the
    area under ``log(error)`` against ``x`` (labels or seconds), linear between
    points, over the window's width. The ratio of two is the paired primary figure.

    ``points`` are ``(x, error)``; where several share an ``x`` the last counts. None
    when the window is empty, the curve does not cover it, or an error is not a
    positive finite number."""
    newest = dict(points)
    if end <= start or not newest:
        return None
    x = np.array(sorted(newest), dtype=float)
    y = np.array([newest[k] for k in sorted(newest)], dtype=float)
    if not np.all(np.isfinite(y)) or np.any(y <= 0) or x[0] > start or x[-1] < end:
        return None  # a diverged run (NaN, inf) has no area: it loses
    grid = np.unique(np.concatenate([[start, end], x[(x > start) & (x < end)]]))
    logs = np.interp(grid, x, np.log(y))
    return float(np.exp(np.trapezoid(logs, grid) / (end - start)))


def held_to(points: list[tuple[float, float]], end: float) -> list[tuple[float, float]]:
    """``points`` with the last error held to ``end`` (the run's end): a run that stopped
    improving, or publishing, keeps its last error until it stopped, so that a window
    ending at its last version does not flatter it."""
    if not points:
        return points
    last_x, last_y = max(points, key=lambda p: p[0])
    return [*points, (end, last_y)] if end > last_x else list(points)


def area_ratio(mine: list[tuple[float, float]], theirs: list[tuple[float, float]]) -> float | None:
    """``mine``'s geometric-mean error over ``theirs``' on the window both curves cover
    (:func:`log_area`): one seed's primary figure. None where either curve is empty or
    has no area there (a diverged run): that seed's claim loses."""
    if not mine or not theirs:
        return None
    start, end = paired_window(mine, theirs)
    a, b = log_area(mine, start, end), log_area(theirs, start, end)
    return None if a is None or b is None else a / b


def area_ratio_to_later_end(
    mine: list[tuple[float, float]],
    theirs: list[tuple[float, float]],
    mine_end: float,
    theirs_end: float,
) -> float | None:
    """:func:`area_ratio` with both curves held at their last error to the later of the
    two runs' ends: a run that is done sooner keeps its error, it does not leave the
    window (over wall time, where the faster loop ends first)."""
    if not mine or not theirs:
        return None
    end = max(mine_end, theirs_end)
    return area_ratio(held_to(mine, end), held_to(theirs, end))


def paired_window(*curves: list[tuple[float, float]]) -> tuple[float, float]:
    """The ``x`` range every curve covers: the latest first point to the earliest last."""
    return max(min(x for x, _ in c) for c in curves), min(max(x for x, _ in c) for c in curves)


def for_json(value, key: str = ""):
    """``value`` made JSON-ready where it holds costs: every :func:`compare` result
    (:func:`jsonable_ratios`) and every infinite number under a key naming a cost to a
    target (``..._to_target...``) in words, "never reached", not null."""
    if isinstance(value, dict):
        if isinstance(value.get("ratios"), dict) and "interval_95" in value:
            value = jsonable_ratios(value)
        return {k: for_json(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [for_json(v, key) for v in value]
    if "to_target" in key and isinstance(value, float) and math.isinf(value):
        return "never reached"
    return value
