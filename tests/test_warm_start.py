"""Warm starts: a finished run's labels and ensemble as the first training data and
the members' starting point, with no oracle call for them."""

import pytest
from ase.db import connect

from tests.test_coordinator import run_campaign, small_campaign


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished small copper campaign: its run directory and summary."""
    return run_campaign(tmp_path_factory.mktemp("first"), small_campaign())


def test_labels_and_ensemble_of_a_finished_run_need_no_new_labels(tmp_path, finished):
    """The first version continues from the finished run's members on its labels: it
    is as good as that run's final version at once, before any new label."""
    first_run, first = finished
    final = first["test_errors"][-1]["force_mae"]
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
    assert warm[0]["force_mae"] <= 1.1 * final, (warm[0], final)


def test_labels_alone_train_a_better_first_version(tmp_path, finished):
    first_run, first = finished
    campaign = small_campaign(initial__file=str(first_run.root / "labels.db"), stop__max_labels=4)
    _, summary = run_campaign(tmp_path, campaign)
    assert summary["initial_labels"] == first["labels"] + first["initial_labels"]
    assert summary["test_errors"][0]["labels"] == 0
    assert summary["test_errors"][0]["force_mae"] < first["test_errors"][0]["force_mae"]
