"""What the run report reads from a run directory, read once (:class:`RunData`);
:mod:`palflow.pipeline.observe.figures` draws from it and
:mod:`palflow.pipeline.observe.report` writes the page."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from palflow.apps.contracts import failure_counts
from palflow.pipeline.state.rundir import (
    CAMPAIGN_FILE,
    FAILURE_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    RunDirectory,
    is_run_directory,
)

logger = logging.getLogger(__name__)


def _number(value: Any, missing: float | None = None) -> float | None:
    return missing if value is None else float(value)


def _milli(value: Any) -> float | None:
    """eV to meV, None kept."""
    return None if value is None else 1e3 * float(value)


def run_status(root: str | Path) -> str:
    """``running`` (a coordinator holds the lock), ``finished`` (it reached a stop),
    ``failed`` (it stopped as failed, or raised: :func:`run_outcome` says why) or
    ``stopped early`` (no summary: killed or crashed).

    The lock comes first: a finished run that was resumed keeps its old summary until
    the resume writes its own. ``palflow run`` releases the lock before it builds the
    final report, so that report says how the run ended.
    """
    return run_outcome(root)[0]


def run_outcome(root: str | Path) -> tuple[str, str | None]:
    """The state of :func:`run_status` and, once the run has ended, its whole reason:
    the stop reason of a finished run, the failure of a failed one."""
    run = RunDirectory(root)
    if run.is_locked():
        return "running", None
    crash = run.read_json(FAILURE_FILE)  # the last session raised, with or without a summary
    if crash:
        return "failed", crash.get("failure")
    summary = run.read_json(SUMMARY_FILE)  # a resume removes its predecessor's
    if summary:
        if summary.get("failed"):
            return "failed", summary.get("failure") or summary.get("stop_reason")
        return "finished", summary.get("stop_reason")
    return "stopped early (no summary: killed or crashed; resume with --resume)", None


class RunData:
    """What the report needs, read once from a run directory."""

    def __init__(self, root: str | Path) -> None:
        if not is_run_directory(root):
            raise FileNotFoundError(f"{root} is not a palflow run directory")
        self.run = RunDirectory(root)  # reading only: no lock
        self.root = self.run.root
        self.campaign = self.run.read_json(CAMPAIGN_FILE) or {}
        self.summary = self.run.read_json(SUMMARY_FILE)
        self.state = self.run.read_state()
        self.events = self.run.read_events()
        self.metrics = self.run.read_jsonl(METRICS_FILE) or self.state.get("test_errors", [])
        self.validation = self.run.read_json("validate.json")
        """The MD check's verdict (``palflow validate``), or None."""
        self.status, self.reason = run_outcome(self.root)
        """How the run stands (:func:`run_status`), and why it ended, whole."""
        timed = [e for e in self.events if e.get("submitted")]
        if self.summary:
            self.t0 = self.summary["started_at"]
        elif timed:
            self.t0 = min(e["submitted"] for e in timed)
        else:
            self.t0 = time.time()
        self.t1 = max([e.get("returned", self.t0) for e in self.events] or [self.t0])

    def learning_curve(self) -> list[dict[str, Any]]:
        """The ensemble versions that have a test or a validation error, oldest first,
        one dict each.

        Keys: ``version``, ``labels``, ``wall_s`` (NaN when not recorded), the test
        errors ``force_mae`` (eV/Å) and ``energy_mae`` (meV/atom), the validation
        errors ``val_force_mae`` and ``val_energy_mae`` (same units), ``held_back``
        (members whose newest state the gate rejected) and ``n_validation``. An error
        not recorded (older run directories, or a version the gate did not judge) is
        None.
        """
        points = []
        for index, row in enumerate(self.metrics):
            if row.get("force_mae") is None and row.get("val_force_mae") is None:
                continue
            points.append(
                {
                    "version": row.get("version", index),
                    "labels": row.get("labels", 0),
                    "wall_s": _number(row.get("wall_s"), np.nan),
                    "force_mae": row.get("force_mae"),
                    "energy_mae": _milli(row.get("energy_mae_per_atom")),
                    "val_force_mae": _number(row.get("val_force_mae")),
                    "val_energy_mae": _milli(row.get("val_energy_mae_per_atom")),
                    "held_back": row.get("held_back"),
                    "n_validation": row.get("n_validation"),
                }
            )
        return points

    @property
    def has_test_set(self) -> bool:
        """Whether the campaign labels a held-out set (older runs always did)."""
        test = self.campaign.get("test", {})
        return bool(test.get("file")) or test.get("n_structures", 1) > 0

    def recorded(self, field: str) -> bool:
        """Whether any row of ``metrics.jsonl`` carries ``field`` (even as null): the
        run was written by a pipeline that records it."""
        return any(field in row for row in self.metrics)

    @property
    def name(self) -> str:
        return self.campaign.get("name", self.root.name)

    @property
    def threshold(self) -> float | None:
        """The fixed selection threshold (eV/Å for the force measures), or None when
        the threshold moves with the run."""
        selection = self.campaign.get("selection", {})
        if selection.get("threshold_mode") != "fixed":
            return None
        return selection.get("threshold")

    def failures_by_kind(self) -> dict[str, int]:
        """Structures the oracle failed for good, by failure kind."""
        return failure_counts(self.state.get("task_failures", {}).values())

    def generator_frames(self) -> dict[int, list[float]]:
        """Force spread of every recorded MD frame, by the ensemble version that ran it."""
        by_version: dict[int, list[float]] = defaultdict(list)
        for _, path in self.run.walker_segments():
            try:
                with np.load(path) as data:
                    spread = data["force_disagreement"]
                    version = data["ensemble_version"] if "ensemble_version" in data else None
            except (OSError, ValueError, KeyError):
                continue  # a file being written, or torn by a crash
            if version is None or not len(spread):
                continue
            for v, s in zip(version.tolist(), spread.tolist(), strict=True):
                by_version[int(v)].append(float(s))
        return by_version

    def labelled_errors(self, limit: int = 400) -> tuple[np.ndarray, np.ndarray]:
        """For up to ``limit`` active labels: the force spread predicted when they were
        picked, and the true mean absolute force error of the ensemble that picked
        them (its checkpoint, against the oracle's forces)."""
        if not self.run.labels_db.exists():
            return np.zeros(0), np.zeros(0)
        with self.run.labels() as db:
            rows = [r for r in db.select(source="active") if "scored_version" in r.key_value_pairs]
        if not rows:
            return np.zeros(0), np.zeros(0)
        if len(rows) > limit:
            keep = np.random.default_rng(0).choice(len(rows), size=limit, replace=False)
            rows = [rows[i] for i in sorted(keep)]
        by_version: dict[int, list] = defaultdict(list)
        for row in rows:
            by_version[int(row.scored_version)].append(row)
        import torch

        from palflow.apps.models.calculator import predict_structures
        from palflow.apps.models.core import load_checkpoint

        torch.set_num_threads(1)
        predicted, errors = [], []
        for version, version_rows in by_version.items():
            checkpoint = self.run.ensemble(version)
            if not Path(checkpoint).exists():
                continue
            model, _ = load_checkpoint(checkpoint, device="cpu")
            structures = [row.toatoms() for row in version_rows]
            out = predict_structures(model, structures, device="cpu")
            for row, atoms, forces in zip(version_rows, structures, out["forces"], strict=True):
                predicted.append(row.predicted_force_disagreement)
                errors.append(float(np.abs(forces - atoms.get_forces()).mean()))
        return np.asarray(predicted), np.asarray(errors)
