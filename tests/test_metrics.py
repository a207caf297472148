"""Busy fractions and overlap computed from task events."""

import pytest

from palflow.pipeline.state.metrics import busy_fractions, concurrency_fraction, merge_intervals


def event(module, started, ended):
    return {"module": module, "started": started, "ended": ended, "ok": True}


def test_merge_intervals_joins_overlaps():
    assert merge_intervals([(5, 6), (0, 2), (1, 3)]) == [(0, 3), (5, 6)]


def test_busy_fraction_counts_overlapping_tasks_once():
    events = [event("oracle", 0, 4), event("oracle", 2, 6), event("train", 5, 10)]
    busy = busy_fractions(events, 0, 10)
    assert busy == pytest.approx({"oracle": 0.6, "train": 0.5})


def test_concurrency_fraction_is_time_all_modules_run():
    events = [event("oracle", 0, 6), event("train", 4, 10), event("generator", 5, 8)]
    assert concurrency_fraction(events, 0, 10, ("oracle", "train")) == pytest.approx(0.2)
    assert concurrency_fraction(events, 0, 10, ("oracle", "train", "generator")) == pytest.approx(
        0.1
    )


def test_failed_tasks_without_times_are_ignored():
    events = [event("oracle", 0, 5), {"module": "oracle", "ok": False}]
    assert busy_fractions(events, 0, 10) == pytest.approx({"oracle": 0.5})
