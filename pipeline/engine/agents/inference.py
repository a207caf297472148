"""The inference agent: errors of each version, and re-scoring of the queue.

Each new ensemble version is evaluated on the held-out set (when the campaign has
one) and on the validation labels (when training keeps some); one row per version
goes to ``metrics.jsonl``, with the metrology plug-ins' measures, the exploration
ratios, and error against spread on both sets (:func:`reliability`). The calibrated
threshold is fitted on the validation labels only: the held-out set is never used
for anything but its report. The oracle queue is re-scored with a newer version
(PAL's dynamic oracle list): candidates no longer worth a label drop out, the rest
re-order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from palflow.apps.contracts import EvaluateRequest, ScoreRequest
from palflow.apps.data.dataset import read_arrays, read_dataset, write_dataset
from palflow.pipeline.engine.core import TaskRecord
from palflow.pipeline.policies.measures import EnsemblePrediction
from palflow.pipeline.policies.metrology import (
    evaluation_from_result,
    load_plugins,
    measure_version,
    spearman_rho,
)
from palflow.pipeline.resume.journal import candidate_arrays
from palflow.pipeline.state.records import Version
from palflow.pipeline.state.rundir import METRICS_FILE

logger = logging.getLogger(__name__)


@dataclass
class EvaluateTask(TaskRecord):
    kind = "evaluate"
    version: Version | None = None


@dataclass
class ScoreTask(TaskRecord):
    kind = "score"
    version: Version | None = None
    input_path: str = ""
    """The queue's candidates as sent, for measures that need their structures."""
    output_path: str = ""
    """Their scores; both files go once the result is used."""


