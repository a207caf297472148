"""The MACE backend: members, checkpoints, MACE's own model files, streaming training,
E0s, and MACE campaigns on thread pools with an EMT oracle (one fine-tuned from a
foundation model the test trains itself)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

pytest.importorskip("mace", reason="mace-torch is not installed")

from palflow.apps.data.dataset import (
    structure_key,  # noqa: E402
    write_dataset,  # noqa: E402
)
from palflow.apps.models.calculator import EnsembleCalculator  # noqa: E402
from palflow.apps.models.core import build_batch, load_checkpoint, new_ensemble, save_checkpoint  # noqa: E402
from palflow.apps.models.mace.ensemble import MACEEnsemble  # noqa: E402
from palflow.apps.training import _train_member, bootstrap_multiplicity, evaluate_errors  # noqa: E402
from palflow.pipeline.config.models import missing_elements, resolve_model_spec  # noqa: E402
from palflow.pipeline.config.settings import TrainingSettings, load_campaign  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TINY = {
    "r_max": 4.0,
    "num_channels": 8,
    "max_L": 0,
    "correlation": 2,
    "num_interactions": 1,
    "num_radial_basis": 4,
    "num_cutoff_basis": 5,
    "dtype": "float64",
}
"""A MACE small enough to train in seconds on one core."""


def labelled(structures, calculator) -> list[Atoms]:
    """``structures`` with the calculator's energy (eV) and forces (eV/Å) attached."""
    out = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calculator
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        out.append(atoms)
    return out


def rattled(name: str, n: int, seed: int, stdev: float = 0.1) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = molecule(name)
        atoms.rattle(stdev, seed=int(rng.integers(2**31)))
        frames.append(atoms)
    return frames


def mace_campaign(**overrides):
    """A MACE campaign on ethanol with EMT (the tests' overrides on top)."""
    settings = {
        "oracle__calculator": "ase.calculators.emt:EMT",
        "oracle__kwargs": {},
        "model__name": "mace",
        **{f"model__{k}": v for k, v in TINY.items()},
    }
    settings.update(overrides)
    return load_campaign(None, **settings)


def tiny_spec(data: list[Atoms], **changes) -> dict:
    """The members' spec as a campaign on ethanol resolves it from ``data``."""
    campaign = mace_campaign(**{f"model__{k}": v for k, v in changes.items()})
    return resolve_model_spec(campaign, data, molecule("CH3CH2OH"))


@pytest.fixture(scope="module")
def ethanol_emt():
    """24 rattled ethanol frames labelled by EMT."""
    return labelled(rattled("CH3CH2OH", 24, seed=0), EMT())


@pytest.fixture(scope="module")
def ensemble(ethanol_emt):
    """A K=3 ensemble whose energy scale fits EMT's forces (nonzero, distinct members)."""
    model = new_ensemble("mace", tiny_spec(ethanol_emt), 3, seed=0)
    model.fit_energy_reference(ethanol_emt)
    return model.eval()


