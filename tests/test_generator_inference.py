"""The generator and inference apps on their own, with a small real ensemble."""

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read, write

from apps.calculator import EnsembleCalculator
from apps.dataset import read_arrays, read_dataset, write_dataset
from apps.generator import _run_md, blow_up_reason
from apps.inference import _evaluate_test, _score_candidates
from apps.model import ModelSpec, SchNetEnsemble, save_checkpoint
from pipeline.settings import GeneratorSettings


@pytest.fixture
def ensemble_path(tmp_path):
    torch.manual_seed(0)
    model = SchNetEnsemble(ModelSpec(cutoff=4.0, n_features=16, n_interactions=2, n_rbf=8), 4)
    path = tmp_path / "ensemble.pt"
    save_checkpoint(path, model, {"version": 3})
    return str(path)


@pytest.fixture
def start_path(tmp_path):
    path = tmp_path / "start.extxyz"
    write(path, molecule("CH3CH2OH"))
    return str(path)


def md_settings(**changes):
    return GeneratorSettings(steps_per_task=20, sample_interval=5, **changes).model_dump()


def test_md_records_sampled_frames_with_their_disagreement(tmp_path, ensemble_path, start_path):
    result = _run_md(
        start_path,
        ensemble_path,
        str(tmp_path / "traj.npz"),
        str(tmp_path / "last.extxyz"),
        md_settings(max_force_disagreement=1e9),
        seed=1,
    )
    assert not result["blew_up"], result["reason"]
    assert result["version"] == 3
    assert result["n_frames"] == 4
    arrays = read_arrays(tmp_path / "traj.npz")
    assert arrays["step"].tolist() == [5, 10, 15, 20]
    assert arrays["force_disagreement"].tolist() == pytest.approx(result["force_disagreement"])
    # The recorded disagreement is what the ensemble says about each recorded frame.
    frames = read_dataset(tmp_path / "traj.npz")
    calc = EnsembleCalculator.from_checkpoint(ensemble_path)
    frames[2].calc = calc
    frames[2].get_potential_energy()
    assert calc.results["force_disagreement"] == pytest.approx(
        result["force_disagreement"][2], rel=1e-4
    )
    # The walker's next segment starts from the last frame, momenta included.
    last = read(tmp_path / "last.extxyz")
    np.testing.assert_allclose(last.positions, frames[-1].positions, atol=1e-6)
    assert np.abs(last.get_momenta()).sum() > 0


def test_md_stops_when_ensemble_disagreement_passes_the_hard_cap(
    tmp_path, ensemble_path, start_path
):
    result = _run_md(
        start_path,
        ensemble_path,
        str(tmp_path / "traj.npz"),
        str(tmp_path / "last.extxyz"),
        md_settings(max_force_disagreement=1e-9),
        seed=1,
    )
    assert result["blew_up"]
    assert "hard cap" in result["reason"]
    assert result["n_frames"] == 0
    # Nothing sound was reached: the walker's state is still its start.
    np.testing.assert_allclose(
        read(tmp_path / "last.extxyz").positions, read(start_path).positions, atol=1e-6
    )


def test_blow_up_reasons():
    settings = md_settings()
    atoms = molecule("CH3CH2OH")
    assert blow_up_reason(atoms, 0.1, settings) is None
    fused = atoms.copy()
    fused.positions[1] = fused.positions[0] + [0.2, 0, 0]
    assert "apart" in blow_up_reason(fused, 0.1, settings)
    flown = atoms.copy()
    flown.positions[3] += [20.0, 0, 0]
    assert "flew away" in blow_up_reason(flown, 0.1, settings)
    assert "non-finite" in blow_up_reason(atoms, float("nan"), settings)


def test_scores_match_the_calculator_and_keep_ids(tmp_path, ensemble_path):
    structures = []
    for seed in range(3):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.1, seed=seed)
        structures.append(atoms)
    write_dataset(tmp_path / "queue.npz", structures, extra={"candidate_id": np.array([5, 9, 2])})
    result = _score_candidates(ensemble_path, str(tmp_path / "queue.npz"))
    assert result["candidate_id"] == [5, 9, 2]
    assert result["version"] == 3
    calc = EnsembleCalculator.from_checkpoint(ensemble_path)
    for atoms, force, energy in zip(
        structures, result["force_disagreement"], result["energy_disagreement"], strict=True
    ):
        atoms.calc = calc
        atoms.get_potential_energy()
        assert force == pytest.approx(calc.results["force_disagreement"], rel=1e-4)
        assert energy == pytest.approx(calc.results["energy_disagreement"], rel=1e-4, abs=1e-8)


def test_test_error_is_the_mean_prediction_error(tmp_path, ensemble_path):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    structures = []
    for seed in range(3):
        atoms = bulk("Cu", cubic=True)
        atoms.rattle(0.05, seed=seed)
        atoms.calc = EMT()
        atoms.get_forces()
        structures.append(atoms)
    write_dataset(tmp_path / "test.npz", structures)
    result = _evaluate_test(ensemble_path, str(tmp_path / "test.npz"))
    calc = EnsembleCalculator.from_checkpoint(ensemble_path)
    errors = []
    for atoms in read_dataset(tmp_path / "test.npz"):
        reference = atoms.get_forces()
        atoms.calc = calc
        errors.append(np.abs(atoms.get_forces() - reference))
    assert result["force_mae"] == pytest.approx(np.concatenate(errors).mean(), rel=1e-4)
    assert result["version"] == 3
