"""Stress, from the oracle to the committee: labels on periodic cells keep their stress,
both backends predict it as the strain derivative of their energy, training uses it,
and the ensemble calculator returns it with its spread."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from palflow.apps.data.dataset import read_dataset, write_dataset
from palflow.apps.models.calculator import EnsembleCalculator, predict_structures
from palflow.apps.models.core import build_batch, load_checkpoint, new_ensemble
from palflow.apps.models.schnet.network import ModelSpec, SchNetEnsemble
from palflow.apps.oracles.calculators import label_structure
from palflow.apps.training import _train_member, evaluate_errors
from palflow.pipeline.config.settings import TrainingSettings

SPEC = ModelSpec(cutoff=4.0, n_features=16, n_interactions=2, n_rbf=16)


def strained_cu(seed: int, strain: float = 0.02, stdev: float = 0.05) -> Atoms:
    """A rattled 32-atom copper cell under a random strain of up to ``strain``."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", cubic=True).repeat(2)
    deformation = np.eye(3) + strain * rng.uniform(-1, 1, (3, 3))
    atoms.set_cell(atoms.cell @ (deformation + deformation.T) / 2, scale_atoms=True)
    atoms.rattle(stdev, seed=seed)
    return atoms


def emt_labels(n: int, seed: int) -> list[Atoms]:
    return [label_structure(strained_cu(seed * 100 + i), EMT(), max_force=50.0) for i in range(n)]


def float64_batch(atoms: Atoms, cutoff: float):
    """A batch of ``atoms`` whose positions and shifts keep float64 precision, so
    that a finite difference is not limited by float32 rounding."""
    batch = build_batch([atoms], cutoff, with_targets=False)
    batch.positions = torch.as_tensor(atoms.positions)
    batch.edge_shift = batch.edge_unit_shift.double() @ torch.as_tensor(atoms.cell[:])
    return batch


def numerical_stress(model, atoms: Atoms, h: float = 1e-4) -> np.ndarray:
    """[K, 3, 3] central differences of every member's energy over symmetric strains."""

    def energies(structure):
        batch = float64_batch(structure, model.spec.cutoff)
        return model(batch, compute_forces=False)["energy"].detach().double().numpy()[:, 0]

    result = np.zeros((model.n_members, 3, 3))
    for i in range(3):
        for j in range(3):
            for sign in (1, -1):
                deformation = np.eye(3)
                deformation[i, j] += sign * h / 2
                deformation[j, i] += sign * h / 2
                moved = atoms.copy()
                moved.set_cell(atoms.cell @ deformation, scale_atoms=True)
                result[:, i, j] += sign * energies(moved) / (2 * h)
    return result / atoms.get_volume()


# ---------------------------------------------------------------------------- labels
def test_the_oracle_stores_stress_on_periodic_cells_only(tmp_path):
    cu = emt_labels(2, seed=0)
    reference = strained_cu(0)
    reference.calc = EMT()
    np.testing.assert_allclose(cu[0].get_stress(), reference.get_stress(), atol=1e-12)
    water = label_structure(molecule("H2O"), EMT(), max_force=50.0)
    assert "stress" not in water.calc.results

    write_dataset(tmp_path / "set.npz", [*cu, water])
    back = read_dataset(tmp_path / "set.npz")
    np.testing.assert_allclose(back[0].get_stress(), cu[0].get_stress(), atol=1e-12)
    assert "stress" not in back[2].calc.results


def test_an_all_zero_stress_is_not_a_label():
    class ZeroStress(EMT):
        def calculate(self, *args, **kwargs):
            super().calculate(*args, **kwargs)
            self.results["stress"] = np.zeros(6)

    labelled = label_structure(strained_cu(1), ZeroStress(), max_force=50.0)
    assert "stress" not in labelled.calc.results


# ---------------------------------------------------------------------------- models
def test_schnet_stress_is_the_strain_derivative_of_its_energy():
    torch.manual_seed(0)
    model = SchNetEnsemble(SPEC, 2).double().eval()
    atoms = strained_cu(3)
    batch = float64_batch(atoms, SPEC.cutoff)
    analytic = model(batch, compute_stress=True)["stress"].detach().numpy()[:, 0]
    numeric = numerical_stress(model, atoms)
    assert np.abs(numeric).max() > 1e-3, "the test needs a stress worth comparing"
    np.testing.assert_allclose(analytic, numeric, atol=1e-7)