def assert_same_predictions(a, b, structures):
    """Equal to the last bit or two: the members' force passes sum in a
    thread-dependent order."""
    (energy_a, forces_a), (energy_b, forces_b) = predict(a, structures), predict(b, structures)
    torch.testing.assert_close(energy_a, energy_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(forces_a, forces_b, rtol=0, atol=1e-12)


def assert_same_weights(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, value in state_a.items():
        assert torch.equal(value, state_b[name]), name


def predict(model, structures):
    batch = build_batch(structures, model.spec.cutoff, with_targets=False)
    out = model(batch, compute_forces=True)
    return out["energy"].detach(), out["forces"].detach()


# ----------------------------------------------------------------- members and files
def test_member_and_stack_round_trip_exactly(ensemble, ethanol_emt):
    members = [ensemble.member(k) for k in range(ensemble.n_members)]
    assert [m.n_members for m in members] == [1, 1, 1]
    energy, forces = predict(ensemble, ethanol_emt[:4])
    for k, member in enumerate(members):
        assert_same_weights(member.members[0], ensemble.members[k])
        e, f = predict(member, ethanol_emt[:4])
        torch.testing.assert_close(e[0], energy[k], rtol=0, atol=1e-12)
        torch.testing.assert_close(f[0], forces[k], rtol=0, atol=1e-12)
    stacked = MACEEnsemble.stack(members)
    assert stacked.spec == ensemble.spec and stacked.n_members == 3
    assert_same_weights(stacked, ensemble)
    assert_same_predictions(stacked, ensemble, ethanol_emt[:4])
    assert (energy[0] - energy[1]).abs().min() > 1e-3, "members differ"


def test_checkpoint_round_trip_exactly(ensemble, ethanol_emt, tmp_path):
    save_checkpoint(tmp_path / "c.pt", ensemble, {"version": 7})
    loaded, extra = load_checkpoint(tmp_path / "c.pt")
    assert type(loaded) is MACEEnsemble and extra == {"version": 7}
    assert loaded.spec == ensemble.spec and not loaded.training
    assert_same_weights(loaded, ensemble)
    assert_same_predictions(loaded, ensemble, ethanol_emt[:4])


def test_exported_members_match_mace_calculator(ensemble, tmp_path):
    from mace.calculators import MACECalculator

    paths = ensemble.export(str(tmp_path / "ensemble.v00001"))
    assert [Path(p).name for p in paths] == [f"ensemble.v00001.member{k}.model" for k in range(3)]
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.15, seed=3)

    atoms.calc = EnsembleCalculator(ensemble)
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    ours = dict(atoms.calc.results)
    theirs = atoms.copy()
    theirs.calc = MACECalculator(model_paths=paths, device="cpu", default_dtype="float64")

    assert theirs.get_potential_energy() == pytest.approx(energy, abs=1e-5)
    np.testing.assert_allclose(theirs.get_forces(), forces, atol=1e-5)
    np.testing.assert_allclose(
        theirs.calc.results["energy_comm"], ours["member_energies"], atol=1e-5
    )
    assert ours["member_energies"].shape == (3,)
    assert ours["member_forces"].shape == (3, len(atoms), 3)
    assert ours["energy_disagreement"] > 0 and ours["force_disagreement"] > 0


def test_export_gathers_the_newest_versions_mace_model_files(ensemble, ethanol_emt, tmp_path):
    """``palflow export`` of a run laid out as a MACE run writes it (member checkpoints
    stacked into versions, each with its members' model files): the newest version's
    members as ``ensemble.member{k}.model``, byte for byte, and the held-out set; a
    member file the run lacks is written again from the version's checkpoint."""
    from mace.calculators import MACECalculator

    from palflow.apps.training import stack_member_checkpoints
    from palflow.pipeline.state.export import export_run
    from palflow.pipeline.state.rundir import RunDirectory

    run = RunDirectory.create(tmp_path / "run", mace_campaign(model__n_members=3).model_dump())
    run.store_labels(ethanol_emt[:6], [{"candidate_id": i, "source": "initial"} for i in range(6)])
    write_dataset(run.test_set, ethanol_emt[6:10])
    older = new_ensemble("mace", tiny_spec(ethanol_emt), 3, seed=1).eval()
    for version, model in ((1, older), (2, ensemble)):
        members = []
        for k in range(3):
            members.append(run.member_checkpoint(k, version))
            save_checkpoint(members[-1], model.member(k), {})
        stack_member_checkpoints(members, run.ensemble(version), {"version": version})
    run.close()

    done = export_run(run.root, tmp_path / "out")
    names = [f"ensemble.member{k}.model" for k in range(3)]
    assert [Path(p).name for p in done["model_files"]] == names
    for k, path in enumerate(done["model_files"]):
        written = Path(run.ensemble(2).removesuffix(".pt") + f".member{k}.model")
        assert Path(path).read_bytes() == written.read_bytes()
    assert done["test_structures"] == 4 and Path(done["test_file"]).is_file()
    readme = Path(done["readme_file"]).read_text()
    assert "The 3 members of version 2, each a standard MACE model file" in readme

    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.15, seed=3)
    atoms.calc = EnsembleCalculator(ensemble)
    newest = atoms.get_potential_energy()
    atoms.calc = EnsembleCalculator(older)
    assert abs(atoms.get_potential_energy() - newest) > 1e-3, "the versions differ"

    def committee_energy(paths):
        probe = atoms.copy()
        probe.calc = MACECalculator(model_paths=paths, device="cpu", default_dtype="float64")
        return probe.get_potential_energy()

    assert committee_energy(done["model_files"]) == pytest.approx(newest, abs=1e-5)

    Path(run.ensemble(2).removesuffix(".pt") + ".member1.model").unlink()
    again = export_run(run.root, tmp_path / "again")
    assert [Path(p).name for p in again["model_files"]] == names
    assert committee_energy(again["model_files"]) == pytest.approx(newest, abs=1e-5)


