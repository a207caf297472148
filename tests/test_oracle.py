"""The oracle app on its own: EMT for speed, real GFN2-xTB on a tiny molecule."""

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from palflow.apps.contracts import CalculatorSpec
from palflow.apps.data.dataset import read_arrays, read_dataset, write_dataset
from palflow.apps.errors import OracleError, PalflowError
from palflow.apps.oracle import _label_batch, _oracle_md
from palflow.apps.oracles.calculators import BadLabel, label_structure, make_calculator

EMT_SPEC = {"calculator": "ase.calculators.emt:EMT", "kwargs": {}}


def rattled_copper(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    structures = []
    for _ in range(n):
        atoms = bulk("Cu", cubic=True)
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        structures.append(atoms)
    return structures


def test_label_batch_matches_direct_emt_and_keeps_ids(tmp_path):
    structures = rattled_copper(3)
    write_dataset(tmp_path / "in.npz", structures, extra={"candidate_id": np.array([7, 8, 9])})
    result = _label_batch(
        str(tmp_path / "in.npz"),
        str(tmp_path / "out.npz"),
        EMT_SPEC,
        str(tmp_path / "scratch"),
        max_force=50.0,
        timeout_s=0.0,
        isolate=True,
    )
    assert result["n_ok"] == 3 and result["failures"] == []
    labelled = read_dataset(tmp_path / "out.npz")
    arrays = read_arrays(tmp_path / "out.npz")
    assert arrays["candidate_id"].tolist() == [7, 8, 9]
    assert arrays["status"].tolist() == ["ok"] * 3
    for atoms, original in zip(labelled, structures, strict=True):
        reference = original.copy()
        reference.calc = EMT()
        assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy())
        np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-10)
    assert result["t_end"] >= result["t_start"]
    assert not (tmp_path / "scratch").exists(), "a clean batch leaves no scratch behind"


def test_a_failing_structure_is_recorded_not_raised(tmp_path):
    structures = rattled_copper(2)
    structures.insert(1, molecule("H2O"))  # EMT has no parameters for this... oxygen works,
    structures[1].numbers[:] = 92  # but not uranium
    write_dataset(tmp_path / "in.npz", structures, extra={"candidate_id": np.array([1, 2, 3])})
    result = _label_batch(
        str(tmp_path / "in.npz"),
        str(tmp_path / "out.npz"),
        EMT_SPEC,
        str(tmp_path / "scratch"),
        max_force=50.0,
        timeout_s=0.0,
        isolate=True,
    )
    assert result["n_ok"] == 2
    assert [f[0] for f in result["failures"]] == [2]
    arrays = read_arrays(tmp_path / "out.npz")
    assert arrays["status"][1] != "ok"
    # EMT writes no files: the failed batch's scratch is empty, and it is removed (a
    # calculator that writes files keeps it: tests/test_damaged_runs.py).
    assert not (tmp_path / "scratch").exists(), "an empty scratch is not kept"
    assert np.isnan(arrays["energy"][1]) and np.isfinite(arrays["energy"][[0, 2]]).all()


def test_absurd_forces_are_a_bad_label():
    atoms = bulk("Cu", cubic=True)
    atoms.positions[1] = atoms.positions[0] + [0.3, 0, 0]  # nearly fused atoms
    with pytest.raises(BadLabel, match="exceeds max_force"):
        label_structure(atoms, EMT(), max_force=50.0)


def test_make_calculator_passes_kwargs():
    calc = make_calculator(
        {"calculator": "ase.calculators.lj:LennardJones", "kwargs": {"sigma": 2.0}}
    )
    assert calc.parameters.sigma == 2.0


def test_unknown_calculator_path_names_the_module():
    with pytest.raises(ImportError, match="no_such_module"):
        make_calculator({"calculator": "no_such_module:Calc"})


def test_oracle_md_makes_labelled_held_out_frames(tmp_path):
    from ase.io import write

    atoms = bulk("Cu", cubic=True).repeat((2, 1, 1))
    write(tmp_path / "start.extxyz", atoms)
    result = _oracle_md(
        str(tmp_path / "start.extxyz"),
        str(tmp_path / "test.npz"),
        EMT_SPEC,
        str(tmp_path / "scratch"),
        n_frames=4,
        stride=5,
        temperature_K=300,
        timestep_fs=2.0,
        seed=1,
    )
    frames = read_dataset(tmp_path / "test.npz")
    assert result["n_frames"] == 4 == len(frames)
    positions = [f.positions for f in frames]
    assert not np.allclose(positions[0], positions[1]), "frames differ along the trajectory"
    for frame in frames:
        reference = frame.copy()
        reference.calc = EMT()
        np.testing.assert_allclose(frame.get_forces(), reference.get_forces(), atol=1e-8)


@pytest.mark.xtb
def test_real_gfn2_xtb_labels_water(tmp_path, require_xtb):
    water = molecule("H2O")
    stretched = water.copy()
    stretched.positions[1] *= 1.1
    write_dataset(tmp_path / "in.npz", [water, stretched])
    spec = {"calculator": "xtb.ase.calculator:XTB", "kwargs": {"method": "GFN2-xTB"}}
    result = _label_batch(
        str(tmp_path / "in.npz"),
        str(tmp_path / "out.npz"),
        spec,
        str(tmp_path / "scratch"),
        max_force=50.0,
        timeout_s=0.0,
        isolate=True,
    )
    assert result["n_ok"] == 2
    labelled = read_dataset(tmp_path / "out.npz")
    energies = [a.get_potential_energy() for a in labelled]
    # GFN2-xTB puts water near -137 eV; the stretched bond costs energy.
    assert -140 < energies[0] < -134
    assert energies[1] > energies[0]
    # Forces on the stretched O-H bond pull the H back towards O.
    bond = labelled[1].positions[1] - labelled[1].positions[0]
    assert np.dot(labelled[1].get_forces()[1], bond) < 0


def test_calculator_spec_is_built_once_from_the_oracle_settings():
    from palflow.pipeline.config.settings import campaign_from_dict

    oracle = campaign_from_dict(
        {"oracle": {"calculator": "ase.calculators.lj:LennardJones", "kwargs": {"sigma": 2.0},
                    "mpi_ranks": 4, "mpi_nodes": 2}}
    ).oracle  # fmt: skip
    spec = CalculatorSpec.of(oracle, mpi_command="srun -n {ranks}")
    assert spec.as_dict() == {
        "calculator": "ase.calculators.lj:LennardJones",
        "kwargs": {"sigma": 2.0},
        "mpi_ranks": 4,
        "mpi_nodes": 2,
        "mpi_command": "srun -n {ranks}",
    }
    assert CalculatorSpec.of(oracle).mpi_command == "parsl"
    calculator = make_calculator(spec.as_dict())
    assert calculator.parameters["sigma"] == 2.0


def test_a_bad_label_is_an_oracle_error_not_bad_input():
    from palflow.apps.errors import InputError

    assert issubclass(BadLabel, OracleError) and issubclass(OracleError, PalflowError)
    assert not issubclass(OracleError, InputError)