def test_mace_stress_matches_maces_own_calculator(tmp_path):
    pytest.importorskip("mace", reason="mace-torch is not installed")
    from mace.calculators import MACECalculator

    from palflow.pipeline.config.models import resolve_model_spec
    from palflow.pipeline.config.settings import load_campaign

    data = emt_labels(4, seed=1)
    campaign = load_campaign(
        None,
        model__name="mace",
        model__num_channels=8,
        model__max_L=0,
        model__correlation=2,
        model__num_interactions=1,
        model__r_max=4.0,
        model__dtype="float64",
    )
    spec = resolve_model_spec(campaign, data, data[0])
    model = new_ensemble("mace", spec, 2, seed=0)
    model.fit_energy_reference(data)
    model.eval()
    atoms = strained_cu(5)
    ours = EnsembleCalculator(model)
    atoms.calc = ours
    stress = atoms.get_stress()
    paths = model.export(str(tmp_path / "v"))
    theirs = MACECalculator(model_paths=paths, device="cpu", default_dtype="float64")
    reference = atoms.copy()
    reference.calc = theirs
    assert np.abs(stress).max() > 1e-4
    np.testing.assert_allclose(stress, reference.get_stress(), atol=1e-6)
    members = ours.results["member_stress"]
    assert members.shape == (2, 3, 3)
    assert ours.results["stress_disagreement"] == pytest.approx(members.std(axis=0).max(), rel=1e-9)


def test_the_calculator_refuses_stress_without_a_cell():
    from ase.calculators.calculator import PropertyNotImplementedError

    atoms = molecule("H2O")
    atoms.calc = EnsembleCalculator(SchNetEnsemble(SPEC, 2))
    atoms.get_forces()
    assert "stress" not in atoms.calc.results
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_predictions_on_a_mixed_batch_give_stress_where_there_is_a_cell():
    model = SchNetEnsemble(SPEC, 3).eval()
    out = predict_structures(model, [strained_cu(0), molecule("H2O")])
    assert np.isfinite(out["stress"][0]).all() and np.isnan(out["stress"][1]).all()
    assert out["member_stress"].shape == (3, 2, 3, 3)
    assert out["stress_disagreement"][0] > 0 and np.isnan(out["stress_disagreement"][1])


# -------------------------------------------------------------------------- training
def test_training_on_stress_lowers_the_stress_error(tmp_path):
    """Same data, seed and epochs: with a stress weight the member's stress error on
    held-out cells ends well below the one it reaches without."""
    train, test = emt_labels(24, seed=2), emt_labels(8, seed=3)
    write_dataset(tmp_path / "train.npz", train)
    settings = TrainingSettings(min_task_s=0, bootstrap=False).model_dump()
    errors = {}
    for weight in (0.0, 1.0):
        settings["stress_weight"] = weight
        out = tmp_path / f"member{weight}.pt"
        _train_member(
            0,
            str(tmp_path / "train.npz"),
            None,
            str(out),
            SPEC.to_dict(),
            settings,
            seed=0,
            n_epochs=30,
            device="cpu",
        )
        errors[weight] = evaluate_errors(load_checkpoint(out)[0], test, "cpu")["stress_mae"]
    assert all(np.isfinite(e) for e in errors.values())
    assert errors[1.0] < 0.5 * errors[0.0], errors


