"""``palflow validate RUN``: can the run's potential be used for production MD?

For each system of the campaign, the newest ensemble runs the MD of ``[validate]``
(NVE and NVT by default, 20 ps each) through :func:`palflow.apps.validate._validate_md`,
on the site's generator executor (``--site``) or in this process. A system passes
when every run lasts the whole duration without a failure and every NVE run's energy
drift stays within ``validate.max_drift_meV_per_atom_ps``. The verdict, per run and
per system, goes to ``RUN/validate.json`` (:data:`VALIDATE_FILE`), which the report
shows; the frames just before each failure go to ``validate/`` as extxyz, for an
oracle to label before a rerun.

The trust levels are compared with the ensemble's largest atomic force spread
(eV/Å). Where the campaign selects by that spread (``max_force_spread``), they are
its own: the lower one the selection threshold (with a calibrated threshold, the
spread at which the newest calibration expects ``calibration_target``), the upper
one ``selection.upper_threshold``. Otherwise there is no lower one, and the upper one
is the generator's hard cap ``generator.max_force_disagreement``, as it is wherever
``upper_threshold`` is 0.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from palflow.apps import plain
from palflow.apps.contracts import CalculatorSpec
from palflow.apps.data.dataset import read_arrays, read_dataset, write_dataset
from palflow.apps.oracles.calculators import OK
from palflow.pipeline.config.settings import Campaign, campaign_from_dict
from palflow.pipeline.state.rundir import (
    CAMPAIGN_FILE,
    METRICS_FILE,
    RunDirectory,
    RunDirectoryError,
)

logger = logging.getLogger(__name__)

VALIDATE_FILE = "validate.json"
"""The verdict of the MD check, in the run directory."""


def starts_of(run: RunDirectory, system: str, count: int) -> list[str]:
    """``count`` start structures of ``system``, its start configurations in turn."""
    homes = sorted(str(p) for p in run.root.glob(f"system/{system}.start[0-9][0-9][0-9].extxyz"))
    homes = homes or [run.start_structure]
    return [homes[i % len(homes)] for i in range(count)]


def trust_levels(
    campaign: Campaign, system_name: str, calibration: float | None = None
) -> tuple[float | None, float]:
    """The lower (None: none) and upper trust levels of the force spread, eV/Å (see the
    module's description); ``calibration`` is the run's newest, for a calibrated
    threshold."""
    selection, generator = campaign.selection, campaign.generator
    if selection.measure != "max_force_spread":  # the levels are in the measure's units
        return None, generator.max_force_disagreement
    system = campaign.system_named(system_name)
    lower = system.threshold or selection.threshold
    if selection.threshold_mode == "calibrated" and calibration:
        lower = selection.calibration_target / calibration
    elif selection.threshold_mode == "percentile":
        lower = None
    return lower, selection.upper_threshold or generator.max_force_disagreement


def md_settings(
    campaign: Campaign, system_name: str, calibration: float | None = None
) -> dict[str, Any]:
    """What :func:`palflow.apps.validate._validate_md` needs for one system."""
    check, generator = campaign.validate, campaign.generator
    system = campaign.system_named(system_name)
    lower, upper = trust_levels(campaign, system_name, calibration)
    temperature = (
        check.temperature_K or (system.temperatures_K or [None])[0] or generator.temperature_K
    )
    return {
        "duration_ps": check.duration_ps,
        "timestep_fs": check.timestep_fs,
        "temperature_K": temperature,
        "friction": generator.friction,
        "record_interval": check.record_interval,
        "min_distance": check.min_distance,
        "max_spread": upper,
        "lower_spread": lower,
    }


def calibration_row(run: RunDirectory, version: int) -> dict[str, Any] | None:
    """The row of ``metrics.jsonl`` with the newest calibration at or before
    ``version``, or None where the run fitted none."""
    rows = [
        r for r in run.read_jsonl(METRICS_FILE) if r.get("calibration") and r["version"] <= version
    ]
    return max(rows, key=lambda r: r["version"]) if rows else None


def newest_calibration(run: RunDirectory, version: int) -> float | None:
    """The calibration (force error per unit spread) at or before ``version``, or None."""
    row = calibration_row(run, version)
    return row["calibration"] if row else None


def judge(campaign: Campaign, system: str, results: list[dict[str, Any]]) -> list[str]:
    """Why ``system`` fails the check (empty when it passes), one reason per run."""
    limit = campaign.validate.max_drift_meV_per_atom_ps
    reasons = []
    for result in results:
        for index, run in enumerate(result["runs"]):
            name = f"{result['ensemble'].upper()} run {index}"
            if run["failure"]:
                reasons.append(
                    f"{name} failed at {run['time_to_failure_ps']:.2f} ps: {run['failure']}"
                )
            elif abs(run.get("drift_meV_per_atom_ps") or 0.0) > limit:
                reasons.append(
                    f"{name} drifts {run['drift_meV_per_atom_ps']:+.2f} meV/atom/ps "
                    f"(limit {limit:g})"
                )
    return reasons


def validate_run(
    root: str | Path,
    apps: Any = None,
    campaign: Campaign | None = None,
    version: int | None = None,
) -> dict[str, Any]:
    """Run the MD check on the newest ensemble of the run ``root``; write and return
    the verdict.

    Parameters
    ----------
    apps
        Where the tasks run: an object whose ``validate_md``, ``label_batch`` and
        ``evaluate_test`` submit those apps and return futures (:mod:`palflow.apps`,
        Parsl apps on the site's executors); None runs each here, one after another.
    campaign
        Settings to validate with; default the run's own (``campaign.json``).
    version
        The ensemble version to check; default the newest.

    Returns
    -------
    dict
        ``passed``, ``version`` (the ensemble checked), ``systems`` (per system:
        ``passed``, ``reasons``, the ``results`` of its runs and, with
        ``validate.label_frames``, the ``production`` error of the oracle-labelled
        frames), ``settings``, ``wall_s``.

    Raises
    ------
    RunDirectoryError
        When ``root`` is not a run directory or has no published ensemble; nothing is
        written then.
    """
    run = RunDirectory.open(root)
    ensembles = run.ensembles()
    if not ensembles:
        raise RunDirectoryError(
            f"{run.root} has no published ensemble to validate: run the campaign until "
            "it publishes one (models/ensemble.v*.pt)"
        )
    if version is not None and version not in dict(ensembles):
        raise RunDirectoryError(
            f"{run.root} has no ensemble version {version}: it has versions "
            f"{ensembles[0][0]} to {ensembles[-1][0]}"
        )
    campaign = campaign or campaign_from_dict(run.read_json(CAMPAIGN_FILE), str(run.root))
    version, checkpoint = (version, dict(ensembles)[version]) if version else ensembles[-1]
    calibration = newest_calibration(run, version)
    check = campaign.validate
    t0 = time.time()
    out = run.root / "validate"
    out.mkdir(exist_ok=True)
    pending: list[tuple[str, Any]] = []
    for system in campaign.all_systems():
        settings = md_settings(campaign, system.name, calibration)
        for ensemble in check.ensembles:
            stem = f"{system.name}.{ensemble}"
            kwargs = dict(
                ensemble_path=str(checkpoint),
                start_paths=starts_of(run, system.name, check.walkers),
                ensemble=ensemble,
                settings=settings,
                frames_path=str(out / f"{stem}.frames.extxyz"),
                failures_path=str(out / f"{stem}.failures.extxyz"),
                seed=check.seed * 1000 + len(pending),
            )
            logger.info(
                "validate: %s %s, %d walker(s), %g ps on ensemble v%d",
                system.name, ensemble.upper(), check.walkers, check.duration_ps, version,
            )  # fmt: skip
            pending.append((system.name, (apps or HERE).validate_md(**kwargs)))
    by_system: dict[str, list[dict[str, Any]]] = {}
    for system, future in pending:
        result = future.result()
        by_system.setdefault(system, []).append(result)
        logger.info(
            "validate: %s %s done: %s",
            system,
            result["ensemble"].upper(),
            "; ".join(_run_line(r) for r in result["runs"]),
        )
    systems = {}
    for name, results in by_system.items():
        reasons = judge(campaign, name, results)
        systems[name] = {"passed": not reasons, "reasons": reasons, "results": results}
        if check.label_frames:
            systems[name]["production"] = production_error(
                campaign, str(checkpoint), results, out / name, apps or HERE
            )
    verdict = {
        "passed": all(s["passed"] for s in systems.values()),
        "version": version,
        "ensemble_path": str(checkpoint.relative_to(run.root)),
        "systems": systems,
        "settings": check.model_dump(),
        "trust_levels": {
            name: dict(
                zip(("lower", "upper"), trust_levels(campaign, name, calibration), strict=True)
            )
            for name in systems
        },
        "wall_s": time.time() - t0,
    }
    partial = run.root / f".{VALIDATE_FILE}.tmp"
    partial.write_text(json.dumps(verdict, indent=1, default=float))
    partial.replace(run.root / VALIDATE_FILE)
    return verdict


def production_error(
    campaign: Campaign, checkpoint: str, results: list[dict], folder: Path, apps: Any
) -> dict[str, Any]:
    """Label ``validate.label_frames`` frames of the check's runs (evenly spaced over
    all that were recorded) with the campaign's oracle, and score the ensemble on them:
    the error in production, beside the test error. The oracle runs where the site
    runs it, as one task without the site's MPI resource specification: an MPI
    oracle labels these frames with one rank.

    Returns
    -------
    dict
        ``frames`` labelled, ``failed`` (the oracle could not label them), and the
        ensemble's ``force_mae`` (eV/Å) and ``energy_mae_per_atom`` (eV/atom) on them
        (None when none was labelled).
    """
    import numpy as np
    from ase.io import read

    frames = [
        atoms
        for result in results
        if Path(result["frames_path"]).stat().st_size
        for atoms in read(result["frames_path"], index=":")
    ]
    count = min(campaign.validate.label_frames, len(frames))
    picked = [frames[int(i)] for i in np.linspace(0, len(frames) - 1, count)] if count else []
    empty = {"frames": 0, "failed": 0, "force_mae": None, "energy_mae_per_atom": None}
    if not picked:
        return empty
    folder.mkdir(exist_ok=True)
    for atoms in picked:
        atoms.info = {}
    write_dataset(
        str(folder / "production.in.npz"), picked, extra={"candidate_id": np.arange(len(picked))}
    )
    oracle = campaign.oracle
    labelled = apps.label_batch(
        input_path=str(folder / "production.in.npz"),
        output_path=str(folder / "production.out.npz"),
        calculator_spec=CalculatorSpec.of(oracle).as_dict(),
        scratch_dir=str(folder / "scratch"),
        max_force=oracle.max_force,
        timeout_s=oracle.timeout_s,
        isolate=oracle.isolate,
    ).result()
    failed = len(labelled["failures"])
    if not labelled["n_ok"]:
        return {**empty, "failed": failed}
    # Only the frames the oracle labelled are scored (a failed one keeps no label).
    statuses = read_arrays(str(folder / "production.out.npz"))["status"]
    ok = [a for a, status in zip(read_dataset(str(folder / "production.out.npz")), statuses,
                                 strict=True) if str(status) == OK]  # fmt: skip
    write_dataset(str(folder / "production.labelled.npz"), ok)
    errors = apps.evaluate_test(
        ensemble_path=checkpoint, test_path=str(folder / "production.labelled.npz")
    ).result()
    return {
        "frames": labelled["n_ok"],
        "failed": failed,
        "force_mae": errors["force_mae"],
        "energy_mae_per_atom": errors["energy_mae_per_atom"],
    }


class _Done:
    """A finished future, for tasks run in this process."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


class _Here:
    """The apps :func:`validate_run` needs, run in this process."""

    def __getattr__(self, name: str) -> Callable[..., _Done]:
        function = plain(name)
        return lambda **kwargs: _Done(function(**kwargs))


HERE = _Here()


def _run_line(run: dict[str, Any]) -> str:
    if run["failure"]:
        return f"failed at {run['time_to_failure_ps']:.2f} ps ({run['failure']})"
    drift = run.get("drift_meV_per_atom_ps")
    return f"{run['simulated_ps']:.1f} ps" + (
        f", drift {drift:+.3f} meV/atom/ps" if drift is not None else ""
    )


def summary_lines(verdict: dict[str, Any]) -> list[str]:
    """One line per system: passed, or why not."""
    lines = []
    for name, system in verdict["systems"].items():
        if system["passed"]:
            runs = [r for result in system["results"] for r in result["runs"]]
            drifts = [abs(r["drift_meV_per_atom_ps"]) for r in runs if "drift_meV_per_atom_ps" in r]
            extra = f", largest NVE drift {max(drifts):.3f} meV/atom/ps" if drifts else ""
            duration = verdict["settings"]["duration_ps"]
            lines.append(f"{name}: passed ({len(runs)} runs, {duration:g} ps each{extra})")
        else:
            lines.append(f"{name}: FAILED: {'; '.join(system['reasons'])}")
        production = system.get("production") or {}
        if production.get("force_mae") is not None:
            lines[-1] += (
                f"; error on {production['frames']} oracle-labelled frames of the runs: "
                f"{production['force_mae']:.4f} eV/Å"
            )
    return lines