# ----------------------------------------------------------------- streaming training
def test_streaming_training_continues_and_takes_in_new_labels(ethanol_emt, tmp_path):
    settings = TrainingSettings(min_task_s=0.0, batch_size=8, learning_rate=1e-2).model_dump()
    spec = tiny_spec(ethanol_emt)
    first, everything = str(tmp_path / "first.npz"), str(tmp_path / "all.npz")
    write_dataset(first, ethanol_emt[:16])
    write_dataset(everything, ethanol_emt)

    def train(member, dataset, checkpoint_in, out, seed, n_epochs):
        return _train_member(
            member, dataset, checkpoint_in, str(tmp_path / out), spec, settings, seed, n_epochs,
            device="cpu",
        )  # fmt: skip

    one = train(0, first, None, "m0.1.pt", seed=10, n_epochs=3)
    two = train(0, everything, one["checkpoint"], "m0.2.pt", seed=10, n_epochs=6)
    other = train(1, first, None, "m1.1.pt", seed=11, n_epochs=3)

    assert (one["epochs"], two["epochs"]) == (3, 9)
    assert two["steps"] > one["steps"] > 0
    model_one, extra_one = load_checkpoint(one["checkpoint"])
    model_two, extra_two = load_checkpoint(two["checkpoint"])
    assert extra_two["epochs"] == 9 and extra_two["member"] == 0
    assert extra_one["optimizer"]["state"], "Adam's moments travel with the member"
    assert extra_two["optimizer"]["state"][0]["step"] > extra_one["optimizer"]["state"][0]["step"]
    # The new labels are taken in: the bootstrap resample of all 24, not of the first 16.
    keys = [structure_key(atoms) for atoms in ethanol_emt]
    assert one["n_train"] == bootstrap_multiplicity(10, keys[:16]).sum()
    assert two["n_train"] == bootstrap_multiplicity(10, keys[:24]).sum() > one["n_train"]
    # Learning: the error on the training set falls from the first task to the second.
    before = evaluate_errors(model_one, ethanol_emt, "cpu")["force_mae"]
    after = evaluate_errors(model_two, ethanol_emt, "cpu")["force_mae"]
    assert after < 0.8 * before, (before, after)
    assert two["train_loss"] < one["train_loss"]
    # Members with different seeds: their own initial weights and bootstrap resample.
    model_other, _ = load_checkpoint(other["checkpoint"])
    assert not np.array_equal(
        bootstrap_multiplicity(10, range(16)), bootstrap_multiplicity(11, range(16))
    )
    different = [
        not torch.equal(a, b)
        for a, b in zip(model_one.parameters(), model_other.parameters(), strict=True)
    ]
    assert all(different)