class InferenceAgent:
    """Submits evaluations and re-scorings; records errors and re-orders the queue."""

    kinds = ("score", "evaluate")

    def __init__(self, context) -> None:
        self.context = context
        self.metrology = load_plugins(context.campaign.metrology.plugins)
        self._test_systems: tuple[np.ndarray, np.ndarray] | None = None
        """The held-out set's system per frame and atom counts, read once."""

    def submit_ready(self, stopping: bool) -> None:
        self.submit_evaluation()
        if not stopping:
            self.submit_rescore()

    def due(self, version: Version) -> bool:
        """Whether ``version`` still waits for its evaluation (and its row of metrics);
        with a held-out set, once that is labelled."""
        state = self.context.state
        ready = state.test_ready or not self.context.campaign.has_test_set
        return ready and state.evaluated_version < version.number

    def submit_evaluation(self) -> None:
        """Evaluate the newest version on the held-out set and the validation labels,
        once; with neither, record its row of metrics at once."""
        context = self.context
        state, version = context.state, context.state.version
        if version is None or not self.due(version) or not context.engine.free("infer"):
            return
        test_path = context.run.test_set if state.test_ready else ""
        snapshot = state.train_snapshot
        validation_path = snapshot.valid if snapshot is not None else None
        state.evaluated_version = version.number
        if not test_path and not validation_path:
            self._record_errors(version, {"validation": None, "version": version.number})
            return
        request = EvaluateRequest(
            ensemble_path=version.path, test_path=test_path, validation_path=validation_path
        )
        context.submit(EvaluateTask(version=version), request)

    def submit_rescore(self) -> None:
        """Re-score the oracle queue with the newest version, once per version."""
        context = self.context
        state, version = context.state, context.state.version
        if (
            version is None
            or not context.campaign.selection.rescore
            or not context.selector.ranks_by_ensemble
            or not context.queue
            or state.rescored_version >= version.number
            or not context.engine.free("infer")
        ):
            return
        state.rescored_version = version.number
        candidates = context.queue.candidates()
        path, out = context.run.queue_for_scoring(version.number)
        write_dataset(path, [c.atoms for c in candidates], extra=candidate_arrays(candidates))
        request = ScoreRequest(ensemble_path=version.path, input_path=path, output_path=out)
        context.submit(ScoreTask(version=version, input_path=path, output_path=out), request)

    def on_result(self, task: TaskRecord, result: dict[str, Any]) -> None:
        if isinstance(task, EvaluateTask):
            self._record_errors(task.version, result)
        else:
            try:
                self._rescore(task, result)
            finally:
                _remove_scored_queue(task)

    def on_failure(self, task: TaskRecord, error: BaseException) -> None:
        """Nothing to undo: the next version is evaluated and scores the queue."""
        if isinstance(task, ScoreTask):
            _remove_scored_queue(task)

    def _rescore(self, task: ScoreTask, result: dict[str, Any]) -> None:
        context = self.context
        selector = context.selector
        ids = [int(i) for i in result["candidate_id"]]
        scores = np.asarray(result["force_disagreement"], dtype=float)
        if result.get("output_path"):
            prediction = EnsemblePrediction.from_arrays(read_arrays(result["output_path"]))
            if prediction is not None:
                structures = read_dataset(task.input_path) if selector.needs_descriptors else None
                scores = selector.score(prediction, structures)
        new = zip(result["force_disagreement"], result["energy_disagreement"], scores, strict=True)
        dropped = context.queue.rescore(
            dict(zip(ids, new, strict=True)), result["version"], selector.threshold()
        )
        logger.info(
            "queue re-scored with v%d: %d dropped, %d left",
            result["version"],
            len(dropped),
            len(context.queue),
        )

    @staticmethod
    def _version_fields(version: Version) -> dict[str, Any]:
        """What a version's row records of the version itself."""
        return {
            "wall_s": version.wall_s,
            "val_force_mae": version.val_force_mae,
            "val_energy_mae_per_atom": version.val_energy_mae_per_atom,
            "held_back": version.held_back,
            "n_validation": version.n_validation,
            "exploration": version.exploration,
        }

    def _record_skipped(self, version: Version) -> None:
        """A row, without evaluation, for each version published since the last row
        and before ``version`` (the inference slot was busy when they were newest), so
        that every version's exploration ratios are in ``metrics.jsonl``."""
        state = self.context.state
        last = max((row["version"] for row in state.test_errors), default=0)
        for skipped in state.versions:
            if last < skipped.number < version.number:
                record = {"version": skipped.number, "labels": skipped.n_labels, "force_mae": None}
                record.update(self._version_fields(skipped), evaluated=False)
                self.context.run.append_jsonl(METRICS_FILE, record)
                state.record_test_error(skipped, {}, record)

    def per_system(self, evaluation) -> dict[str, dict[str, Any]]:
        """The standard metrics of each system's held-out frames, when the held-out
        set tags its frames with systems (several systems, labelled by palflow)."""
        if self._test_systems is None:
            arrays = read_arrays(self.context.run.test_set)
            self._test_systems = (
                np.asarray(arrays["system"], dtype=str) if "system" in arrays else np.array([]),
                np.asarray(arrays["n_atoms"], dtype=float),
            )
        systems, n_atoms = self._test_systems
        if len(systems) != len(evaluation.force_error) or len(set(systems)) < 2:
            return {}
        out = {}
        for name in dict.fromkeys(systems):
            mask = systems == name
            out[str(name)] = {
                "force_mae": float(np.average(evaluation.force_error[mask], weights=n_atoms[mask])),
                "energy_mae_per_atom": float(np.abs(evaluation.energy_error[mask]).mean()),
                "uncertainty_spearman": spearman_rho(
                    evaluation.force_spread[mask], evaluation.force_error[mask]
                ),
                "n_structures": int(mask.sum()),
            }
        return out

    def _record_errors(self, version: Version, result: dict[str, Any]) -> None:
        context = self.context
        self._record_skipped(version)
        has_test = result.get("force_mae") is not None
        validation = result.get("validation")
        if has_test:
            evaluation = evaluation_from_result(result, version.number, version.n_labels)
            record = measure_version(evaluation, self.metrology)
            by_system = self.per_system(evaluation)
            if by_system:
                record["systems"] = by_system
            record["reliability_test"] = reliability(evaluation)
        else:
            record = {"version": version.number, "labels": version.n_labels, "force_mae": None}
        record.update(self._version_fields(version))
        if validation is not None:
            checked = evaluation_from_result(validation, version.number, version.n_labels)
            context.selector.calibrate(checked)
            record.update(
                validation_force_mae=validation["force_mae"],
                reliability_validation=reliability(checked),
            )
        record["calibration"] = context.selector.calibration
        context.run.append_jsonl(METRICS_FILE, record)
        context.state.record_test_error(version, result, record)
        if not has_test:
            logger.info(
                "v%d: no held-out set; validation force MAE %s (%d labels)",
                version.number,
                "n/a" if validation is None else f"{validation['force_mae']:.4f} eV/Å",
                version.n_labels,
            )
            return
        logger.info(
            "v%d test force MAE %.4f eV/Å (%d labels)",
            version.number,
            result["force_mae"],
            version.n_labels,
        )
        context.policy.note_test_error(result["force_mae"])


def reliability(evaluation, bins: int = 5) -> list[list[float]] | None:
    """Error against spread: the structures sorted by their force spread into
    ``bins`` groups of equal size, and per group ``[mean spread, mean force error,
    structures]`` (eV/Å). A calibrated ensemble lies on error = c · spread; None with
    fewer structures than groups."""
    spread = np.asarray(evaluation.force_spread, dtype=float)
    error = np.asarray(evaluation.force_error, dtype=float)
    usable = np.isfinite(spread) & np.isfinite(error)
    spread, error = spread[usable], error[usable]
    if len(spread) < bins:
        return None
    order = np.argsort(spread, kind="stable")
    return [
        [float(spread[group].mean()), float(error[group].mean()), int(len(group))]
        for group in np.array_split(order, bins)
    ]


def _remove_scored_queue(task: ScoreTask) -> None:
    """A re-scored queue's files are read once: they go (the run directory keeps
    what a resume, the report or an export reads, and these are none of those)."""
    for path in (task.input_path, task.output_path):
        if os.path.exists(path):
            os.remove(path)
