"""Generators by name: MD at constant pressure, rattling, a user's plug-in; and the
barostat checked against ASE's own NPT dynamics."""

from pathlib import Path

import numpy as np
import pytest
from ase import units
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.io import read, write

from palflow.apps.common import draw_velocities
from palflow.apps.data.dataset import read_arrays, write_dataset
from palflow.apps.generator import BatchedDynamics, _generate, resolve_generator
from palflow.apps.oracles.calculators import label_structure
from palflow.pipeline.config.sections import GeneratorSettings
from tests.test_coordinator import run_campaign, small_campaign

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BOND_STRETCH = str(EXAMPLES / "plugins" / "bond_stretch.py") + ":generate"


def copper(tmp_path, name="cu.extxyz"):
    atoms = bulk("Cu", cubic=True).repeat(2)
    path = tmp_path / name
    write(path, atoms)
    return str(path)


def generate(tmp_path, kind, ensemble_path, start_paths, labelled_path=None, **settings):
    settings = {"steps_per_task": 20, "sample_interval": 5, "max_force_disagreement": 1e9,
                **settings}  # fmt: skip
    settings = GeneratorSettings(**settings).model_dump()
    if labelled_path:
        settings["labelled_path"] = labelled_path
    n = len(start_paths)
    return _generate(
        kind,
        start_paths,
        ensemble_path,
        [str(tmp_path / f"frames{i}.npz") for i in range(n)],
        [str(tmp_path / f"last{i}.extxyz") for i in range(n)],
        settings,
        seed=7,
    )


# ------------------------------------------------------------------ MD at constant pressure
def test_md_at_constant_pressure_moves_the_cell_and_keeps_stress(tmp_path, ensemble_path):
    start = copper(tmp_path)
    result = generate(tmp_path, "md", ensemble_path, [start], pressure_bar=1.0,
                      compressibility_per_bar=1e-3, barostat_time_fs=20.0)  # fmt: skip
    (walker,) = result["walkers"]
    assert walker["n_frames"] == 4 and not walker["blew_up"]
    last = read(walker["last_frame_path"])
    assert abs(last.get_volume() / read(start).get_volume() - 1) > 1e-4, "the cell moved"
    arrays = read_arrays(walker["output_path"])
    assert arrays["member_stress"].shape == (4, 3, 3, 3)
    volumes = np.abs(np.linalg.det(arrays["cells"]))
    assert len(set(np.round(volumes, 6))) > 1, "frames record the changing cell"


def test_constant_volume_md_keeps_the_cell(tmp_path, ensemble_path):
    start = copper(tmp_path)
    (walker,) = generate(tmp_path, "md", ensemble_path, [start])["walkers"]
    assert read(walker["last_frame_path"]).get_volume() == pytest.approx(
        read(start).get_volume(), rel=1e-12
    )


def test_constant_pressure_refuses_a_walker_without_a_cell(tmp_path, ensemble_path):
    write(tmp_path / "water.extxyz", molecule("H2O"))
    with pytest.raises(ValueError, match="no cell periodic in all directions"):
        generate(tmp_path, "md", ensemble_path, [str(tmp_path / "water.extxyz")],
                 pressure_bar=1.0)  # fmt: skip


# ------------------------------------------------------------------------ rattle
def test_rattle_perturbs_the_start_and_the_labelled_structures(tmp_path, ensemble_path):
    start = copper(tmp_path)
    far = bulk("Cu", cubic=True).repeat(2)
    far.set_cell(far.cell * 1.1, scale_atoms=True)  # labelled, far from the start
    write_dataset(tmp_path / "labelled.npz", [label_structure(far, EMT(), 100.0)])
    result = generate(tmp_path, "rattle", ensemble_path, [start, start], steps_per_task=40,
                      labelled_path=str(tmp_path / "labelled.npz"))  # fmt: skip
    assert [w["n_frames"] for w in result["walkers"]] == [8, 8]
    arrays = read_arrays(result["walkers"][0]["output_path"])
    volumes = np.abs(np.linalg.det(arrays["cells"])) / read(start).get_volume()
    near, far_ones = volumes[volumes < 1.15], volumes[volumes > 1.2]
    assert len(near) and len(far_ones), f"frames around both structures: {volumes}"
    assert np.abs(near - 1).max() < 0.1 and np.std(near) > 1e-4, "strained cells"
    assert arrays["member_stress"].shape == (8, 3, 3, 3)
    assert read(result["walkers"][0]["last_frame_path"]).get_volume() == pytest.approx(
        read(start).get_volume()
    ), "rattling does not drift"