# ----------------------------------------------------------------- E0s
def molecules_emt() -> list[Atoms]:
    """Several compositions of H, C and O, so that least squares fixes every E0."""
    names = ["CH4", "H2O", "CH3OH", "C2H6", "CH3CH2OH", "H2CO", "CO2", "C2H4"]
    return labelled([f for name in names for f in rattled(name, 2, seed=1)], EMT())


def test_e0s_average_is_least_squares_on_the_labels():
    data = molecules_emt()
    spec = tiny_spec(data)
    assert spec["atomic_numbers"] == [1, 6, 8]
    counts = np.array([[np.sum(a.numbers == z) for z in (1, 6, 8)] for a in data], float)
    energies = np.array([a.get_potential_energy() for a in data])
    expected, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    np.testing.assert_allclose(spec["e0s"], expected, rtol=1e-10)


def test_e0s_oracle_are_the_isolated_atom_energies():
    spec = tiny_spec([], e0s="oracle")
    expected = []
    for symbol in ("H", "C", "O"):
        atom = Atoms(symbol)
        atom.calc = EMT()
        expected.append(atom.get_potential_energy())
    assert spec["atomic_numbers"] == [1, 6, 8]
    np.testing.assert_allclose(spec["e0s"], expected, rtol=1e-12)


def test_an_explicit_e0s_table_is_used_as_given(ethanol_emt):
    table = {"O": -2040.5, "H": -13.6, "C": -1030.0, "N": -1485.0}
    spec = tiny_spec(ethanol_emt, e0s=table)
    assert spec["atomic_numbers"] == [1, 6, 7, 8]
    assert spec["e0s"] == [-13.6, -1030.0, -1485.0, -2040.5]
    model = new_ensemble("mace", spec, 1)
    atomic_energies = model.members[0].atomic_energies_fn.atomic_energies.reshape(-1)
    np.testing.assert_allclose(atomic_energies.numpy(), spec["e0s"])


def test_an_element_without_e0_is_refused_not_zeroed(ethanol_emt):
    spec = tiny_spec(ethanol_emt)
    ammonia = labelled([molecule("NH3")], EMT())
    assert missing_elements(spec, ethanol_emt) == []
    assert missing_elements(spec, [*ethanol_emt[:2], *ammonia]) == ["N"]
    model = new_ensemble("mace", spec, 1)
    with pytest.raises(ValueError, match=r"elements \[7\] are not in the model's element table"):
        predict(model, ammonia)


# ----------------------------------------------------------------- campaigns
def run_on_threads(tmp_path, campaign):
    from tests.test_coordinator import run_campaign

    return run_campaign(tmp_path, campaign)


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run.root / "metrics.jsonl").read_text().splitlines()]


SMALL_CAMPAIGN = {
    "model__n_members": 3,
    "training__min_task_s": 0.0,
    "training__epochs_per_task": 6,
    "training__batch_size": 4,
    "generator__steps_per_task": 40,
    "generator__n_walkers": 2,
    "initial__n_structures": 8,
    "test__n_structures": 8,
    "oracle__batch_size": 4,
    "stop__max_labels": 16,
    "stop__max_wall_s": 300.0,
    "stop__final_training_s": 4.0,
}
"""Sizes for a campaign of a minute or two on two cores."""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_mace_campaign_on_threads_learns_and_writes_model_files(tmp_path):
    campaign = mace_campaign(
        name="cu13-mace",
        system__structure=str(EXAMPLES / "structures" / "cu13.xyz"),
        **SMALL_CAMPAIGN,
        training__learning_rate=5e-3,
        # A young MACE committee lets hot, fast walkers crush the cluster into
        # 100 eV/Å labels; milder MD, and walkers reset at 1 eV/Å disagreement.
        generator__timestep_fs=1.0,
        generator__temperature_K=500.0,
        generator__max_force_disagreement=1.0,
    )
    run, summary = run_on_threads(tmp_path, campaign)

    assert summary["stop_reason"] == "label budget of 16 reached"
    assert summary["labels"] == 16
    state = json.loads((run.root / "state.json").read_text())
    assert state["model_spec"]["name"] == "mace"
    assert state["model_spec"]["atomic_numbers"] == [29]
    versions = sorted((run.root / "models").glob("ensemble.v*.pt"))
    assert summary["versions"] >= 2 and len(versions) == summary["versions"]
    for version in versions:
        stem = version.name.removesuffix(".pt")
        files = sorted(p.name for p in version.parent.glob(f"{stem}.member*.model"))
        assert files == [f"{stem}.member{k}.model" for k in range(3)]
    mae = [entry[2] for entry in summary["test_force_mae"]]
    print(f"test force MAE of v1..v{len(mae)}: " + " ".join(f"{m:.3f}" for m in mae))
    assert len(mae) >= 2 and mae[-1] < mae[0], mae


