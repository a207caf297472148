"""CP2K as the oracle (``palflow.apps.oracles.cp2k.CP2KOracle``): labels through
palflow's oracle task match a direct ASE call, an SCF that does not converge is a
recorded ``scf`` failure and never a label, and bad CP2K input is refused before anything runs.

Marker ``dft``: needs Debian's ``cp2k`` (``.ci/setup.sh --system`` installs it); in
CI these fail rather than skip."""

import numpy as np
import pytest
from ase.io import read

from palflow.apps.data.dataset import read_arrays, read_dataset, write_dataset
from palflow.apps.oracle import _label_batch
from tests.test_bad_input import write

pytestmark = pytest.mark.dft

WATER8 = "examples/structures/water8.xyz"
SETTINGS = dict(max_force=50.0, timeout_s=0.0, isolate=False)


def water_boxes(n: int) -> list:
    """The 8-water box, then rattled copies of it."""
    box = read(WATER8)
    rng = np.random.default_rng(0)
    out = [box]
    for _ in range(n - 1):
        copy = box.copy()
        copy.positions += rng.normal(0, 0.03, copy.positions.shape)
        out.append(copy)
    return out


def test_labels_through_the_oracle_task_match_a_direct_ase_call(tmp_path, monkeypatch):
    """Two boxes in one oracle task, one CP2K shell for both, closed at the task's end;
    the first box's energy, forces and stress match ASE's own CP2K calculator with
    the same settings."""
    import ase.calculators.cp2k as ase_cp2k
    from ase.calculators.cp2k import CP2K
    from ase.units import Rydberg

    shells = []

    class CountedShell(ase_cp2k.Cp2kShell):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            shells.append(self._child)  # the CP2K process

    boxes = water_boxes(2)
    write_dataset(tmp_path / "in.npz", boxes, extra={"candidate_id": np.array([7, 8])})
    spec = {"calculator": "palflow.apps.oracles.cp2k:CP2KOracle", "kwargs": {}}
    with monkeypatch.context() as patch:
        patch.setattr(ase_cp2k, "Cp2kShell", CountedShell)
        result = _label_batch(
            str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), spec, str(tmp_path / "s"),
            **SETTINGS,
        )  # fmt: skip
    assert result["n_ok"] == 2 and result["failures"] == []
    assert len(shells) == 1, "one CP2K shell serves the whole task"
    assert shells[0].wait(timeout=30) == 0, "closed at the task's end"

    labelled = read_dataset(tmp_path / "out.npz")
    stress = read_arrays(tmp_path / "out.npz")["stress"]
    direct = boxes[0].copy()
    direct.calc = CP2K(
        directory=str(tmp_path / "direct"), command="env OMP_NUM_THREADS=1 cp2k.psmp -s",
        xc="PBE", basis_set="DZVP-MOLOPT-SR-GTH", pseudo_potential="GTH-PBE",
        cutoff=400 * Rydberg, max_scf=50, print_level="LOW", stress_tensor=True,
    )  # fmt: skip
    try:
        energy, forces = direct.get_potential_energy(), direct.get_forces()
        direct_stress = direct.get_stress(voigt=False)
    finally:
        direct.calc.close()
    assert np.isfinite(labelled[0].get_potential_energy())
    assert abs(labelled[0].get_potential_energy() - energy) < 1e-6
    np.testing.assert_allclose(labelled[0].get_forces(), forces, atol=1e-6)
    assert np.isfinite(stress[0]).all() and np.abs(stress[0]).max() > 0
    np.testing.assert_allclose(stress[0], direct_stress, atol=1e-7)
    assert labelled[1].get_potential_energy() != labelled[0].get_potential_energy()


def test_an_unconverged_scf_is_a_recorded_scf_failure_not_a_label(tmp_path):
    write_dataset(tmp_path / "in.npz", water_boxes(1), extra={"candidate_id": np.array([3])})
    spec = {"calculator": "palflow.apps.oracles.cp2k:CP2KOracle", "kwargs": {"max_scf": 2}}
    result = _label_batch(
        str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), spec, str(tmp_path / "s"),
        **SETTINGS,
    )  # fmt: skip
    assert result["n_ok"] == 0
    [(candidate, reason)] = result["failures"]
    assert candidate == 3 and reason.startswith("scf"), reason
    assert "NOT converged" in reason
    assert np.isnan(read_arrays(tmp_path / "out.npz")["energy"]).all(), "never a label"
    kept = list((tmp_path / "s").rglob("*.out"))
    assert kept, "the failed task's CP2K output is kept for a post-mortem"


