"""palflow validate: the MD check of a run's newest ensemble. Known answers for the
failure rules and the drift; a deliberately under-trained ensemble fails where a
trained one passes; bad input is refused with nothing created."""

import json

import numpy as np
import pytest
from ase.build import molecule

from palflow.apps.validate import energy_drift, failure_of
from palflow.pipeline.cli import main
from palflow.pipeline.state.rundir import RunDirectory
from tests.test_coordinator import run_campaign, small_campaign

LIMITS = {"max_spread": 1.0, "min_distance": 0.5}


def test_failure_rules():
    atoms = molecule("H2O")
    forces = np.zeros((3, 3))
    assert failure_of(atoms, -10.0, forces, 0.1, LIMITS) is None
    assert "non-finite" in failure_of(atoms, np.nan, forces, 0.1, LIMITS)
    assert "non-finite" in failure_of(atoms, -10.0, forces + np.inf, 0.1, LIMITS)
    assert "upper trust level" in failure_of(atoms, -10.0, forces, 1.5, LIMITS)
    assert failure_of(atoms, -10.0, forces, 1.5, {**LIMITS, "max_spread": 0}) is None
    atoms.positions[1] = atoms.positions[0] + [0.3, 0, 0]
    assert "0.3 Å apart" in failure_of(atoms, -10.0, forces, 0.1, LIMITS)


def test_drift_is_the_least_squares_slope_in_meV_per_atom_ps():
    times = np.linspace(0, 10, 101)
    noise = 1e-4 * np.sin(7 * times)
    slope, deviation = energy_drift(times, -3.0 + 2e-3 * times + noise)
    assert slope == pytest.approx(2.0, abs=0.05)
    assert deviation == pytest.approx(20.0, abs=0.2)
    assert energy_drift(times[:1], np.array([-3.0])) == (0.0, 0.0)


def test_validate_refuses_a_run_without_an_ensemble(tmp_path, capsys):
    run = RunDirectory.create(tmp_path / "run", small_campaign().model_dump())
    before = sorted(p.name for p in run.root.iterdir())
    assert main(["validate", str(run.root)]) == 2
    err = capsys.readouterr().err
    assert "no published ensemble" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in run.root.iterdir()) == before, "nothing created"

    assert main(["validate", str(tmp_path / "nothing-here")]) == 2
    assert "nothing-here does not exist" in capsys.readouterr().err
    (tmp_path / "a-folder").mkdir()
    assert main(["validate", str(tmp_path / "a-folder")]) == 2
    assert "not a palflow run directory" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_validation_catches_an_under_trained_ensemble(tmp_path, capsys):
    """The campaign's first version (members trained once, on 8 rattled structures)
    fails the MD check where its final version passes, and the failure frames join the
    oracle queue of a resumed run."""
    from palflow.pipeline.engine.validation import validate_run
    from palflow.pipeline.resume.restore import resume_state

    campaign = small_campaign(stop__max_labels=48, stop__final_training_s=10.0)
    run, summary = run_campaign(tmp_path, campaign)
    check = campaign.model_copy(
        update={
            "validate": campaign.validate.model_copy(
                update={"duration_ps": 2.0, "timestep_fs": 2.0, "label_frames": 4}
            ),
            "selection": campaign.selection.model_copy(update={"upper_threshold": 1.0}),
        }
    )
    first = validate_run(run.root, campaign=check, version=1)
    assert not first["passed"], first["systems"]
    reasons = first["systems"]["main"]["reasons"]
    assert reasons and all("failed at" in r or "drifts" in r for r in reasons)

    final = validate_run(run.root, campaign=check)
    assert final["version"] == summary["versions"]
    assert final["passed"], final["systems"]["main"]["reasons"]
    nve = [r for r in final["systems"]["main"]["results"] if r["ensemble"] == "nve"][0]
    assert nve["runs"][0]["simulated_ps"] == pytest.approx(2.0)
    assert abs(nve["runs"][0]["drift_meV_per_atom_ps"]) <= 1.0
    production = final["systems"]["main"]["production"]
    assert production["frames"] == 4 and production["force_mae"] > 0
    saved = json.loads((run.root / "validate.json").read_text())
    assert saved["passed"] and saved["version"] == final["version"]

    # The command line: exit 1 and one line per failing system for version 1.
    run.root.joinpath("campaign.json").write_text(json.dumps(check.model_dump()))
    assert main(["validate", str(run.root), "--version", "1"]) == 1
    out = capsys.readouterr().out
    assert "main: FAILED" in out

    # The failure frames of version 1 are queued first on a resume.
    failures = list((run.root / "validate").glob("*.failures.extxyz"))
    assert failures and any(path.stat().st_size for path in failures)
    state, queue, _ = resume_state(check, RunDirectory.open(run.root))
    queued = [c for c in queue.candidates() if c.rank == float("inf")]
    assert queued, "the frames before the failure wait for the oracle"
    assert not list((run.root / "validate").glob("*.failures.extxyz")), "queued once"