# ----------------------------------------------------------------- fine-tuning
def ethanol_md(calculator, n_frames: int, seed: int) -> list[Atoms]:
    """Frames of Langevin MD of ethanol at 500 K on ``calculator``, labelled by it."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = molecule("CH3CH2OH")
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=500.0, rng=rng)
    dynamics = Langevin(atoms, 0.5 * units.fs, temperature_K=500.0, friction=0.02, rng=rng)
    frames = []
    for _ in range(n_frames):
        dynamics.run(10)
        frames.append(atoms.copy())
    return labelled(frames, calculator)


def train_foundation(folder: Path) -> str:
    """A small foundation model: one MACE trained on another oracle than the campaign's
    (EMT plus a weak Lennard-Jones pair term), written as a standard MACE model file."""
    from ase.calculators.lj import LennardJones
    from ase.calculators.mixing import SumCalculator

    other = SumCalculator([EMT(), LennardJones(sigma=1.0, epsilon=0.005, rc=3.0, smooth=True)])
    data = ethanol_md(other, 40, seed=1) + ethanol_md(other, 40, seed=3)
    write_dataset(folder / "foundation.npz", data)
    spec = tiny_spec(data, num_channels=16, num_interactions=2)
    settings = TrainingSettings(
        min_task_s=0.0, batch_size=4, learning_rate=1e-2, learning_rate_min=1e-3,
        learning_rate_half_life_steps=400,
    ).model_dump()  # fmt: skip
    result = _train_member(
        0, str(folder / "foundation.npz"), None, str(folder / "foundation.pt"), spec, settings,
        seed=3, n_epochs=40, device="cpu",
    )  # fmt: skip
    model, _ = load_checkpoint(result["checkpoint"])
    (path,) = model.export(str(folder / "foundation"))
    return path


@pytest.mark.parametrize("layers", [1, 2])
def test_foundation_file_is_read_back(tmp_path, layers):
    """``foundation_elements`` reads the table, E0s, cutoff and architecture of a file
    (a one-layer MACE keeps its hidden irreps as a string)."""
    from palflow.apps.models.mace.spec import foundation_elements

    spec = tiny_spec(molecules_emt(), num_channels=16, num_interactions=layers)
    (path,) = new_ensemble("mace", spec, 1).export(str(tmp_path / "f"))
    table, e0s, r_max, architecture = foundation_elements(path)
    assert table == [1, 6, 8] and r_max == 4.0
    np.testing.assert_allclose(e0s, spec["e0s"])
    assert architecture == {
        "num_interactions": layers,
        "num_channels": 16,
        "max_L": 0,
        "avg_num_neighbors": pytest.approx(spec["avg_num_neighbors"]),
    }


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_campaign_fine_tunes_a_foundation_model(tmp_path):
    """examples/ethanol_mace_finetune.toml with EMT as the oracle, from a foundation
    model trained here on another oracle; the file sits next to the campaign file."""
    from ase.db import connect

    from palflow.apps.data.dataset import read_dataset
    from palflow.apps.models.calculator import predict_structures
    from palflow.pipeline.policies.metrology import spearman_rho

    foundation = train_foundation(tmp_path)
    Path(foundation).rename(tmp_path / "foundation.model")
    campaign_file = tmp_path / "ethanol_mace_finetune.toml"
    campaign_file.write_text((EXAMPLES / "ethanol_mace_finetune.toml").read_text())
    sizes = {**SMALL_CAMPAIGN, "test__n_structures": 16}
    campaign = load_campaign(
        campaign_file, oracle__calculator="ase.calculators.emt:EMT", oracle__kwargs={}, **sizes
    )
    assert campaign.model.foundation == str(tmp_path / "foundation.model")
    run, summary = run_on_threads(tmp_path, campaign)

    assert summary["stop_reason"] == "label budget of 16 reached"
    assert summary["versions"] >= 2
    spec = json.loads((run.root / "state.json").read_text())["model_spec"]
    assert spec["foundation"] == run.foundation_model
    assert spec["num_channels"] == 16 and spec["num_interactions"] == 2

    # The members start from the foundation: after their first task their weights
    # are still within a few percent of it ...
    foundation = torch.load(run.foundation_model, weights_only=False)
    original = dict(foundation.named_parameters())
    size = sum(float(v.norm() ** 2) for v in original.values()) ** 0.5
    first, _ = load_checkpoint(run.ensemble(1))
    for member in first.members:
        moved = [(p - original[k]).norm() ** 2 for k, p in member.named_parameters()]
        distance = float(sum(moved)) ** 0.5
        print(f"member moved {distance / size:.3%} from the foundation")
        assert distance < 0.1 * size
    # ... and their first version beats by far a member of the same architecture
    # trained from scratch on all the initial labels, for twice an ensemble member's
    # first task (a member may have run two tasks by the time v1 is published).
    test = read_dataset(run.test_set)
    first_mae = evaluate_errors(first, test, "cpu")["force_mae"]
    with connect(run.labels_db) as db:
        initial = [row.toatoms() for row in db.select(source="initial")]
    write_dataset(tmp_path / "initial.npz", initial)
    architecture = {"model__num_channels": 16, "model__num_interactions": 2}
    scratch_spec = resolve_model_spec(mace_campaign(**architecture), initial, test[0])
    scratch = _train_member(
        0, str(tmp_path / "initial.npz"), None, str(tmp_path / "scratch.pt"), scratch_spec,
        TrainingSettings(min_task_s=0.0, batch_size=campaign.training.batch_size).model_dump(),
        seed=0, n_epochs=2 * campaign.training.epochs_per_task, device="cpu",
    )  # fmt: skip
    scratch_mae = evaluate_errors(load_checkpoint(scratch["checkpoint"])[0], test, "cpu")
    assert first_mae < 0.6 * scratch_mae["force_mae"], (first_mae, scratch_mae)

    # The members disagree. How well their spread ranks the error is recorded (the
    # rho of a 16-frame held-out set is noisy: reported, not asserted).
    last, _ = load_checkpoint(run.ensemble(summary["versions"]))
    predicted = predict_structures(last, test)
    spread = np.asarray(predicted["force_disagreement"])
    error = [
        np.abs(f - a.get_forces()).mean() for f, a in zip(predicted["forces"], test, strict=True)
    ]
    assert spread.min() > 0
    rho = spearman_rho(spread, np.asarray(error))
    recorded = metrics(run)[-1]
    assert recorded["version"] == summary["versions"]
    assert recorded["uncertainty_spearman"] == pytest.approx(rho, abs=1e-9)
    print(
        f"fine-tuned: v1 force MAE {first_mae:.3f} eV/Å (scratch {scratch_mae['force_mae']:.3f});"
        f" last version rho(spread, error) = {rho:.3f}"
    )