# ------------------------------------------------------------------------- selection
def test_the_stress_spread_measure_reads_generator_and_scoring_files(tmp_path):
    from ase import units
    from ase.io import write

    from palflow.apps.data.dataset import read_arrays
    from palflow.apps.generator import _run_md
    from palflow.apps.models.calculator import stress_disagreement
    from palflow.apps.models.core import save_checkpoint
    from palflow.pipeline.config.sections import GeneratorSettings
    from palflow.pipeline.policies.measures import MEASURES, EnsemblePrediction, MeasureContext

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "e.pt", SchNetEnsemble(SPEC, 3), {"version": 1})
    write(tmp_path / "cu.extxyz", strained_cu(0))
    settings = GeneratorSettings(steps_per_task=10, sample_interval=5, pressure_bar=0.0,
                                 max_force_disagreement=1e9).model_dump()  # fmt: skip
    _run_md([str(tmp_path / "cu.extxyz")], str(tmp_path / "e.pt"), [str(tmp_path / "f.npz")],
            [str(tmp_path / "last.extxyz")], settings, seed=0)  # fmt: skip
    arrays = read_arrays(tmp_path / "f.npz")
    prediction = EnsemblePrediction.from_arrays(arrays)
    context = MeasureContext(np.random.default_rng(0))
    expected = stress_disagreement(arrays["member_stress"].transpose(1, 0, 2, 3)) / units.GPa
    scores = MEASURES["stress_spread"](prediction, context)
    assert scores.shape == (2,) and (scores > 0).all()
    np.testing.assert_allclose(scores, expected)

    out = predict_structures(SchNetEnsemble(SPEC, 3).eval(), [strained_cu(1), molecule("H2O")])
    mixed = EnsemblePrediction(
        out["member_energies"], np.concatenate(out["member_forces"], axis=1),
        np.repeat([0, 1], [32, 3]), np.array([32, 3]), member_stress=out["member_stress"],
    )  # fmt: skip
    scores = MEASURES["stress_spread"](mixed, context)
    assert scores[0] > 0 and scores[1] == 0


def test_the_held_out_evaluation_reports_the_stress_error(tmp_path):
    from palflow.apps.inference import _evaluate_test
    from palflow.apps.models.core import save_checkpoint

    save_checkpoint(tmp_path / "e.pt", SchNetEnsemble(SPEC, 2), {"version": 1})
    write_dataset(tmp_path / "test.npz", [*emt_labels(3, seed=4), label_structure(
        molecule("H2O"), EMT(), max_force=50.0)])  # fmt: skip
    result = _evaluate_test(str(tmp_path / "e.pt"), str(tmp_path / "test.npz"))
    assert result["stress_mae"] > 0
    write_dataset(tmp_path / "molecules.npz", [label_structure(molecule("H2O"), EMT(), 50.0)])
    assert (
        _evaluate_test(str(tmp_path / "e.pt"), str(tmp_path / "molecules.npz"))["stress_mae"]
        is None
    )


def test_a_wild_stress_moves_the_cell_by_at_most_one_percent_a_step():
    """An ensemble far outside its data can predict a stress of any size; the barostat
    then moves the cell by at most ``MAX_CELL_STRAIN`` per step (it once shrank a cell
    to nothing in one step, and the neighbour list filled the memory)."""
    from palflow.apps.md.dynamics import MAX_CELL_STRAIN, BatchedDynamics
    from palflow.pipeline.config.sections import GeneratorSettings

    torch.manual_seed(0)
    atoms = bulk("Cu", cubic=True).repeat(2)
    atoms.set_momenta(np.zeros((len(atoms), 3)))
    settings = GeneratorSettings(pressure_bar=1.0).model_dump()
    dynamics = BatchedDynamics(
        SchNetEnsemble(SPEC, 2).eval(), [atoms], settings, np.random.default_rng(0)
    )
    length = atoms.cell.lengths()[0]
    for stress, sign in ((1e6, -1), (-1e6, 1), (np.inf, 0), (np.nan, 0)):
        before = atoms.cell.lengths()[0]
        dynamics._rescale_cell(atoms, np.eye(3) * stress, dynamics.kT[0])
        ratio = atoms.cell.lengths()[0] / before
        assert np.isfinite(atoms.positions).all()
        if sign:  # a huge positive stress (negative pressure) shrinks the cell, and back
            assert ratio == pytest.approx(np.exp(sign * MAX_CELL_STRAIN))
        else:  # a stress that is not finite leaves the cell to the noise alone
            assert abs(np.log(ratio)) < 1e-3
    assert atoms.cell.lengths()[0] == pytest.approx(length, rel=1e-3)
