"""A run directory of fixed labels, made through the campaign state's own
``add_labels``, and its ``palflow export``: the same code runs on this version and
on the version before the label log, which wrote ``tests/data/export_labels.extxyz``::

    git archive 4c36776 | tar -x -C BEFORE/palflow
    PYTHONPATH=BEFORE python tests/export_run_fixture.py tests/data/export_labels.extxyz

(``BEFORE`` holds the old tree as ``palflow``; ``import palflow.pipeline.state.labels``
then names a file under it.)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def exported_labels(work: Path) -> str:
    """Make the run in ``work``, export it, and return its ``labels.extxyz``."""
    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read

    from palflow.pipeline.config.settings import load_campaign
    from palflow.pipeline.state.campaign_state import CampaignState
    from palflow.pipeline.state.export import export_run
    from palflow.pipeline.state.rundir import RunDirectory

    campaign = load_campaign(ROOT / "examples" / "cu_emt.toml")
    start = read(ROOT / "examples" / "structures" / "cu13.xyz")
    run = RunDirectory.create(work / "run", campaign.model_dump())
    state = CampaignState.new(campaign, run, start)
    rng = np.random.default_rng(29)
    for batch in range(5):
        frames, metadata = [], []
        for k in range(4):
            atoms = start.copy()
            atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
            atoms.calc = SinglePointCalculator(
                atoms, energy=float(rng.normal()), forces=rng.normal(size=(len(atoms), 3))
            )
            frames.append(atoms)
            candidate = 4 * batch + k + 1
            metadata.append(
                {
                    "candidate_id": candidate,
                    "source": "initial" if batch == 0 else "active",
                    "oracle_task": batch,
                    "scored_version": batch,
                    "system": "",
                    "predicted_force_disagreement": float(candidate) / 10,
                }
            )
        state.add_labels(frames, metadata)
    export_run(run.root, work / "export")
    return (work / "export" / "labels.extxyz").read_text()


if __name__ == "__main__":
    work = Path(tempfile.mkdtemp())
    try:
        Path(sys.argv[1]).write_text(exported_labels(work))
    finally:
        shutil.rmtree(work)
