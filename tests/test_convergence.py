"""Knowing when a potential is done: the exploration ratios and the accurate-ratio stop,
a campaign without a held-out set, calibration on validation labels only, and the
calibration inside the exported ensemble."""

import json
from pathlib import Path

import numpy as np
import pytest

from palflow.pipeline.config.settings import load_campaign
from palflow.pipeline.engine.convergence import ExplorationTally, SegmentCounts
from tests.test_coordinator import run_campaign, small_campaign


# ---------------------------------------------------------------- known answers
def test_a_segment_is_split_at_the_trust_levels():
    scores = np.array([0.01, 0.02, 0.08, 0.5, 0.03, 0.01])
    outside = scores > 0.4  # the upper trust level: frame 3 and all after it fail
    counts = SegmentCounts.classify(scores, 0.05, outside, blew_up=False)
    assert (counts.accurate, counts.candidate, counts.failed) == (2, 1, 3)

    counts = SegmentCounts.classify(scores[:3], 0.05, np.zeros(3, bool), blew_up=True)
    assert (counts.accurate, counts.candidate, counts.failed) == (2, 1, 1), "the blow-up frame"

    counts = SegmentCounts.classify(np.array([0.01, np.nan]), 0.05, np.zeros(2, bool), False)
    assert (counts.accurate, counts.candidate, counts.failed) == (1, 0, 1), "NaN spread fails"


def tally(**stop):
    settings = {f"stop__{k}": v for k, v in {"accurate_ratio": 0.8, **stop}.items()}
    return ExplorationTally(load_campaign(**settings))


def test_the_accurate_ratio_must_hold_on_a_full_window_at_versions_in_a_row():
    exploration = tally(accurate_window=2, accurate_versions=2)
    good, bad = SegmentCounts(9, 1, 0), SegmentCounts(5, 5, 0)

    exploration.add("main", good)
    ratios = exploration.note_version()
    assert ratios["main"]["accurate"] == pytest.approx(0.9)
    assert exploration.streak == 0, "one segment does not fill a window of two"

    exploration.add("main", good)
    exploration.note_version()
    assert exploration.streak == 1 and not exploration.converged

    exploration.note_version()  # no new segment: the same window cannot confirm itself
    assert exploration.streak == 1 and not exploration.converged

    exploration.add("main", bad)  # window: good, bad -> 0.7 < 0.8
    exploration.note_version()
    assert exploration.streak == 0

    exploration.add("main", good)  # window: bad, good -> 0.7 again
    exploration.note_version()
    assert exploration.streak == 0
    for streak in (1, 2):  # window: good, good
        exploration.add("main", good)
        exploration.note_version()
        assert exploration.streak == streak
    assert exploration.converged
    assert "accurate ratio >= 0.8" in exploration.reason()


def test_every_system_must_reach_the_accurate_ratio():
    campaign = load_campaign(
        stop__accurate_ratio=0.8,
        stop__accurate_window=1,
        stop__accurate_versions=1,
        systems=[{"name": "a"}, {"name": "b"}],
    )
    exploration = ExplorationTally(campaign)
    exploration.add("a", SegmentCounts(10, 0, 0))
    exploration.note_version()
    assert not exploration.converged, "system b has explored nothing yet"
    exploration.add("b", SegmentCounts(1, 9, 0))
    exploration.note_version()
    assert not exploration.converged
    exploration.add("b", SegmentCounts(10, 0, 0))
    exploration.note_version()
    assert exploration.converged


def test_without_a_target_the_ratios_are_recorded_but_never_stop():
    exploration = tally(accurate_ratio=0.0, accurate_window=1, accurate_versions=1)
    exploration.add("main", SegmentCounts(10, 0, 0))
    assert exploration.note_version()["main"]["accurate"] == 1.0
    assert not exploration.converged


