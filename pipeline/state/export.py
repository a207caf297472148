"""``palflow export``: a run's labels as extxyz, and its newest ensemble with the
calibration of its spread, in a new folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from palflow.pipeline.engine.validation import calibration_row
from palflow.pipeline.state.rundir import RunDirectory, RunDirectoryError

EXPORTED_LABELS = "labels.extxyz"
EXPORTED_ENSEMBLE = "ensemble.pt"
EXPORTED_README = "README.txt"


def export_run(root: str | Path, to: str | Path) -> dict[str, Any]:
    """Write a run's labels as extxyz, and its newest ensemble, to the new folder ``to``.

    ``labels.extxyz`` holds every label with its energy (eV) and forces (eV/Å) three
    times over, so that trainers read it unchanged: ``REF_energy`` (info) and
    ``REF_forces`` (arrays), MACE's default keys since mace-torch 0.3.10; the
    calculator results ``energy``/``forces`` (what ASE's reader, and NequIP's ASE
    dataset, take); besides, ``config_type`` (``initial`` or ``active``) and
    ``candidate_id``. ``ensemble.pt`` is the newest ensemble checkpoint, for
    :meth:`palflow.apps.models.calculator.EnsembleCalculator.from_checkpoint`.

    Returns
    -------
    dict
        ``labels`` (how many), ``labels_file``, ``ensemble_version`` and
        ``ensemble_file`` (None when no ensemble is published yet), ``readme_file``.

    Raises
    ------
    RunDirectoryError
        When ``root`` is not a run, has no labels yet, or ``to`` exists and is not
        empty.
    """
    from ase.io import write

    run = RunDirectory.open(root)
    target = Path(to)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RunDirectoryError(f"{target} exists and is not empty: export to a new folder")
    frames = labelled_frames(run)
    if not frames:
        raise RunDirectoryError(f"{run.root} has no labels yet: export it once it has some")
    ensembles = run.ensembles()
    target.mkdir(parents=True, exist_ok=True)
    write(target / EXPORTED_LABELS, frames, format="extxyz")
    version, calibration = None, None
    if ensembles:
        version, checkpoint = ensembles[-1]
        calibration = calibration_of(run, version)
        if calibration is None:
            shutil.copyfile(checkpoint, target / EXPORTED_ENSEMBLE)
        else:  # the calibration travels inside the checkpoint
            from palflow.apps.models.core import load_checkpoint, save_checkpoint

            model, extra = load_checkpoint(checkpoint)
            save_checkpoint(
                target / EXPORTED_ENSEMBLE, model, {**extra, "calibration": calibration}
            )
    (target / EXPORTED_README).write_text(_readme(run, len(frames), version, calibration))
    return {
        "labels": len(frames),
        "labels_file": str(target / EXPORTED_LABELS),
        "ensemble_version": version,
        "ensemble_file": str(target / EXPORTED_ENSEMBLE) if version is not None else None,
        "readme_file": str(target / EXPORTED_README),
    }


def calibration_of(run: RunDirectory, version: int) -> dict[str, Any] | None:
    """How the run calibrated ``version``'s spread (the newest fit at or before it):
    ``force_error_per_spread``, the ``version`` it was fitted at, and the validation
    ``frames`` it was fitted on; None when the run fitted none."""
    row = calibration_row(run, version)
    if row is None:
        return None
    return {
        "force_error_per_spread": float(row["calibration"]),
        "version": int(row["version"]),
        "frames": int(sum(group[2] for group in row.get("reliability_validation") or [])),
        "fitted_on": "validation labels (never trained on, never the held-out set)",
    }


def labelled_frames(run: RunDirectory) -> list:
    """Every label of ``labels.db`` as ``Atoms`` with the keys of :func:`export_run`."""
    if not run.labels_db.exists() or run.labels_db.stat().st_size == 0:
        return []  # see count_labels: an empty file must not reach ASE
    with run.labels() as database:
        rows = list(database.select())
    frames = []
    for row in rows:
        atoms = row.toatoms()  # a SinglePointCalculator holds the oracle's results
        results = atoms.calc.results
        atoms.info["REF_energy"] = float(results["energy"])
        atoms.arrays["REF_forces"] = results["forces"].copy()
        if "stress" in results:
            atoms.info["REF_stress"] = results["stress"].copy()
        atoms.info["config_type"] = row.get("source", "Default")
        atoms.info["candidate_id"] = int(row.get("candidate_id", row.id))
        frames.append(atoms)
    return frames


def _readme(
    run: RunDirectory, n_labels: int, version: int | None, calibration: dict | None = None
) -> str:
    calibrated = (
        f"""  It also holds force_uncertainty (eV/Å), the structure's expected mean absolute
  force error: {calibration["force_error_per_spread"]:.3f} x force_disagreement. The factor is
  the median of error / spread over the run's {calibration["frames"]} validation frames
  (labels no member trained on; the held-out test set is never used), fitted at
  version {calibration["version"]}.
"""
        if calibration
        else "  No calibration was fitted (no validation labels), so no force_uncertainty.\n"
    )
    ensemble = (
        f"""{EXPORTED_ENSEMBLE}
  Ensemble version {version} of the run, an ASE calculator (energies eV, forces eV/Å):
    from palflow.apps.models.calculator import EnsembleCalculator
    atoms.calc = EnsembleCalculator.from_checkpoint("{EXPORTED_ENSEMBLE}", device="cpu")
  Its results also hold force_disagreement (eV/Å), the ensemble's spread.
{calibrated}"""
        if version is not None
        else "No ensemble was published yet, so there is no checkpoint.\n"
    )
    return f"""Exported by palflow export from {run.root}

{EXPORTED_LABELS}
  {n_labels} labelled structures, extended XYZ (energies eV, forces eV/Å).
  MACE (mace-torch >= 0.3.10) reads it with its default keys, REF_energy and
  REF_forces: mace_run_train --train_file {EXPORTED_LABELS} ...
  NequIP's ASE dataset and ase.io.read take energy and forces from the calculator
  results written in the same file. config_type is initial or active; candidate_id
  is the structure's id in the run.

{ensemble}"""
