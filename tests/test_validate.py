"""palflow validate: the MD check of a run's newest ensemble. Known answers for the
failure rules and the drift; a deliberately under-trained ensemble fails where a
trained one passes; bad input is refused with nothing created."""


import numpy as np
import pytest
from ase.build import molecule

from palflow.apps.validate import energy_drift, failure_of
from palflow.pipeline.cli import main
from palflow.pipeline.state.rundir import RunDirectory
from tests.test_coordinator import small_campaign

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
    assert "not a palflow run directory" in capsys.readouterr().err
