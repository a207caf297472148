"""Oracles that fail at a set rate, in every way they fail: the run completes clean."""

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.db import connect
from ase.io import write

from palflow.apps.data.dataset import write_dataset
from palflow.apps.oracle import _label_batch
from palflow.apps.oracles.fault_injection import FaultyCalculator
from palflow.pipeline.state.structures import load_start_structure
from tests.test_coordinator import EXAMPLES, run_campaign, small_campaign

ALL_KINDS = ["exception", "hang", "nan", "absurd", "crash", "scf"]


def held_out_file(tmp_path, n=6):
    """A clean, EMT-labelled held-out set, so faults hit only the active learning."""
    start = load_start_structure(str(EXAMPLES / "structures" / "cu13.xyz"))
    frames = []
    for seed in range(n):
        atoms = start.copy()
        atoms.rattle(0.1, seed=seed)
        atoms.calc = EMT()
        atoms.get_forces()
        frames.append(atoms)
    path = tmp_path / "held_out.extxyz"
    write(path, frames)
    return str(path)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_each_fault_kind_is_recorded_with_its_kind(tmp_path, kind):
    from ase.build import bulk

    structures = []
    for seed in range(3):
        atoms = bulk("Cu", cubic=True)
        atoms.rattle(0.05, seed=seed)
        structures.append(atoms)
    write_dataset(tmp_path / "in.npz", structures, extra={"candidate_id": np.arange(3)})
    spec = {
        "calculator": "palflow.apps.oracles.fault_injection:FaultyCalculator",
        "kwargs": {"rate": 1.0, "kinds": [kind], "hang_s": 60},
    }
    result = _label_batch(
        str(tmp_path / "in.npz"),
        str(tmp_path / "out.npz"),
        spec,
        str(tmp_path / "scratch"),
        max_force=50.0,
        timeout_s=2.0,
        isolate=True,
    )
    expected = {
        "exception": "error",
        "hang": "timeout",
        "crash": "crash",
        "nan": "non-finite",
        "absurd": "absurd-force",
        "scf": "scf",
    }[kind]
    assert result["n_ok"] == 0
    assert [reason.split(":")[0] for _, reason in result["failures"]] == [expected] * 3


def test_structural_faults_repeat_and_transient_ones_do_not():
    from ase.build import bulk

    atoms = bulk("Cu", cubic=True)
    structural = FaultyCalculator(rate=0.5, kinds=["scf"], seed=3)
    outcomes = set()
    for _ in range(4):
        try:
            probe = atoms.copy()
            probe.calc = structural
            probe.get_potential_energy()
            outcomes.add("ok")
        except Exception as error:
            outcomes.add(type(error).__name__)
    assert len(outcomes) == 1, "an SCF failure belongs to the structure"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_campaign_completes_through_30_percent_faults_with_no_bad_label(tmp_path):
    campaign = small_campaign(
        oracle__calculator="palflow.apps.oracles.fault_injection:FaultyCalculator",
        oracle__kwargs={"rate": 0.3, "kinds": ALL_KINDS, "hang_s": 120},
        oracle__timeout_s=2.0,
        oracle__max_attempts=3,
        test__file=held_out_file(tmp_path),
    )
    run, summary = run_campaign(tmp_path, campaign)
    assert summary["stop_reason"] == "label budget of 24 reached"
    assert summary["labels"] == 24
    # Faults happened and were handled: retried, or recorded for good. (Which kinds a
    # short run meets is chance; each kind on its own is tested above.)
    kinds = {"error", "timeout", "crash", "non-finite", "absurd-force", "scf", "task-lost"}
    retried, failed = summary["oracle_retries_by_kind"], summary["oracle_failures_by_kind"]
    assert sum(retried.values()) > 0 and sum(failed.values()) > 0
    assert set(retried) | set(failed) <= kinds
    # Deterministic failures are never retried.
    assert not {"non-finite", "absurd-force", "scf"} & set(retried)
    # No bad label reached the data: every stored label is EMT's own answer.
    for row in connect(run.labels_db).select():
        atoms = row.toatoms()
        reference = atoms.copy()
        reference.calc = EMT()
        np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-8)