# ---------------------------------------------------------------- a whole campaign
@pytest.mark.timeout(400)
def test_a_campaign_without_a_test_set_stops_on_the_accurate_ratio(tmp_path):
    """No held-out set is labelled; the campaign stops on the accurate ratio, records
    the ratios and the validation error per version, and says no test error exists."""
    from palflow.pipeline.observe.status import format_status, run_status_facts

    campaign = small_campaign(
        test__n_structures=0,
        stop__max_labels=200,
        # The tiny model's spread stays above the example's 0.03 eV/Å for 200 labels;
        # a lower trust level of 0.3 eV/Å is reached within the budget. A window of 3
        # segments (24 frames) at 0.2 eV/Å swung between 0.1 and 0.7 from version to
        # version, and once missed two in a row within the budget.
        selection__threshold=0.3,
        stop__accurate_ratio=0.5,
        stop__accurate_window=4,
        stop__accurate_versions=2,
        training__validation_fraction=0.25,
    )
    run, summary = run_campaign(tmp_path, campaign)

    assert summary["stop_reason"].startswith("accurate ratio >= 0.5"), summary["stop_reason"]
    assert summary["exit_status"] == 0, summary["failure"]
    assert summary["labels"] < 200
    assert not Path(run.test_set).exists(), "no held-out set was labelled"
    events = [json.loads(line) for line in Path(run.path("events.jsonl")).read_text().splitlines()]
    assert not [e for e in events if e.get("kind") == "reference"]
    assert summary["has_test_set"] is False and summary["test_force_mae"] == []

    rows = [json.loads(line) for line in Path(run.path("metrics.jsonl")).read_text().splitlines()]
    assert rows and all(row["force_mae"] is None for row in rows)
    with_ratios = [row for row in rows if row["exploration"]["main"]["accurate"] is not None]
    assert with_ratios, "every version after the first segments records its ratios"
    for row in with_ratios:
        shares = row["exploration"]["main"]
        assert shares["accurate"] + shares["candidate"] + shares["failed"] == pytest.approx(1)
    # The stop came after two versions in a row at or above the target. Versions of
    # the final training come after it, and a segment that ended after the stop may
    # lower their ratio: the pair is somewhere, not necessarily last.
    shares = [row["exploration"]["main"]["accurate"] for row in with_ratios]
    assert any(a >= 0.5 and b >= 0.5 for a, b in zip(shares, shares[1:], strict=False)), shares
    assert rows[-1]["validation_force_mae"] is not None, "validation labels were evaluated"

    text = format_status(run_status_facts(run.root))
    assert "no held-out set" in text and "exploration:" in text and "validation MAE:" in text


@pytest.mark.timeout(400)
def test_the_calibration_is_fitted_on_validation_labels_never_the_test_set(tmp_path):
    """The calibrated threshold's factor is the validation labels' median error/spread,
    recomputed here from the published ensemble, and not the held-out set's."""
    from palflow.apps.data.label_log import LabelLog, read_selection
    from palflow.apps.inference import _evaluate_test
    from palflow.pipeline.state.export import export_run

    campaign = small_campaign(
        selection__threshold_mode="calibrated",
        selection__calibration_target=0.05,
        training__validation_fraction=0.3,
    )
    run, summary = run_campaign(tmp_path, campaign)
    rows = [json.loads(line) for line in Path(run.path("metrics.jsonl")).read_text().splitlines()]
    last = rows[-1]
    version, checkpoint = run.ensembles()[-1]
    assert last["version"] == version
    log = LabelLog.open(run.label_log)
    validation = log.selection(0, len(log), "valid", 0.3)
    assert read_selection(validation), "the campaign kept validation labels"
    result = _evaluate_test(str(checkpoint), run.test_set, validation_path=validation)

    def median_ratio(errors):
        spread = np.asarray(errors["structure_force_spread"])
        error = np.asarray(errors["structure_force_error"])
        return float(np.median(error[spread > 0] / spread[spread > 0]))

    assert last["calibration"] == pytest.approx(median_ratio(result["validation"]), rel=1e-4)
    assert last["calibration"] != pytest.approx(median_ratio(result), rel=1e-3)
    assert last["reliability_validation"] and last["reliability_test"]

    exported = export_run(run.root, tmp_path / "export")
    from ase.build import bulk

    from palflow.apps.models.calculator import EnsembleCalculator

    calculator = EnsembleCalculator.from_checkpoint(exported["ensemble_file"], device="cpu")
    assert calculator.calibration == pytest.approx(last["calibration"])
    atoms = bulk("Cu", cubic=True)
    atoms.rattle(0.1, seed=1)
    atoms.calc = calculator
    atoms.get_forces()
    results = calculator.results
    assert results["force_uncertainty"] == pytest.approx(
        last["calibration"] * results["force_disagreement"]
    )
    readme = Path(exported["readme_file"]).read_text()
    assert "validation frames" in readme and "force_uncertainty" in readme
