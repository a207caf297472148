"""MPI oracles: ranks of one task see each other; NWChem DFT labels on 2 ranks."""

import importlib.util
import shutil

import numpy as np
import pytest
from ase.build import molecule

from palflow.apps.data.dataset import read_dataset, write_dataset
from palflow.apps.mpi_check import _mpi_ranks_check
from palflow.apps.oracle import _label_batch
from tests.conftest import need

pytestmark = pytest.mark.mpi

# Open MPI refuses root and more ranks than cores unless told; test machines are both.
OPEN_MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


@pytest.fixture(autouse=True)
def mpi_environment(monkeypatch):
    need("mpi", shutil.which("mpiexec") is not None, "mpiexec is not installed")
    # Only look: importing mpi4py here would make ASE initialise MPI in this process,
    # and mpiexec refuses to start from inside an MPI singleton.
    need("mpi", importlib.util.find_spec("mpi4py") is not None, "mpi4py is not installed")
    for key, value in OPEN_MPI_ENV.items():
        monkeypatch.setenv(key, value)


def assert_ranks_talked(report, size):
    assert sorted(r["rank"] for r in report) == list(range(size))
    for record in report:
        assert record["size"] == size
        assert record["token_from"] == (record["rank"] - 1) % size
        assert record["rank_sum"] == size * (size - 1) // 2


def test_ranks_of_one_task_see_each_other():
    result = _mpi_ranks_check(2)
    assert_ranks_talked(result["ranks"], 2)
    assert result["command"].startswith("mpiexec -n 2")


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_ranks_of_one_task_meet_inside_a_slurm_job(tmp_path, slurm_cluster):
    """local_slurm.py's MPIExecutor: the resource specification asks for 2 ranks,
    Parsl's MPI mode composes an srun step inside the oracle's pilot job."""
    import parsl
    from parsl.config import Config

    from palflow import apps
    from palflow.pipeline.config.sites import load_site

    site = load_site("local_slurm.py")
    oracle = next(e for e in site.config.executors if e.label == "oracle")
    config = Config(executors=[oracle], run_dir=str(tmp_path / "runinfo"), usage_tracking=0)
    with parsl.load(config):
        future = apps.mpi_ranks_check(
            2, parsl_resource_specification=site.oracle_resources(ranks=2, nodes=1)
        )
        result = future.result(timeout=240)
    assert result["command"].startswith("srun --ntasks 2")
    assert result["slurm_partition"] == "cpu" and result["slurm_job_id"]
    assert_ranks_talked(result["ranks"], 2)


def nwchem_spec():
    """The oracle of examples/water_nwchem.toml, launched with plain mpiexec."""
    from palflow.pipeline.config.settings import load_campaign
    from tests.test_coordinator import EXAMPLES

    oracle = load_campaign(EXAMPLES / "water_nwchem.toml").oracle
    return {
        "calculator": oracle.calculator,
        "kwargs": oracle.kwargs,
        "mpi_command": "mpiexec -n {ranks}",
    }


@pytest.mark.timeout(180)
def test_nwchem_labels_water_the_same_on_one_and_two_ranks(tmp_path):
    need("mpi", shutil.which("nwchem") is not None, "nwchem is not installed")
    water = molecule("H2O")
    write_dataset(tmp_path / "in.npz", [water])
    energies = {}
    for ranks in (1, 2):
        spec = {**nwchem_spec(), "mpi_ranks": ranks}
        out = tmp_path / f"out{ranks}.npz"
        result = _label_batch(
            str(tmp_path / "in.npz"),
            str(out),
            spec,
            str(tmp_path / f"scratch{ranks}"),
            max_force=50.0,
            timeout_s=0.0,
            isolate=True,
        )
        assert result["n_ok"] == 1, result["failures"]
        labelled = read_dataset(out)[0]
        energies[ranks] = labelled.get_potential_energy()
        forces = labelled.get_forces()
        assert np.all(np.isfinite(forces))
        # Symmetric water: the two hydrogens feel mirror-image forces.
        assert abs(forces[1, 0] + forces[2, 0]) < 1e-3
    # PBE/3-21G water sits near -2065 eV; 2 ranks give the 1-rank answer.
    assert -2070 < energies[1] < -2060
    assert energies[2] == pytest.approx(energies[1], abs=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_water_dft_example_campaign_runs_on_two_ranks(tmp_path):
    """examples/water_nwchem.toml, cut short, end to end with NWChem on 2 ranks."""
    need("mpi", shutil.which("nwchem") is not None, "nwchem is not installed")
    from palflow.pipeline.config.settings import load_campaign
    from tests.test_coordinator import EXAMPLES, run_campaign

    campaign = load_campaign(
        EXAMPLES / "water_nwchem.toml",
        stop__max_labels=4,
        stop__final_training_s=0.0,
        initial__n_structures=4,
        test__n_structures=2,
        test__md_stride=2,
        training__min_task_s=0.5,
        model__n_features=16,
        model__n_interactions=2,
    )
    assert campaign.oracle.mpi_ranks == 2
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["labels"] == 4 and summary["initial_labels"] == 4
    assert summary["oracle_failures"] == 0
    assert summary["test_force_mae"], "the DFT-labelled held-out set was evaluated"
    labels = [e for e in run.read_events() if e["kind"] == "label"]
    assert len(labels) >= 4 and all(e["ok"] for e in labels)
