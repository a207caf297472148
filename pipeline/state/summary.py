"""What ``summary.json`` says about a finished campaign."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from palflow.apps.contracts import MODULES, failure_counts
from palflow.pipeline.config.settings import Campaign
from palflow.pipeline.policies.metrology import learning_curve_area
from palflow.pipeline.state.metrics import busy_fractions, concurrency_fraction
from palflow.pipeline.state.records import Version, Walker
from palflow.pipeline.state.run_files import one_per_task

logger = logging.getLogger(__name__)


class CampaignSummary:
    """The summary part of :class:`~palflow.pipeline.state.campaign_state.CampaignState`."""

    campaign: Campaign
    walkers: list[Walker]
    versions: list[Version]
    t0: float
    n_labels_active: int
    n_labels_initial: int
    failures: dict[int, str]
    retried: Counter[str]
    test_errors: list[dict[str, Any]]
    stop_reason: str | None
    stop_time: float
    resumes: list[dict[str, Any]]
    active_by_system: Counter[str]

    def final_training(self, events: list[dict[str, Any]]) -> dict[str, Any] | None:
        """What training did after the stop (None before one): ``limit_s``, the
        campaign's ``stop.final_training_s``; ``applied``, whether it applied (not
        after a wall-time stop); ``train_tasks``, the training tasks submitted after
        the stop (with ``limit_s`` 0, at most one per member, which takes in the last
        labels); ``s``, from the stop to the return of the last of them (0 without)."""
        if not self.stop_reason:
            return None
        after = [e for e in events if e["kind"] == "train" and e["submitted"] > self.stop_time]
        returned = [e["returned"] for e in after if e.get("returned")]
        return {
            "limit_s": self.campaign.stop.final_training_s,
            "applied": not self.stop_reason.startswith("wall-time"),
            "train_tasks": len(after),
            "s": max(returned) - self.stop_time if returned else 0.0,
        }

    def summary(self, events: list[dict[str, Any]], slots: dict[str, int]) -> dict[str, Any]:
        """What ``summary.json`` says about the campaign."""
        t_end = time.time()
        tasks = one_per_task(events)  # a task whose result was unusable counts once
        kinds = failure_counts(self.failures.values())
        rows = sorted(self.test_errors, key=lambda e: e["version"])
        errors = [e for e in rows if e.get("force_mae") is not None]
        newest = rows[-1] if rows else {}
        return {
            "campaign": self.campaign.name,
            "stop_reason": self.stop_reason or "nothing left to run",
            "labels": self.n_labels_active,
            "initial_labels": self.n_labels_initial,
            "oracle_failures": len(self.failures),
            "oracle_failures_by_kind": kinds,
            "oracle_retries_by_kind": dict(self.retried),
            "started_at": self.t0,
            "wall_s": t_end - self.t0,
            "stopped_at_s": self.stop_time - self.t0 if self.stop_reason else None,
            "final_training": self.final_training(events),
            # The newest version's number: the count of trained versions (version 0,
            # where there is one, is the untrained foundation).
            "versions": self.versions[-1].number if self.versions else 0,
            "has_test_set": self.campaign.has_test_set,
            "test_force_mae": [[e["labels"], e["wall_s"], e["force_mae"]] for e in errors],
            "test_errors": errors,
            # Without a held-out set, these say how far the campaign got.
            "validation_force_mae": newest.get("validation_force_mae"),
            "exploration": newest.get("exploration"),
            "calibration": newest.get("calibration"),
            # Mean test force MAE over the label range: one number per learning curve.
            "learning_curve_area": learning_curve_area(
                [e["labels"] for e in errors], [e["force_mae"] for e in errors]
            ),
            "busy_fraction": busy_fractions(events, self.t0, t_end),
            "all_modules_busy_fraction": concurrency_fraction(
                events, self.t0, t_end, tuple(m for m in MODULES if m != "infer")
            ),
            "slots": slots,
            "tasks": dict(Counter(e["module"] for e in tasks)),
            "failed_tasks": dict(Counter(e["module"] for e in tasks if not e["ok"])),
            "walker_resets": sum(w.resets for w in self.walkers),
            "resumes": self.resumes,
            # Per system: active labels, and the newest version's held-out errors.
            "systems": {
                system.name: {
                    "labels": self.active_by_system[system.name],
                    **(errors[-1].get("systems", {}).get(system.name, {}) if errors else {}),
                }
                for system in self.campaign.all_systems()
            },
        }