# ------------------------------------------------------------------------- plug-ins
def test_a_plugin_generator_is_named_by_file(tmp_path, ensemble_path):
    write(tmp_path / "ethanol.extxyz", molecule("CH3CH2OH"))
    assert callable(resolve_generator(BOND_STRETCH))
    result = generate(tmp_path, BOND_STRETCH, ensemble_path, [str(tmp_path / "ethanol.extxyz")])
    (walker,) = result["walkers"]
    assert walker["n_frames"] == 4 and len(walker["force_disagreement"]) == 4
    frames = read_arrays(walker["output_path"])
    assert frames["member_forces"].shape == (4, 3, 9, 3)


@pytest.mark.parametrize("kind", ["rattle", BOND_STRETCH], ids=["rattle", "plug-in"])
def test_a_campaign_learns_with_another_generator(tmp_path, kind):
    campaign = small_campaign(generator__kind=kind)
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["labels"] >= 24, summary["stop_reason"]
    # It learns: the best of the last three versions beats the first (one version's
    # error moves by up to half from the next in so short a run).
    mae = [e["force_mae"] for e in summary["test_errors"]]
    assert min(mae[-3:]) < mae[0], mae


# ----------------------------------------------------- the barostat against ASE's NPT
def block_error(values: np.ndarray, blocks: int = 8) -> float:
    """Standard error of the mean from ``blocks`` block averages."""
    size = len(values) // blocks
    means = [values[i * size : (i + 1) * size].mean() for i in range(blocks)]
    return float(np.std(means, ddof=1) / np.sqrt(blocks))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_constant_pressure_matches_ases_npt_on_emt_copper():
    """Bulk copper, EMT, 300 K, 1 atm: the mean volume per atom of palflow's barostat
    (stochastic cell rescaling) and of ASE's isotropic MTK NPT agree within their
    statistical errors (three combined standard errors)."""
    from ase.md.nose_hoover_chain import IsotropicMTKNPT

    steps, equilibration, every = 3000, 500, 5
    settings = GeneratorSettings(
        timestep_fs=2.0, temperature_K=300.0, friction=0.01, pressure_bar=1.01325,
        barostat_time_fs=100.0, compressibility_per_bar=7e-7,
    ).model_dump()  # fmt: skip

    def start(seed):
        atoms = bulk("Cu", cubic=True).repeat(3)
        draw_velocities(atoms, 300.0, np.random.default_rng(seed))
        return atoms

    ours = start(0)
    dynamics = BatchedDynamics(EMT(), [ours], settings, np.random.default_rng(1))
    theirs = start(2)
    theirs.calc = EMT()
    reference = IsotropicMTKNPT(theirs, 2 * units.fs, temperature_K=300.0,
                                pressure_au=1.01325 * units.bar, tdamp=100 * units.fs,
                                pdamp=500 * units.fs)  # fmt: skip
    volumes = {"palflow": [], "ase": []}
    for step in range(steps):
        dynamics.step([0])
        reference.run(1)
        if step >= equilibration and step % every == 0:
            volumes["palflow"].append(ours.get_volume() / len(ours))
            volumes["ase"].append(theirs.get_volume() / len(theirs))
    mean = {k: np.mean(v) for k, v in volumes.items()}
    error = np.hypot(*(block_error(np.asarray(v)) for v in volumes.values()))
    print(f"mean volume per atom (Å³): {mean}, combined standard error {error:.4f}")
    assert abs(mean["palflow"] - mean["ase"]) < 3 * error, (mean, error)
    assert error < 0.003 * mean["ase"], "the runs are long enough to mean something"


# ---------------------------------------------------------------- the water example
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_water_example_runs_at_constant_pressure_with_stress(tmp_path):
    """examples/water_tblite.toml, cut short, end to end: periodic GFN1-xTB labels
    with stress, a committee trained on them, NPT walkers."""
    pytest.importorskip("tblite", reason="tblite is not installed")
    from ase.db import connect

    from palflow.pipeline.config.settings import load_campaign

    campaign = load_campaign(
        EXAMPLES / "water_tblite.toml",
        stop__max_labels=8,
        stop__final_training_s=0.0,
        initial__n_structures=4,
        test__n_structures=4,
        test__md_stride=2,
        training__min_task_s=0.5,
        model__n_features=16,
        model__n_interactions=2,
        generator__steps_per_task=20,
        generator__n_walkers=2,
        # In-process: this test's process has OpenMP running (torch, and tblite for the
        # held-out MD), and a forked child of it can hang in OpenMP. The sites set
        # OMP_NUM_THREADS=1 before anything starts, which is what keeps them safe.
        oracle__isolate=False,
    )
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["labels"] == 8 and summary["oracle_failures"] == 0
    rows = list(connect(run.labels_db).select())
    assert all("stress" in row.toatoms().calc.results for row in rows), "stress is stored"
    cells = {round(row.toatoms().get_volume(), 3) for row in rows if row.source == "active"}
    assert len(cells) > 1, "the walkers' cells moved at constant pressure"
    assert summary["test_force_mae"], "the held-out set was evaluated"
    assert summary["test_errors"][-1]["stress_mae"] > 0, "and its stress error measured"
