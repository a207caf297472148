"""The SevenNet backend: a committee fine-tuned from SevenNet-0, whose weights ship in
the sevenn wheel (nothing is downloaded).

Copper with EMT throughout: an 8-atom periodic cell, so that each SevenNet pass takes
a fraction of a second on one core.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from palflow.apps.data.dataset import write_dataset
from palflow.apps.models import registry
from palflow.apps.models.backend import ModelError, SpecInputs
from palflow.apps.models.core import build_batch, load_checkpoint
from palflow.apps.sections import TrainingSettings
from palflow.apps.training import _train_member, stack_member_checkpoints
from tests.test_bad_input import write
from tests.test_cli import run_cli

torch = pytest.importorskip("torch")
pytest.importorskip("sevenn")


def copper(n: int, seed: int = 0, rattle: float = 0.1, strain: float = 0.02) -> list:
    """``n`` rattled and strained 8-atom fcc copper cells labelled by EMT (with stress)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((1, 1, 2))
        atoms.set_cell(atoms.cell @ (np.eye(3) + rng.uniform(-strain, strain, (3, 3))), True)
        atoms.positions += rng.normal(0, rattle, atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def spec():
    backend = registry.backend("sevennet")
    settings = backend.settings(n_members=2)
    start = copper(1)[0]
    backend.check(settings, start)
    return backend.resolve_spec(settings, SpecInputs([], start, lambda: None)) | {
        "name": "sevennet"
    }


def test_spec_names_the_wheels_model_and_its_cutoff(spec):
    assert spec["package_model"] == "7net-0" and spec["cutoff"] == 5.0
    assert "foundation" not in spec, "the wheel's own file is not copied into each run"


def test_energy_reference_is_refitted_to_the_oracle(spec):
    """SevenNet-0 predicts PBE energies, eV away from EMT's; the per-element shift
    refitted on the labels removes the offset without touching the forces."""
    backend = registry.backend("sevennet")
    labels, test = copper(8, seed=1), copper(8, seed=2)
    raw = backend.new_ensemble(spec, 1, seed=0).eval()
    fitted = backend.new_member(spec, labels, seed=0).eval()
    batch = build_batch(test, spec["cutoff"], "cpu", True)
    out_raw, out_fitted = raw(batch), fitted(batch)
    n_atoms = batch.n_atoms.double()
    error_raw = ((out_raw["energy"][0].double() - batch.energy) / n_atoms).abs().mean()
    error_fitted = ((out_fitted["energy"][0].double() - batch.energy) / n_atoms).abs().mean()
    assert error_raw > 0.5, f"PBE and EMT differ by eV per atom (raw {error_raw:.3f})"
    assert error_fitted < 0.02 * error_raw, (float(error_raw), float(error_fitted))
    torch.testing.assert_close(out_raw["forces"], out_fitted["forces"])


def test_stress_is_the_strain_derivative_of_the_energy(spec):
    """ASE's sign: sigma = (1/V) dE/d(strain), checked by central differences (in
    float32, SevenNet's precision: steps of 1e-3, agreement to 1e-4 eV/Å³, against
    stresses of about 2e-2)."""
    backend = registry.backend("sevennet")
    model = backend.new_ensemble(spec, 1, seed=0).eval()
    atoms = copper(1, seed=3)[0]
    stress = model(build_batch([atoms], 5.0, "cpu", False), compute_stress=True)["stress"][0, 0]
    h, numeric = 1e-3, np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            energies = []
            for sign in (1, -1):
                strained = atoms.copy()
                eps = np.eye(3)
                eps[i, j] += sign * h / 2
                eps[j, i] += sign * h / 2
                strained.set_cell(atoms.cell @ eps, scale_atoms=True)
                batch = build_batch([strained], 5.0, "cpu", False)
                energies.append(float(model(batch)["energy"][0, 0]))
            numeric[i, j] = (energies[0] - energies[1]) / (2 * h) / atoms.get_volume()
    assert np.abs(numeric).max() > 5e-3
    np.testing.assert_allclose(stress.numpy(), numeric, atol=1e-4)


@pytest.fixture(scope="module")
def version_1(spec, tmp_path_factory):
    """Two members, one training task each on 6 labels, stacked as version 1."""
    folder = tmp_path_factory.mktemp("sevennet")
    write_dataset(folder / "train.npz", copper(6, seed=4))
    settings = TrainingSettings(
        min_task_s=0.0, batch_size=3, learning_rate=1e-3, stress_weight=1.0
    ).model_dump()
    results = [
        _train_member(
            k,
            str(folder / "train.npz"),
            None,
            str(folder / f"m{k}.pt"),
            spec,
            settings,
            seed=10 + k,
            n_epochs=1,
            device="cpu",
        )  # fmt: skip
        for k in range(2)
    ]
    stack_member_checkpoints(
        [r["checkpoint"] for r in results], str(folder / "ensemble.v00001.pt"), {}
    )
    return folder / "ensemble.v00001.pt", results


def test_members_disagree_from_version_1(version_1):
    """Each member's readout starts perturbed with its own seed and trains on its own
    resample: the committee's force spread is above zero where the data are thin."""
    path, results = version_1
    assert all(r["steps"] > 0 and np.isfinite(r["train_loss"]) for r in results)
    model, _ = load_checkpoint(path)
    frames = copper(4, seed=5, rattle=0.25)
    forces = model(build_batch(frames, 5.0, "cpu", False))["forces"]
    spread = float(forces.std(dim=0).norm(dim=-1).mean())
    assert spread > 1e-3, spread


def test_export_loads_in_sevennet_calculator_and_matches_the_mean(version_1):
    """Each member exports as a SevenNet checkpoint; SevenNetCalculator on the K files
    gives palflow's ensemble mean energy within 1e-5 eV and its mean forces."""
    from sevenn.calculator import SevenNetCalculator

    path, _ = version_1
    stem = str(path).removesuffix(".pt")
    files = [f"{stem}.member{k}.pth" for k in range(2)]
    model, _ = load_checkpoint(path)
    atoms = copper(1, seed=6)[0]
    ours = model(build_batch([atoms], 5.0, "cpu", False))
    energies, forces = [], []
    for file in files:
        frame = atoms.copy()
        frame.calc = SevenNetCalculator(file, device="cpu")
        energies.append(frame.get_potential_energy())
        forces.append(frame.get_forces())
    assert abs(np.mean(energies) - float(ours["energy"].mean())) < 1e-5
    np.testing.assert_allclose(np.mean(forces, axis=0), ours["forces"].mean(0).numpy(), atol=1e-5)


def test_freezing_the_readout_leaves_the_interactions_alone(spec):
    model = registry.backend("sevennet").new_ensemble(spec, 1, seed=0)
    every = model.trainable_parameters("all")
    readout = model.trainable_parameters("readout")
    last = model.trainable_parameters("last_interaction")
    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    assert count(readout) == 128 * 64 + 64, "SevenNet-0's two readout layers"
    assert count(readout) < count(last) < count(every)
    assert {id(p) for p in readout} <= {id(p) for p in last}


def sevennet_campaign(d, model_lines: str) -> list[str]:
    structure = d / "cu.xyz"
    copper(1)[0].write(structure)
    text = f'[system]\nstructure = "{structure}"\n[oracle]\n'
    text += 'calculator = "ase.calculators.emt:EMT"\n[model]\nname = "sevennet"\n'
    return ["--campaign", write(d / "c.toml", text + model_lines)]


@pytest.mark.parametrize(
    ("model_lines", "message"),
    [
        ('foundation = "7net-9"\n', "is neither a model of the sevenn package"),
        ('foundation = "notes.txt"\n', "is not a SevenNet checkpoint"),
        ("n_layers = 3\n", "n_layers"),
    ],
)
def test_bad_foundation_is_one_line_and_exit_2(tmp_path, model_lines, message):
    (tmp_path / "notes.txt").write_text("not a model\n")
    args = sevennet_campaign(tmp_path, model_lines)
    result = run_cli("--site", "threads.py", *args, "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 4
    assert not (tmp_path / "run").exists()


def test_an_element_the_foundation_lacks_is_refused(spec):
    from ase import Atoms

    backend = registry.backend("sevennet")
    with pytest.raises(ModelError, match="Og are not in the SevenNet foundation"):
        backend.check(backend.settings(), Atoms("CuOg", positions=[[0, 0, 0], [0, 0, 2.5]]))


@pytest.mark.slow
def test_campaign_starts_from_the_foundation_as_version_0(tmp_path):
    """examples/cu_sevennet.toml, small: the untrained foundation is published as
    version 0 (its energy reference refitted), drives the first MD segments before any
    member has trained, and its held-out error is the first row of metrics."""
    import json

    from palflow.pipeline.config.settings import load_campaign
    from tests.test_mace import EXAMPLES, metrics, run_on_threads

    campaign = load_campaign(
        EXAMPLES / "cu_sevennet.toml",
        model__n_members=2,
        initial__n_structures=4,
        test__n_structures=6,
        generator__steps_per_task=10,
        training__min_task_s=0.0,
        training__epochs_per_task=1,
        stop__max_labels=2,
        stop__max_wall_s=240.0,
        stop__final_training_s=0.0,
    )
    run, summary = run_on_threads(tmp_path, campaign)

    assert (run.root / "models" / "ensemble.v00000.pt").is_file()
    assert (run.root / "models" / "ensemble.v00000.member1.pth").is_file()
    rows = metrics(run)
    assert rows[0]["version"] == 0 and rows[0]["force_mae"] > 0
    events = [json.loads(line) for line in (run.root / "events.jsonl").read_text().splitlines()]
    first_md = min(e["submitted"] for e in events if e["kind"] == "generate")
    first_trained = min(e["returned"] for e in events if e["kind"] == "train")
    assert first_md < first_trained, "version 0 drives the first walkers"
    state = json.loads((run.root / "state.json").read_text())
    assert [v["number"] for v in state["versions"]][:2] == [0, 1]
    assert summary["versions"] == state["versions"][-1]["number"]
