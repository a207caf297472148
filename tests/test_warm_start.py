"""Warm starts: a finished run's labels and ensemble as the first training data and
the members' starting point, with no oracle call for them."""

import shutil

import numpy as np
import pytest
import torch
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


def test_members_continue_exactly_where_the_earlier_run_left_them(tmp_path, finished):
    """Warm members are the earlier members: from a run's ``models/`` folder, each is
    that member's newest checkpoint, optimiser state and step count included; from an
    ensemble file alone, each predicts exactly what its member of the file predicts."""
    from palflow.apps.models.core import build_batch, load_checkpoint
    from palflow.pipeline.resume.warm_start import warm_member_checkpoints

    first_run, _ = finished
    ensemble = first_run.ensembles()[-1][1]
    campaign = small_campaign(initial__ensemble=str(ensemble))
    for k, path in enumerate(warm_member_checkpoints(campaign, tmp_path / "own")):
        _, extra = load_checkpoint(path)
        _, earlier = load_checkpoint(first_run.member_checkpoints(k)[-1][1])
        assert "optimizer" in extra and extra["steps"] == earlier["steps"] > 0

    alone = tmp_path / "elsewhere" / "ensemble.pt"
    alone.parent.mkdir()
    shutil.copyfile(ensemble, alone)
    campaign = small_campaign(initial__ensemble=str(alone))
    stacked, _ = load_checkpoint(alone)
    batch = build_batch(_labelled(first_run)[:3], stacked.spec.cutoff, "cpu", with_targets=False)
    expected = stacked(batch)["energy"].detach()
    paths = warm_member_checkpoints(campaign, tmp_path / "file")
    assert len(paths) == campaign.model.n_members
    for k, path in enumerate(paths):
        member, extra = load_checkpoint(path)
        assert extra["warm_start"] and "optimizer" not in extra
        energy = member(batch)["energy"].detach()
        torch.testing.assert_close(energy[0], expected[k % stacked.n_members])


def _labelled(run):
    from ase.io import read

    return read(run.root / "labels.extxyz", index=":")


def test_labels_and_ensemble_of_a_finished_run_need_no_new_labels(tmp_path, finished):
    """The run takes the finished run's labels with no oracle call, and its members
    train on from where that run's last ensemble left them.

    Its first version is at most 1.1x the finished run's last: the members start from
    the states of that run's last ensemble, and a member's new state replaces its
    published one only if it validates no worse, within a tolerance
    (:mod:`palflow.apps.publication`). That the members
    continue exactly is the test above; here, that their step counts go on from the
    finished run's in a whole campaign."""
    from palflow.apps.models.core import load_checkpoint

    first_run, first = finished
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
    for k in range(campaign.model.n_members):
        _, earlier = load_checkpoint(first_run.member_checkpoints(k)[-1][1])
        steps = [load_checkpoint(p)[1]["steps"] for _, p in run.member_checkpoints(k)]
        assert min(steps) >= earlier["steps"] and max(steps) > earlier["steps"], (
            "members go on from the finished run's steps, they do not restart"
        )
    last = first["test_errors"][-1]["force_mae"]
    assert warm[0]["force_mae"] <= 1.1 * last, (warm[0], last)


def test_labels_alone_reach_the_final_error_without_new_labels(tmp_path, finished):
    """From the finished run's labels alone, with no label budget (``max_labels = 0``:
    train on the initial labels only), the members reach that run's final test error:
    the labels carry what the run learnt. They train for three times that run's wall
    time (at least 30 s), since one version's error moves by up to half from the next."""
    first_run, first = finished
    campaign = small_campaign(
        initial__file=str(first_run.root / "labels.db"),
        stop__max_labels=0,
        stop__final_training_s=max(3 * first["wall_s"], 30.0),
        stop__max_wall_s=600.0,
    )
    _, summary = run_campaign(tmp_path, campaign)
    assert summary["initial_labels"] == first["labels"] + first["initial_labels"]
    assert summary["labels"] == 0 and summary["stop_reason"] == "label budget of 0 reached"
    assert not summary["failed"]
    best = min(e["force_mae"] for e in summary["test_errors"])
    assert best <= 1.1 * final_error(first), summary["test_errors"]
