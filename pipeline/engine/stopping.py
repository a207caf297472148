"""When a campaign stops, and what it still waits for once it has.

The stop conditions are a label budget, a wall-time limit, a target test force MAE,
the accurate ratio of exploration (:mod:`palflow.pipeline.engine.convergence`, no test
set needed), and a task returning ``{"stop": reason}``; the progress watchdog
(:mod:`palflow.pipeline.engine.watchdog`) stops a campaign that cannot progress. A stop finishes
the in-flight oracle work and stores it; training then goes on for
``stop.final_training_s`` on the final labels (not after a wall-time stop), and the
last version is evaluated.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from palflow.pipeline.config.settings import Campaign
from palflow.pipeline.engine.convergence import ExplorationTally
from palflow.pipeline.engine.core import Engine, TaskRecord
from palflow.pipeline.engine.watchdog import Watchdog, provider_failure, verdict
from palflow.pipeline.state.campaign_state import CampaignState
from palflow.pipeline.state.records import Version

DRAINED_KINDS = ("label", "train", "evaluate")
"""Tasks a stop still waits for: labels being paid for, and training on them."""


class StopPolicy:
    """The stop rules of one campaign; the reason goes to ``state.stop_reason``."""

    def __init__(self, campaign: Campaign, state: CampaignState) -> None:
        self.campaign = campaign
        self.state = state
        self.watchdog = Watchdog(campaign, state)
        self.exploration = ExplorationTally(campaign)
        self.dead_modules: set[str] = set()
        """Modules whose executor cannot start workers: a stop waits for none of their
        tasks."""

    @property
    def stopping(self) -> bool:
        return self.state.stop_reason is not None

    def check(self) -> None:
        """Stop when the label budget or the wall-time limit is spent."""
        state, stop = self.state, self.campaign.stop
        if state.stop_reason:
            return
        if state.n_labels_active >= stop.max_labels:
            state.request_stop(f"label budget of {stop.max_labels} reached")
        elif time.time() - state.t0 >= stop.max_wall_s:
            state.request_stop(f"wall-time limit of {stop.max_wall_s:g} s reached")

    def keep_waiting(self, engine: Engine) -> bool:
        """Whether the loop waits for tasks in flight: always, until a stop; then only
        for the tasks a stop drains."""
        drained = [t for t in engine.tasks(*DRAINED_KINDS) if t.module not in self.dead_modules]
        return not self.stopping or bool(drained)

    def final_training(self) -> bool:
        """Whether training goes on after a stop, on the labels the campaign has."""
        state, stop = self.state, self.campaign.stop
        now = time.time()
        return (
            not state.stop_reason.startswith("wall-time")
            and now - state.stop_time < stop.final_training_s
            and now - state.t0 < stop.max_wall_s
        )

    def note_version(self, version: Version) -> Version:
        """Take the exploration ratios at a new version (returned with them; it
        replaces the newest of ``state.versions``), and stop once the accurate ratio
        has held at ``stop.accurate_versions`` versions in a row."""
        version = replace(version, exploration=self.exploration.note_version())
        if self.state.versions and self.state.versions[-1].number == version.number:
            self.state.versions[-1] = version
        if self.exploration.converged and not self.stopping:
            self.state.request_stop(self.exploration.reason())
        return version

    def note_test_error(self, force_mae: float) -> None:
        """Stop once the held-out force MAE reaches ``stop.target_force_mae``."""
        target = self.campaign.stop.target_force_mae
        if target and force_mae <= target:
            self.state.request_stop(f"test force MAE {force_mae:.4f} <= {target}")

    # ------------------------------------------------------------ task outcomes
    def task_succeeded(self, task: TaskRecord, result: dict[str, Any]) -> None:
        if result.get("stop"):
            self.state.request_stop(f"{task.module} asked to stop: {result['stop']}")
        self.watchdog.succeeded(task, result)

    def task_failed(self, task: TaskRecord, error: BaseException) -> None:
        """Count a failure; one that says the task's executor cannot start workers
        (:func:`~palflow.pipeline.engine.watchdog.provider_failure`) stops the campaign
        as failed at once."""
        reason = provider_failure(error, task.module)
        if reason is not None:
            self.cannot_start(task.module, reason)
        else:
            self.watchdog.failed(task, error)

    def cannot_start(self, module: str, reason: str) -> None:
        """The executor of ``module`` cannot start workers: stop as failed, and never
        wait for its tasks (they would not run)."""
        self.dead_modules.add(module)
        self.watchdog.fail(reason)

    def fail(self, reason: str) -> None:
        """Stop the campaign as failed (the watchdog's verdict), with ``reason``."""
        self.watchdog.fail(reason)

    def verdict(self, summary: dict[str, Any]) -> dict[str, Any]:
        """``failed``, ``failure`` and ``exit_status`` of a finished campaign."""
        return verdict(summary, self.watchdog.failure)
