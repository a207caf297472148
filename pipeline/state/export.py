"""``palflow export``: a run's labels and its held-out set as extxyz, and its newest
ensemble with the calibration of its spread (and, for MACE, its members as MACE model
files), in a new folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from palflow.apps.models import registry
from palflow.apps.models.backend import ModelBackend
from palflow.pipeline.engine.validation import calibration_row
from palflow.pipeline.state.rundir import CAMPAIGN_FILE, RunDirectory, RunDirectoryError

EXPORTED_LABELS = "labels.extxyz"
EXPORTED_TEST = "test.extxyz"
EXPORTED_ENSEMBLE = "ensemble.pt"
EXPORTED_MEMBER = "ensemble.member{k}.model"
"""A member of the exported version in its model's own format (MACE: a model file
that ``mace.calculators.MACECalculator(model_paths=[...])`` loads)."""
EXPORTED_README = "README.txt"


def export_run(root: str | Path, to: str | Path) -> dict[str, Any]:
    """Write a run's labels and held-out set as extxyz, and its newest ensemble, to the
    new folder ``to``.

    ``labels.extxyz`` holds every label with its energy (eV) and forces (eV/Å) three
    times over, so that trainers read it unchanged: ``REF_energy`` (info) and
    ``REF_forces`` (arrays), MACE's default keys since mace-torch 0.3.10; the
    calculator results ``energy``/``forces`` (what ASE's reader, and NequIP's ASE
    dataset, take); besides, ``config_type`` (``initial`` or ``active``) and
    ``candidate_id``. ``test.extxyz`` is the run's held-out set (``data/test.npz``),
    labelled the same way, ``config_type`` ``test`` (and ``system`` with several
    systems), when the run has one. ``ensemble.pt`` is the newest ensemble checkpoint,
    for :meth:`palflow.apps.models.calculator.EnsembleCalculator.from_checkpoint`;
    ``ensemble.member{k}.model`` are its members in their model's own format, where
    the run wrote them (a MACE run, beside each version's checkpoint).

    Returns
    -------
    dict
        ``labels`` (how many), ``labels_file``, ``ensemble_version`` and
        ``ensemble_file`` (None when no ensemble is published yet), ``model_files``
        (the members' model files, in member order; empty when the run wrote none),
        ``test_structures`` (how many; 0 without a held-out set) and ``test_file``
        (None without one), ``readme_file``.

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
    test_frames = held_out_frames(run)
    ensembles = run.ensembles()
    target.mkdir(parents=True, exist_ok=True)
    write(target / EXPORTED_LABELS, frames, format="extxyz")
    if test_frames:
        write(target / EXPORTED_TEST, test_frames, format="extxyz")
    version, calibration, model_files = None, None, []
    if ensembles:
        version, checkpoint = ensembles[-1]
        model_files = export_member_files(run, checkpoint, target)
        calibration = calibration_of(run, version)
        if calibration is None:
            shutil.copyfile(checkpoint, target / EXPORTED_ENSEMBLE)
        else:  # the calibration travels inside the checkpoint
            from palflow.apps.models.core import load_checkpoint, save_checkpoint

            model, extra = load_checkpoint(checkpoint)
            save_checkpoint(
                target / EXPORTED_ENSEMBLE, model, {**extra, "calibration": calibration}
            )
    readme = _readme(run, len(frames), version, calibration, len(model_files), len(test_frames))
    (target / EXPORTED_README).write_text(readme)
    return {
        "labels": len(frames),
        "labels_file": str(target / EXPORTED_LABELS),
        "ensemble_version": version,
        "ensemble_file": str(target / EXPORTED_ENSEMBLE) if version is not None else None,
        "model_files": model_files,
        "test_structures": len(test_frames),
        "test_file": str(target / EXPORTED_TEST) if test_frames else None,
        "readme_file": str(target / EXPORTED_README),
    }


def member_model_files(checkpoint: str | Path) -> list[Path]:
    """The members of the ensemble checkpoint ``checkpoint`` (``ensemble.vNNNNN.pt``) in
    their model's own format, as the run wrote them beside it
    (``ensemble.vNNNNN.member{k}.model``, :meth:`ModelBackend.export
    <palflow.apps.models.backend.ModelBackend.export>`), members 0, 1, ... up to the
    first one missing; empty for a model without its own format (SchNet)."""
    checkpoint = Path(checkpoint)
    stem = checkpoint.name.removesuffix(".pt")
    found = []
    while (checkpoint.parent / f"{stem}.member{len(found)}.model").is_file():
        found.append(checkpoint.parent / f"{stem}.member{len(found)}.model")
    return found


def export_member_files(run: RunDirectory, checkpoint: Path, target: Path) -> list[str]:
    """Write the members of ``checkpoint`` in their model's own format to ``target``
    as :data:`EXPORTED_MEMBER`: copies of the files the run wrote beside it, or, where
    some are missing (a run stopped while writing them), written again from the
    checkpoint by the model's backend. Returns their paths; empty for a model without
    its own format."""
    model = run.read_json(CAMPAIGN_FILE).get("model", {})
    found = member_model_files(checkpoint)
    if found and len(found) == model.get("n_members", len(found)):
        paths = [str(target / EXPORTED_MEMBER.format(k=k)) for k in range(len(found))]
        for source, path in zip(found, paths, strict=True):
            shutil.copyfile(source, path)
        return paths
    backend = registry.backend(model.get("name", registry.DEFAULT))
    if backend.export.__func__ is ModelBackend.export.__func__:
        return []  # no format of its own: ensemble.pt is the model
    from palflow.apps.models.core import load_checkpoint

    ensemble, _ = load_checkpoint(checkpoint)
    stem = EXPORTED_MEMBER.split(".member")[0]
    return backend.export(ensemble, str(target / stem))


def held_out_frames(run: RunDirectory) -> list:
    """The run's held-out set (``data/test.npz``) as ``Atoms`` with the keys of
    :func:`export_run`, ``config_type`` ``test``; empty when the run has none (yet)."""
    from palflow.apps.data.dataset import read_arrays, structures_from_arrays

    if not Path(run.test_set).is_file():
        return []
    arrays = read_arrays(run.test_set)
    systems = arrays.get("system")
    frames = []
    for index, atoms in enumerate(structures_from_arrays(arrays)):
        if atoms.calc is None:  # unlabelled: never kept in a held-out set, skipped
            continue
        _reference_keys(atoms)
        atoms.info["config_type"] = "test"
        if systems is not None:
            atoms.info["system"] = str(systems[index])
        frames.append(atoms)
    return frames


def _reference_keys(atoms) -> None:
    """Copy the calculator's energy, forces and stress to MACE's default keys."""
    results = atoms.calc.results
    atoms.info["REF_energy"] = float(results["energy"])
    atoms.arrays["REF_forces"] = results["forces"].copy()
    if "stress" in results:
        atoms.info["REF_stress"] = results["stress"].copy()


def calibration_of(run: RunDirectory, version: int) -> dict[str, Any] | None:
    """How the run calibrated ``version``'s spread (the newest fit at or before it):
    ``force_error_per_spread``, the ``version`` it was fitted at, and the validation
    ``frames`` it was fitted on (None where ``metrics.jsonl`` does not count them: under
    5 are not grouped by spread there); None when the run fitted none."""
    row = calibration_row(run, version)
    if row is None:
        return None
    groups = row.get("reliability_validation")
    return {
        "force_error_per_spread": float(row["calibration"]),
        "version": int(row["version"]),
        "frames": int(sum(group[2] for group in groups)) if groups else None,
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
        _reference_keys(atoms)
        atoms.info["config_type"] = row.get("source", "Default")
        atoms.info["candidate_id"] = int(row.get("candidate_id", row.id))
        frames.append(atoms)
    return frames


def _readme(
    run: RunDirectory,
    n_labels: int,
    version: int | None,
    calibration: dict | None = None,
    n_models: int = 0,
    n_test: int = 0,
) -> str:
    frames = (calibration or {}).get("frames") or "(under 5, or uncounted)"
    calibrated = (
        f"""  It also holds force_uncertainty (eV/Å), the structure's expected mean absolute
  force error: {calibration["force_error_per_spread"]:.3f} x force_disagreement. The factor is
  the median of error / spread over the run's {frames} validation frames
  (labels no member trained on; the held-out test set is never used), fitted at
  version {calibration["version"]}.
"""
        if calibration
        else "  No calibration was fitted (no validation labels), so no force_uncertainty.\n"
    )
    first, last = EXPORTED_MEMBER.format(k=0), EXPORTED_MEMBER.format(k=n_models - 1)
    models = (
        f"""
{EXPORTED_MEMBER.replace("{k}", "K")}, K = 0 to {n_models - 1}
  The {n_models} members of version {version}, each a standard MACE model file:
    from mace.calculators import MACECalculator
    atoms.calc = MACECalculator(model_paths=["{first}"], device="cpu")
  or all of them as a committee, model_paths=["{first}", ..., "{last}"]; or
  fine-tune from one (model.foundation = "{first}" in a palflow campaign, or
  mace_run_train --foundation_model {first} ...). They hold no calibration.
"""
        if n_models
        else ""
    )
    ensemble = (
        f"""{EXPORTED_ENSEMBLE}
  Ensemble version {version} of the run, an ASE calculator (energies eV, forces eV/Å):
    from palflow.apps.models.calculator import EnsembleCalculator
    atoms.calc = EnsembleCalculator.from_checkpoint("{EXPORTED_ENSEMBLE}", device="cpu")
  Its results also hold force_disagreement (eV/Å), the ensemble's spread.
{calibrated}{models}"""
        if version is not None
        else "No ensemble was published yet, so there is no checkpoint.\n"
    )
    test = (
        f"""{EXPORTED_TEST}
  The run's held-out set: {n_test} structures labelled by its oracle, never trained on,
  with the same keys as {EXPORTED_LABELS} (config_type is test; system names the
  system where the campaign has several). For a test error: mace_eval_configs, or
  ase.io.read("{EXPORTED_TEST}", ":") against the ensemble.
"""
        if n_test
        else "The run has no held-out set (yet), so there is no test file.\n"
    )
    return f"""Exported by palflow export from {run.root}

{EXPORTED_LABELS}
  {n_labels} labelled structures, extended XYZ (energies eV, forces eV/Å).
  MACE (mace-torch >= 0.3.10) reads it with its default keys, REF_energy and
  REF_forces: mace_run_train --train_file {EXPORTED_LABELS} ...
  NequIP's ASE dataset and ase.io.read take energy and forces from the calculator
  results written in the same file. config_type is initial or active; candidate_id
  is the structure's id in the run.

{test}
{ensemble}"""
