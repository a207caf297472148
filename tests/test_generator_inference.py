"""The generator and inference apps on their own, with a small real ensemble."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.io import read, write

from palflow.apps.data.dataset import read_arrays, read_dataset, write_dataset
from palflow.apps.generator import _run_md, blow_up_reason
from palflow.apps.inference import _evaluate_test, _score_candidates
from palflow.apps.models.calculator import EnsembleCalculator
from palflow.apps.models.core import save_checkpoint
from palflow.apps.models.schnet.network import ModelSpec, SchNetEnsemble
from palflow.pipeline.config.sections import GeneratorSettings


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


def run_walkers(tmp_path, ensemble_path, start_paths, settings, seed=1):
    """Run one generator task on ``start_paths``; per-walker file paths under tmp_path."""
    n = len(start_paths)
    return _run_md(
        start_paths,
        ensemble_path,
        [str(tmp_path / f"traj{i}.npz") for i in range(n)],
        [str(tmp_path / f"last{i}.extxyz") for i in range(n)],
        settings,
        seed=seed,
    )


def test_md_records_sampled_frames_with_their_disagreement(tmp_path, ensemble_path, start_path):
    result = run_walkers(
        tmp_path, ensemble_path, [start_path], md_settings(max_force_disagreement=1e9)
    )
    (walker,) = result["walkers"]
    assert not walker["blew_up"], walker["reason"]
    assert result["version"] == 3
    assert walker["n_frames"] == 4
    arrays = read_arrays(tmp_path / "traj0.npz")
    assert arrays["step"].tolist() == [5, 10, 15, 20]
    # Every member's predictions are kept per frame, for the selection measure.
    assert arrays["member_energies"].shape == (4, 4)
    assert arrays["member_forces"].shape == (4, 4, 9, 3)
    assert arrays["force_disagreement"].tolist() == pytest.approx(walker["force_disagreement"])
    # The recorded disagreement is what the ensemble says about each recorded frame.
    frames = read_dataset(tmp_path / "traj0.npz")
    calc = EnsembleCalculator.from_checkpoint(ensemble_path)
    frames[2].calc = calc
    frames[2].get_potential_energy()
    assert calc.results["force_disagreement"] == pytest.approx(
        walker["force_disagreement"][2], rel=1e-4
    )
    # The walker's next segment starts from the last frame, momenta included.
    last = read(tmp_path / "last0.extxyz")
    np.testing.assert_allclose(last.positions, frames[-1].positions, atol=1e-6)
    assert np.abs(last.get_momenta()).sum() > 0


def test_md_stops_when_ensemble_disagreement_passes_the_hard_cap(
    tmp_path, ensemble_path, start_path
):
    result = run_walkers(
        tmp_path, ensemble_path, [start_path], md_settings(max_force_disagreement=1e-9)
    )
    (walker,) = result["walkers"]
    assert walker["blew_up"]
    assert "hard cap" in walker["reason"]
    assert walker["n_frames"] == 0
    # Nothing sound was reached: the walker's state is still its start.
    np.testing.assert_allclose(
        read(tmp_path / "last0.extxyz").positions, read(start_path).positions, atol=1e-6
    )


def test_walkers_in_one_task_move_as_they_would_alone(tmp_path, ensemble_path, start_path):
    """Batching changes the cost, not the trajectory: velocity Verlet from the same
    start gives the same frames for a walker alone and for one among three."""
    settings = md_settings(integrator="verlet", max_force_disagreement=1e9)
    atoms = read(start_path)
    draw = np.random.default_rng(7)
    paths = []
    for i in range(3):
        moved = atoms.copy()
        moved.positions += draw.normal(0, 0.05, moved.positions.shape)
        moved.set_momenta(draw.normal(0, 0.3, moved.positions.shape))
        paths.append(str(tmp_path / f"start{i}.extxyz"))
        write(paths[-1], moved)
    (tmp_path / "together").mkdir()
    (tmp_path / "alone").mkdir()
    together = run_walkers(tmp_path / "together", ensemble_path, paths, settings)
    alone = run_walkers(tmp_path / "alone", ensemble_path, paths[1:2], settings)
    assert [w["n_frames"] for w in together["walkers"]] == [4, 4, 4]
    np.testing.assert_allclose(
        together["walkers"][1]["force_disagreement"],
        alone["walkers"][0]["force_disagreement"],
        rtol=1e-4,
    )
    batched = read_dataset(tmp_path / "together" / "traj1.npz")
    single = read_dataset(tmp_path / "alone" / "traj0.npz")
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-5)
    # The walkers are distinct trajectories, not copies of one.
    first = read_dataset(tmp_path / "together" / "traj0.npz")
    assert np.abs(first[-1].positions - batched[-1].positions).max() > 1e-3


def test_verlet_conserves_energy_on_the_ensemble_surface(tmp_path, ensemble_path, start_path):
    """The integrator is symplectic: total energy on the ensemble mean drifts little."""
    from palflow.apps.generator import BatchedDynamics
    from palflow.apps.models.core import load_checkpoint

    settings = md_settings(integrator="verlet", timestep_fs=0.25)
    model, _ = load_checkpoint(ensemble_path, device="cpu")
    walkers = [read(start_path), read(start_path)]
    rng = np.random.default_rng(0)
    for atoms in walkers:
        atoms.set_momenta(rng.normal(0, 0.2, atoms.positions.shape))
    dynamics = BatchedDynamics(model, walkers, settings, rng)

    def total_energies():
        calc = EnsembleCalculator(model)
        energies = []
        for atoms in walkers:
            atoms.calc = calc
            energies.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
            atoms.calc = None
        return np.array(energies)

    before = total_energies()
    kinetic = np.array([a.get_kinetic_energy() for a in walkers])
    for _ in range(200):
        dynamics.step([0, 1])
    drift = np.abs(total_energies() - before)
    assert (drift < 0.02 * kinetic).all(), (drift, kinetic)
    assert np.abs(walkers[0].positions - read(start_path).positions).max() > 0.01


def test_langevin_holds_the_set_temperature(tmp_path, ensemble_path, start_path):
    """BAOAB with strong friction brings cold walkers to the thermostat's temperature."""
    from palflow.apps.generator import BatchedDynamics
    from palflow.apps.models.core import load_checkpoint

    settings = md_settings(integrator="langevin", temperature_K=300.0, friction=0.2)
    model, _ = load_checkpoint(ensemble_path, device="cpu")
    walkers = [read(start_path) for _ in range(4)]
    dynamics = BatchedDynamics(model, walkers, settings, np.random.default_rng(0))
    temperatures = []
    for step in range(400):
        dynamics.step([0, 1, 2, 3])
        if step >= 100:
            temperatures.extend(a.get_temperature() for a in walkers)
    assert np.mean(temperatures) == pytest.approx(300.0, rel=0.15)


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
    # Copper atoms 1.4 Å apart (EMT gives forces of some 100 eV/Å there): blown up by
    # the covalent radii (0.6 x 2.64 Å), though far above min_distance.
    pair = Atoms("Cu2", positions=[[0, 0, 0], [1.4, 0, 0]])
    assert "covalent radii" in blow_up_reason(pair, 0.1, settings)
    pair.positions[1, 0] = 1.7
    assert blow_up_reason(pair, 0.1, settings) is None
    assert blow_up_reason(pair, 0.1, {**settings, "min_distance_factor": 0.7}) is not None
    assert blow_up_reason(atoms, 0.1, {**settings, "min_distance_factor": 0.0}) is None


