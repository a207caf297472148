"""Warm starts: a finished run's labels and ensemble as the first training data and
the members' starting point, with no oracle call for them."""

import numpy as np
import pytest
from ase.db import connect

from tests.test_coordinator import run_campaign, small_campaign


def final_error(summary) -> float:
    """A run's final test force MAE, as the median of its last three versions: one
    version's error moves by up to a quarter from the next."""
    return float(np.median([e["force_mae"] for e in summary["test_errors"][-3:]]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished small copper campaign: its run directory and summary."""
    return run_campaign(tmp_path_factory.mktemp("first"), small_campaign())


def test_labels_and_ensemble_of_a_finished_run_need_no_new_labels(tmp_path, finished):
    """The first version continues from the finished run's members on its labels: it
    is about as good as that run's final version at once, before any new label
    (within 25%: SchNet's test error moves that much from one version to the next
    of one run), and far better than that run's first version."""
    first_run, first = finished
    final = final_error(first)
    campaign = small_campaign(
        initial__file=str(first_run.root / "labels.extxyz"),
        initial__ensemble=str(first_run.ensembles()[-1][1]),
        stop__max_labels=4,
    )
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["initial_labels"] == first["labels"] + first["initial_labels"]
    sources = [row.source for row in connect(run.labels_db).select()]
    assert sources.count("file") == summary["initial_labels"], "no oracle call for them"
    warm = [e for e in summary["test_errors"] if e["labels"] == 0]
    assert warm, "a version before any new label"
    assert warm[0]["force_mae"] <= 1.25 * final, (warm[0], final)
    assert warm[0]["force_mae"] < 0.8 * first["test_errors"][0]["force_mae"]


def test_labels_alone_reach_the_final_error_in_one_training_period(tmp_path, finished):
    """From the finished run's labels alone, with selection shut (no new label) and as
    much wall time as that run took, the members reach its final test error."""
    first_run, first = finished
    campaign = small_campaign(
        initial__file=str(first_run.root / "labels.db"),
        selection__threshold=1e9,
        stop__max_labels=1000,
        stop__max_wall_s=first["wall_s"],
    )
    _, summary = run_campaign(tmp_path, campaign)
    assert summary["initial_labels"] == first["labels"] + first["initial_labels"]
    assert summary["labels"] == 0 and summary["stop_reason"].startswith("wall-time")
    best = min(e["force_mae"] for e in summary["test_errors"])
    assert best <= 1.1 * final_error(first), summary["test_errors"]