CP2K_CAMPAIGN = """
[system]
structure = "{structure}"
[oracle]
calculator = "palflow.apps.oracles.cp2k:CP2KOracle"
kwargs = {kwargs}
trial = false
"""


@pytest.mark.parametrize(
    "structure, kwargs, expected",
    [
        (WATER8, '{ executable = "cp2k.missing" }', "'cp2k.missing' is not on PATH"),
        (WATER8, '{ basis_set = "NO-SUCH-BASIS" }', "basis_set 'NO-SUCH-BASIS' has no entry"),
        (WATER8, '{ pseudo_potential = "GTH-PBE-q6" }', "no entry for H in GTH_POTENTIALS"),
        ("H2O", "{}", "CP2KOracle is periodic only"),
    ],
    ids=["binary missing", "unknown basis", "potential of the wrong valence", "no cell"],
)
def test_bad_cp2k_input_exits_2_before_anything_runs(tmp_path, structure, kwargs, expected):
    from pathlib import Path

    from tests.test_cli import run_cli

    if structure.endswith(".xyz"):
        structure = str(Path(structure).resolve())
    campaign = write(tmp_path / "c.toml", CP2K_CAMPAIGN.format(structure=structure, kwargs=kwargs))
    result = run_cli("--site", "threads.py", "--campaign", campaign, "--run-dir",
                     str(tmp_path / "run"))  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_examples_held_out_file_is_what_its_cp2k_settings_give(tmp_path):
    """examples/structures/water8_cp2k_test.extxyz was labelled once with the example's
    settings; labelling its first frame again through the oracle task with the
    example's kwargs (1 rank here, 2 there) gives the same energy, forces and stress,
    so the file and the campaign have not drifted apart."""
    from palflow.pipeline.config.settings import load_campaign
    from tests.test_coordinator import EXAMPLES

    oracle = load_campaign(EXAMPLES / "water_cp2k.toml").oracle
    stored = read(EXAMPLES / "structures" / "water8_cp2k_test.extxyz", index=":")
    assert len(stored) == 8
    write_dataset(tmp_path / "in.npz", stored[:1])
    spec = {"calculator": oracle.calculator, "kwargs": {**oracle.kwargs, "launcher": ""}}
    result = _label_batch(
        str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), spec, str(tmp_path / "s"),
        **SETTINGS,
    )  # fmt: skip
    assert result["n_ok"] == 1
    (again,) = read_dataset(tmp_path / "out.npz")
    assert abs(again.get_potential_energy() - stored[0].get_potential_energy()) < 1e-5
    np.testing.assert_allclose(again.get_forces(), stored[0].get_forces(), atol=1e-5)
    stress = read_arrays(tmp_path / "out.npz")["stress"][0]
    np.testing.assert_allclose(stress, stored[0].get_stress(voigt=False), atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_water_example_runs_end_to_end_on_two_mpi_ranks(tmp_path, monkeypatch):
    """examples/water_cp2k.toml, cut to a few labels: every oracle task on 2 MPI ranks
    of CP2K, labels with stress stored, the held-out set evaluated."""
    from ase.db import connect

    from palflow.pipeline.config.settings import load_campaign
    from tests.test_coordinator import EXAMPLES, run_campaign

    # What laptop.py sets for its workers: Open MPI as root, more ranks than cores.
    for name in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("OMPI_MCA_rmaps_base_oversubscribe", "1")
    campaign = load_campaign(
        EXAMPLES / "water_cp2k.toml",
        stop__max_labels=2,
        stop__final_training_s=0.0,
        initial__n_structures=2,
        model__n_features=16,
        model__n_interactions=2,
        generator__steps_per_task=10,
        generator__n_walkers=1,
        selection__threshold=0.0,  # take whatever comes: this is about the plumbing
        oracle__isolate=False,  # in-process, as in the water example test
    )
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["labels"] == 2, summary["stop_reason"]
    assert summary["oracle_failures"] == 0
    rows = list(connect(run.labels_db).select())
    assert len(rows) == 4
    assert all(np.isfinite(row.toatoms().calc.results["stress"]).all() for row in rows)
    assert summary["test_force_mae"], "the held-out set was evaluated"
    assert len(read_dataset(run.test_set)) == 8, "the example's labelled held-out file"
