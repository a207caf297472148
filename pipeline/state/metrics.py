"""Measures of a run computed from ``events.jsonl``: how busy each module was."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

Interval = tuple[float, float]


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Union of intervals as a sorted list of disjoint intervals."""
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def intersect_intervals(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    """Intersection of two sorted lists of disjoint intervals."""
    result, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            result.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return result


def module_intervals(events: Iterable[dict[str, Any]], module: str) -> list[Interval]:
    """When at least one task of ``module`` was running, from the apps' own clocks."""
    return merge_intervals(
        (e["started"], e["ended"])
        for e in events
        if e["module"] == module and e.get("started") is not None and e.get("ended") is not None
    )


def _length(intervals: Iterable[Interval], t0: float, t1: float) -> float:
    return sum(max(0.0, min(end, t1) - max(start, t0)) for start, end in intervals)


def busy_fractions(events: Sequence[dict[str, Any]], t0: float, t1: float) -> dict[str, float]:
    """Per module, the fraction of ``[t0, t1]`` with at least one of its tasks running."""
    span = max(t1 - t0, 1e-9)
    modules = sorted({e["module"] for e in events})
    return {m: _length(module_intervals(events, m), t0, t1) / span for m in modules}


def concurrency_fraction(
    events: Sequence[dict[str, Any]], t0: float, t1: float, modules: Sequence[str]
) -> float:
    """Fraction of ``[t0, t1]`` during which every one of ``modules`` was running."""
    common = module_intervals(events, modules[0])
    for module in modules[1:]:
        common = intersect_intervals(common, module_intervals(events, module))
    return _length(common, t0, t1) / max(t1 - t0, 1e-9)