def test_md_takes_the_whole_generator_section_and_names_what_is_missing(
    tmp_path, ensemble_path, start_path
):
    partial = {k: v for k, v in md_settings().items() if k not in {"friction", "min_distance"}}
    with pytest.raises(ValueError, match="friction, min_distance"):
        run_walkers(tmp_path, ensemble_path, [start_path], partial)


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
    # With an output file, every member's predictions come along for the coordinator's
    # selection measure; the default measure recomputed from them gives the same spread.
    from palflow.pipeline.policies.measures import (
        EnsemblePrediction,
        MeasureContext,
        max_force_spread,
    )

    _score_candidates(
        ensemble_path, str(tmp_path / "queue.npz"), output_path=str(tmp_path / "s.npz")
    )
    prediction = EnsemblePrediction.from_arrays(read_arrays(tmp_path / "s.npz"))
    assert prediction.member_forces.shape == (4, 27, 3)
    np.testing.assert_allclose(
        max_force_spread(prediction, MeasureContext()), result["force_disagreement"], rtol=1e-4
    )


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
    # Per structure: its own mean error, and the ensemble's spread on it.
    np.testing.assert_allclose(
        result["structure_force_error"], [e.mean() for e in errors], rtol=1e-4
    )
    assert len(result["structure_force_spread"]) == 3
    assert result["energy_rmse_per_atom"] >= result["energy_mae_per_atom"]
