"""Behaviour of the ensemble potential, its training task and its ASE calculator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.optimize import BFGS

from palflow.apps.data.dataset import structure_key, write_dataset
from palflow.apps.models import registry
from palflow.apps.models.calculator import (
    EnsembleCalculator,
    ensemble_disagreement,
    predict_structures,
)
from palflow.apps.models.core import (
    PotentialEnsemble,
    build_batch,
    load_checkpoint,
    save_checkpoint,
)
from palflow.apps.models.schnet.network import ModelSpec, SchNetEnsemble
from palflow.apps.training import (
    _train_member,
    bootstrap_multiplicity,
    evaluate_errors,
    stack_member_checkpoints,
)
from palflow.pipeline.config.settings import TrainingSettings

SPEC = ModelSpec(cutoff=4.0, n_features=16, n_interactions=2, n_rbf=10, max_z=30)


def make_model(n_members: int = 3, seed: int = 0, dtype=torch.float32) -> SchNetEnsemble:
    torch.manual_seed(seed)
    return SchNetEnsemble(SPEC, n_members).to(dtype).eval()


def ethanol() -> Atoms:
    return molecule("CH3CH2OH")


def rattled_cu(seed: int = 0, repeat=(1, 1, 1), stdev: float = 0.08) -> Atoms:
    atoms = bulk("Cu", cubic=True).repeat(repeat)
    atoms.rattle(stdev, seed=seed)
    return atoms


def emt_labelled(n: int, seed: int) -> list[Atoms]:
    structures = []
    for i in range(n):
        atoms = rattled_cu(seed=seed * 1000 + i, stdev=0.1)
        atoms.calc = EMT()
        atoms.get_forces()
        structures.append(atoms)
    return structures


@pytest.mark.parametrize("make_atoms", [ethanol, rattled_cu], ids=["ethanol", "cu-periodic"])
def test_forces_are_negative_energy_gradient(make_atoms):
    model = make_model(n_members=2, dtype=torch.float64)
    batch = build_batch([make_atoms()], SPEC.cutoff)
    # Float64 positions in the batch so the finite difference is not limited by rounding.
    batch.positions = batch.positions.double()
    forces = model(batch)["forces"].detach()
    h = 1e-5
    for atom, axis in [(0, 0), (1, 2), (2, 1), (len(batch.numbers) - 1, 0)]:
        energies = []
        for sign in (1, -1):
            displaced = batch.positions.clone()
            displaced[atom, axis] += sign * h
            batch_d = build_batch([make_atoms()], SPEC.cutoff)
            batch_d.positions = displaced
            energies.append(model(batch_d, compute_forces=False)["energy"].detach()[:, 0])
        numerical = -(energies[0] - energies[1]) / (2 * h)
        torch.testing.assert_close(forces[:, atom, axis], numerical, rtol=1e-5, atol=1e-7)


def test_periodic_images_match_supercell():
    """A cell and its 2x1x2 supercell describe the same crystal: checks the shift vectors."""
    model = make_model()
    cell = rattled_cu(seed=3)
    supercell = cell.repeat((2, 1, 2))
    out_cell = model(build_batch([cell], SPEC.cutoff))
    out_super = model(build_batch([supercell], SPEC.cutoff))
    torch.testing.assert_close(out_super["energy"], 4 * out_cell["energy"], rtol=1e-5, atol=1e-4)
    tiled = out_cell["forces"].detach().repeat(1, 4, 1)
    torch.testing.assert_close(out_super["forces"].detach(), tiled, rtol=1e-4, atol=1e-5)
    # Wrapping atoms back into the cell must not change anything either.
    shifted = cell.copy()
    shifted.positions += cell.cell[0] * 1.0 - cell.cell[2] * 2.0
    out_shifted = model(build_batch([shifted], SPEC.cutoff))
    torch.testing.assert_close(out_shifted["energy"], out_cell["energy"], rtol=1e-5, atol=1e-4)


def test_batched_members_equal_single_members_and_stack_round_trip():
    model = make_model(n_members=4)
    batch = build_batch([ethanol(), rattled_cu()], SPEC.cutoff)
    out = model(batch)
    for i in range(model.n_members):
        single = model.member(i)
        assert single.n_members == 1
        out_i = single(batch)
        torch.testing.assert_close(out_i["energy"][0], out["energy"][i], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(out_i["forces"][0], out["forces"][i], rtol=1e-5, atol=1e-6)
    # Members differ from one another (independent initialisation per member).
    assert not torch.allclose(out["energy"][0], out["energy"][1])

    restacked = SchNetEnsemble.stack([model.member(i) for i in range(model.n_members)])
    original = model.state_dict()
    assert restacked.state_dict().keys() == original.keys()
    for name, value in restacked.state_dict().items():
        assert torch.equal(value, original[name]), name
    assert isinstance(model, PotentialEnsemble)
    assert registry.ensemble_class("schnet") is SchNetEnsemble


def test_batch_of_structures_equals_one_by_one():
    model = make_model()
    cluster = Atoms("Cu5", positions=np.random.default_rng(1).normal(0, 1.5, (5, 3)))
    structures = [ethanol(), rattled_cu(seed=1), cluster, rattled_cu(seed=2, repeat=(1, 1, 2))]
    batch = build_batch(structures, SPEC.cutoff)
    together = model(batch)
    offsets = np.cumsum([0] + [len(a) for a in structures])
    for s, atoms in enumerate(structures):
        alone = model(build_batch([atoms], SPEC.cutoff))
        torch.testing.assert_close(
            alone["energy"][:, 0], together["energy"][:, s], rtol=1e-5, atol=1e-4
        )
        torch.testing.assert_close(
            alone["forces"],
            together["forces"][:, offsets[s] : offsets[s + 1]],
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "crystal"])
def test_rotation_translation_invariance(periodic):
    model = make_model()
    atoms = rattled_cu(seed=4) if periodic else ethanol()
    q, r = np.linalg.qr(np.random.default_rng(5).normal(size=(3, 3)))
    rotation = q * np.sign(np.diag(r))
    rotation *= np.linalg.det(rotation)  # proper rotation, det = +1
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.T + np.array([0.3, -1.2, 2.5])
    if periodic:
        moved.cell = atoms.cell[:] @ rotation.T
    out = model(build_batch([atoms], SPEC.cutoff))
    out_moved = model(build_batch([moved], SPEC.cutoff))
    torch.testing.assert_close(out_moved["energy"], out["energy"], rtol=1e-5, atol=1e-4)
    rotated_forces = out["forces"].detach() @ torch.as_tensor(rotation.T, dtype=torch.float32)
    torch.testing.assert_close(out_moved["forces"].detach(), rotated_forces, rtol=1e-4, atol=1e-5)


def test_bootstrap_is_stable_as_data_grows():
    grown = bootstrap_multiplicity(3, range(60))
    assert np.array_equal(bootstrap_multiplicity(3, range(30)), grown[:30])
    assert set(np.unique(grown)) <= set(range(8)) and 0 in grown and grown.sum() > 30
    assert not np.array_equal(grown, bootstrap_multiplicity(4, range(60)))


def test_training_reduces_validation_error_and_continues(tmp_path):
    write_dataset(tmp_path / "train.npz", emt_labelled(40, seed=1))
    write_dataset(tmp_path / "val.npz", emt_labelled(10, seed=2))
    settings = TrainingSettings(
        learning_rate=3e-3, learning_rate_half_life_steps=0, batch_size=8, min_task_s=0.0
    ).model_dump()
    args = dict(
        dataset_path=str(tmp_path / "train.npz"),
        spec=SPEC.to_dict(),
        settings=settings,
        seed=11,
        validation_path=str(tmp_path / "val.npz"),
        device="cpu",
    )
    fresh = _train_member(
        0, checkpoint_in=None, checkpoint_out=str(tmp_path / "m0.pt"), n_epochs=0, **args
    )
    first = _train_member(
        0, checkpoint_in=None, checkpoint_out=str(tmp_path / "m1.pt"), n_epochs=12, **args
    )
    second = _train_member(
        0,
        checkpoint_in=str(tmp_path / "m1.pt"),
        checkpoint_out=str(tmp_path / "m2.pt"),
        n_epochs=12,
        **args,
    )
    assert (first["epochs"], second["epochs"]) == (12, 24)
    assert 0 < first["n_train"] and second["n_train"] == first["n_train"]
    assert second["val_force_mae"] < first["val_force_mae"] < 0.5 * fresh["val_force_mae"]
    assert second["t_end"] >= second["t_start"] and second["device"] == "cpu"

    model, extra = load_checkpoint(tmp_path / "m2.pt")
    assert extra["epochs"] == 24 and extra["member"] == 0
    # The optimiser state carried over: Adam's step count covers both calls.
    steps_per_epoch = -(-first["n_train"] // settings["batch_size"])
    assert int(extra["optimizer"]["state"][0]["step"]) == 24 * steps_per_epoch
    # Its validation frames: the held-out set and the labels its resample left out.
    train = emt_labelled(40, seed=1)
    left_out = bootstrap_multiplicity(11, [structure_key(a) for a in train]) == 0
    out_of_bag = [a for a, out in zip(train, left_out, strict=True) if out]
    assert second["n_validation"] == 10 + len(out_of_bag) and len(out_of_bag) > 5
    errors = evaluate_errors(model, emt_labelled(10, seed=2) + out_of_bag, "cpu")
    assert errors["force_mae"] == pytest.approx(second["val_force_mae"], rel=1e-5)
    assert errors["force_rmse"] >= errors["force_mae"]

    stack_member_checkpoints(
        [str(tmp_path / "m1.pt"), str(tmp_path / "m2.pt")],
        str(tmp_path / "ensemble.pt"),
        {"generation": 2},
    )
    ensemble, extra = load_checkpoint(tmp_path / "ensemble.pt")
    assert ensemble.n_members == 2 and extra == {"generation": 2}


def test_training_takes_the_whole_training_section_and_names_what_is_missing(tmp_path):
    write_dataset(tmp_path / "train.npz", emt_labelled(2, seed=1))
    settings = TrainingSettings().model_dump()
    del settings["bootstrap"], settings["min_task_s"]
    with pytest.raises(ValueError, match="min_task_s, bootstrap"):
        _train_member(
            0,
            str(tmp_path / "train.npz"),
            None,
            str(tmp_path / "m.pt"),
            SPEC.to_dict(),
            settings,
            seed=0,
            n_epochs=1,
        )


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = make_model(n_members=2)
    model.fit_energy_reference(emt_labelled(3, seed=5))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    loss = model(build_batch([rattled_cu()], SPEC.cutoff))["forces"].pow(2).sum()
    loss.backward()
    optimizer.step()
    model.eval()
    extra = {"optimizer": optimizer.state_dict(), "epochs": 3, "note": "x", "t": torch.ones(2)}
    save_checkpoint(tmp_path / "ckpt.pt", model, extra)
    loaded, loaded_extra = load_checkpoint(tmp_path / "ckpt.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert loaded.spec == model.spec and not loaded.training
    assert loaded_extra["epochs"] == 3 and torch.equal(loaded_extra["t"], torch.ones(2))
    fresh_optimizer = torch.optim.Adam(loaded.parameters(), lr=1e-3)
    fresh_optimizer.load_state_dict(loaded_extra["optimizer"])
    payload = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert payload["model"] == "schnet" and payload["n_members"] == 2


def test_ensemble_disagreement_formula():
    energies = np.array([[1.0, 10.0], [3.0, 10.0]])  # K=2, S=2
    forces = np.zeros((2, 3, 3))
    forces[0, 0] = [0.3, 0.0, 0.4]  # atom 0 (structure 0): deviation 0.25 from mean
    forces[1, 0] = [-0.3, 0.0, -0.4]
    forces[0, 2] = [1.0, 0.0, 0.0]  # atom 2 (structure 1): deviation 0.5
    e, fmax, fmean = ensemble_disagreement(energies, forces, np.array([0, 0, 1]), np.array([2, 1]))
    np.testing.assert_allclose(e, [0.5, 0.0])
    np.testing.assert_allclose(fmax, [0.5, 0.5])
    np.testing.assert_allclose(fmean, [0.25, 0.5])


def test_calculator_md_optimisation_and_disagreement():
    model = make_model(n_members=4)
    model.fit_energy_reference(emt_labelled(3, seed=6))
    atoms = rattled_cu(seed=7, repeat=(2, 1, 1))
    atoms.calc = EnsembleCalculator(model)
    energy = atoms.get_potential_energy()
    results = atoms.calc.results
    assert results["member_energies"].shape == (4,)
    assert results["member_forces"].shape == (4, len(atoms), 3)
    assert energy == pytest.approx(results["member_energies"].mean())
    assert results["energy_disagreement"] > 0 and results["force_disagreement"] > 0

    dyn = Langevin(atoms, timestep=1.0 * units.fs, temperature_K=300, friction=0.02, fixcm=False)
    dyn.run(20)
    assert np.isfinite(atoms.get_potential_energy()) and np.isfinite(atoms.get_forces()).all()
    opt = BFGS(atoms, logfile=None)
    opt.run(fmax=1e-3, steps=5)
    assert opt.nsteps == 5 and np.isfinite(atoms.get_forces()).all()

    identical = SchNetEnsemble.stack([model.member(1)] * 4)
    atoms.calc = EnsembleCalculator(identical)
    atoms.get_forces()
    assert atoms.calc.results["energy_disagreement"] == pytest.approx(0.0, abs=1e-12)
    assert atoms.calc.results["force_disagreement"] == pytest.approx(0.0, abs=1e-12)

    structures = [ethanol(), rattled_cu(seed=8), atoms.copy()]
    scored = predict_structures(model, structures, batch_size=2)
    for s, candidate in enumerate(structures):
        candidate.calc = EnsembleCalculator(model)
        forces = candidate.get_forces()
        assert scored["energy"][s] == pytest.approx(candidate.get_potential_energy(), abs=1e-4)
        np.testing.assert_allclose(scored["forces"][s], forces, atol=1e-5)
        assert scored["force_disagreement"][s] == pytest.approx(
            candidate.calc.results["force_disagreement"], rel=1e-4
        )
    assert (scored["energy_disagreement"] >= 0).all() and (scored["force_disagreement"] >= 0).all()
