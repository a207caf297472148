"""The progress watchdog: a campaign that cannot progress stops, and says why.

The stop rules of :mod:`palflow.pipeline.engine.stopping` end a campaign that progresses (a label
budget, a target error, a wall time). The watchdog ends one that does not:

* **a task that keeps failing.** Failures in a row are counted per member for
  training, per walker for the generator, and per kind of task for the oracle and
  inference (``label``, ``reference``, ``score``, ``evaluate``). Another member's
  success does not reset a member's count, so one member whose checkpoint cannot
  be read stops the campaign after :data:`MAX_FAILURES_IN_A_ROW` attempts, naming
  the member and the last error. An error raised while a result is handled (an
  agent's ``on_result``) counts as a failure of its task (:mod:`palflow.pipeline.engine.core`).
* **a stop that has become unreachable.** No candidate selected and no label
  stored while :data:`MAX_FRUITLESS_VERSIONS` ensemble versions in a row were
  published, each after at least one generator segment returned, with labels still
  budgeted (a one-atom system, a sampling interval longer than the segment, a
  threshold no frame reaches, a measure that raises); or no label stored by
  :data:`MAX_FRUITLESS_ORACLE_TASKS` oracle tasks in a row (every structure failed).
  The one exception: where the threshold had selected frames before (active labels
  were stored), no frame above it is the committee agreeing on everything its MD
  visits. That is convergence at this threshold, and the campaign stops with a stop
  reason that begins ``converged:``, a success.

* **an executor that cannot start workers.** A task that fails because its
  executor's provider could not start a block (``sbatch`` refused the job, or the
  job failed before a worker connected) stops the campaign at once, with the
  provider's message whole (:func:`provider_failure`). The task's structures are not
  counted as oracle failures: they go back to the queue, for a ``--resume`` on a
  mended site.

Either ends the campaign as failed: ``summary.json`` says ``"failed": true``, the
reason in ``"failure"`` (also the stop reason) and ``"exit_status": 1``.
:func:`verdict` also fails a campaign that reached a stop having achieved nothing:
no label stored, or no finite held-out force MAE.

:class:`RepeatLog` keeps the logs bounded when a task fails in a loop: an error is
logged in full once, its repeats as one counted line at 2, 3, 4, 5, 8, 16, 32, …
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from typing import Any

logger = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 5
"""Failures in a row of one member, one walker, or one oracle/inference task kind
that stop the campaign."""

MAX_FRUITLESS_VERSIONS = 10
"""Ensemble versions in a row, each after generator segments returned, that brought
no new candidate and no new label: the campaign cannot progress."""

MAX_FRUITLESS_ORACLE_TASKS = 8
"""Oracle label tasks in a row (finished or failed) that stored no label."""


def failure_key(task: Any) -> list[str]:
    """What a failure of ``task`` is counted against: its member, its walkers, or its
    kind of task."""
    member = getattr(task, "member", None)
    if task.kind == "train" and member is not None:
        return [f"member {member.index}"]
    walkers = getattr(task, "walkers", None)
    if task.kind == "generate" and walkers:
        return [f"walker {walker.walker_id}" for walker in walkers]
    return [f"{task.kind} tasks"]


class Watchdog:
    """Counts what goes wrong in a row, and stops a campaign that cannot progress.

    Parameters
    ----------
    campaign, state
        The campaign's settings and its
        :class:`~palflow.pipeline.state.campaign_state.CampaignState`.
    """

    def __init__(self, campaign: Any, state: Any) -> None:
        self.campaign = campaign
        self.state = state
        self.failure: str | None = None
        """Why the watchdog stopped the campaign; None while it has not."""
        self.in_a_row: Counter[str] = Counter()
        self.fruitless_versions = 0
        self.fruitless_oracle_tasks = 0
        self._versions_seen = len(state.versions)
        self._progress_mark = self._progress()
        self._segments_since_version = 0
        self._frames_since_version = 0
        self._labels_seen = state.n_labels_total
        self._last_oracle_problem = ""

    def failures_in_a_row(self, member: Any) -> int:
        """Failed training tasks in a row of ``member``."""
        return self.in_a_row[f"member {member.index}"]

    # ---------------------------------------------------------------- outcomes
    def succeeded(self, task: Any, result: dict[str, Any]) -> None:
        """A task finished and its result was used."""
        for key in failure_key(task):
            self.in_a_row[key] = 0
        if task.kind == "generate":
            self._segments_since_version += 1
            self._frames_since_version += sum(
                int(w.get("n_frames", 0)) for w in result.get("walkers", [])
            )
        elif task.kind == "label":
            failures = result.get("failures") or []
            if failures:
                self._last_oracle_problem = str(failures[-1][1])
            self._note_oracle_task()
        elif task.kind == "train":
            self._note_versions()

    def failed(self, task: Any, error: BaseException) -> None:
        """A task failed, or its result could not be used."""
        message = f"{type(error).__name__}: {error}"[:300]
        for key in failure_key(task):
            self.in_a_row[key] += 1
            if self.in_a_row[key] >= MAX_FAILURES_IN_A_ROW:
                what = f"training of {key}" if task.kind == "train" else key
                self.fail(f"{what} failed {self.in_a_row[key]} times in a row, last: {message}")
        if task.kind == "generate":
            self._segments_since_version += 1
        elif task.kind == "label":
            self._last_oracle_problem = message
            self._note_oracle_task()

    def fail(self, reason: str) -> None:
        """Stop the campaign as failed, unless it has already stopped."""
        if self.state.stop_reason is None:
            self.failure = reason
            logger.error("watchdog stops the campaign: %s", reason)
            self.state.request_stop(reason)

    # ---------------------------------------------------------------- progress
    def _progress(self) -> tuple[int, int]:
        """Changes when a candidate is queued or a label stored."""
        return self.state.last_candidate_id, self.state.n_labels_total

    def _note_oracle_task(self) -> None:
        labels = self.state.n_labels_total
        if labels > self._labels_seen:
            self._labels_seen = labels
            self.fruitless_oracle_tasks = 0
            return
        self.fruitless_oracle_tasks += 1
        if self.fruitless_oracle_tasks >= MAX_FRUITLESS_ORACLE_TASKS:
            self.fail(
                f"cannot progress: the oracle stored no label in {self.fruitless_oracle_tasks} "
                f"tasks in a row, last: {self._last_oracle_problem or 'no structure stored'}"
            )

    def _note_versions(self) -> None:
        """On each new version: was anything selected or labelled since the last?"""
        state = self.state
        if len(state.versions) == self._versions_seen or state.stop_reason is not None:
            self._versions_seen = len(state.versions)
            return
        self._versions_seen = len(state.versions)
        progress = self._progress()
        if progress != self._progress_mark:
            self.fruitless_versions = 0
        elif self._segments_since_version:
            self.fruitless_versions += 1
        self._progress_mark = progress
        segments, frames = self._segments_since_version, self._frames_since_version
        self._segments_since_version = self._frames_since_version = 0
        if self.fruitless_versions < MAX_FRUITLESS_VERSIONS:
            return
        selection = self.campaign.selection
        room = self.campaign.stop.max_labels - state.n_labels_active
        no_frames = bool(segments and not frames)
        why = (
            "the generator's segments returned no frames (is the sampling interval "
            "longer than a segment?)"
            if no_frames
            else f"no frame scored above the threshold ({selection.measure!r}, "
            f"threshold {selection.threshold:g})"
        )
        if not no_frames and state.n_labels_active > 0:
            # the threshold selected frames before: the committee now agrees on all the
            # frames its MD visits, which is convergence at this threshold, not a fault
            state.request_stop(
                f"converged: {self.fruitless_versions} ensemble versions in a row found no "
                f"frame above the selection threshold ({selection.measure!r}, threshold "
                f"{selection.threshold:g}), with {room} labels still budgeted"
            )
            return
        self.fail(
            f"cannot progress: {self.fruitless_versions} ensemble versions in a row brought "
            f"no new candidate and no new label, with {room} labels still budgeted: {why}"
        )


def verdict(summary: dict[str, Any], failure: str | None = None) -> dict[str, Any]:
    """Whether a campaign succeeded, from its summary; ``failure`` is the watchdog's.

    Returns
    -------
    dict
        ``failed`` (bool), ``failure`` (one line, or None) and ``exit_status``: 0 when
        the campaign reached a real stop (a budget, a target, a wall time, a module's
        request) with labels stored (initial ones count) and a finite held-out force
        MAE (without a held-out set: a published ensemble version); 1 otherwise.
    """
    if failure is None:
        errors = summary.get("test_force_mae") or []
        if summary.get("stopped_at_s") is None:
            failure = f"the campaign ended without reaching a stop ({summary['stop_reason']})"
        elif summary["labels"] + summary["initial_labels"] == 0:
            failure = "no label was stored: see oracle_failures_by_kind in summary.json"
        elif not summary.get("has_test_set", True):
            if not summary.get("versions"):
                failure = "no ensemble version was published"
        elif not errors:
            failure = "no ensemble version was evaluated on the held-out set"
        elif not math.isfinite(errors[-1][2]):
            failure = f"the newest held-out force MAE is {errors[-1][2]}, not a finite number"
    return {"failed": failure is not None, "failure": failure, "exit_status": int(bool(failure))}


def cannot_start_workers(error: BaseException) -> bool:
    """Whether ``error`` is Parsl's word that the task's executor is in a bad state (its
    provider failed to start or run blocks): every task of that executor fails so."""
    from parsl.executors.errors import BadStateException, ScalingFailed
    from parsl.jobs.errors import TooManyJobFailuresError

    return isinstance(error, BadStateException | ScalingFailed | TooManyJobFailuresError)


def provider_failure(error: BaseException, module: str) -> str | None:
    """Why ``error`` says that the executor of ``module`` cannot start workers
    (:func:`cannot_start_workers`): one line, with the provider's message whole; None
    for any other error."""
    from parsl.executors.errors import BadStateException

    if not cannot_start_workers(error):
        return None
    message = error.reason if isinstance(error, BadStateException) else str(error)
    # Parsl lists each failed block as "Error N:\n\t<message>"; one line, repeats once.
    entries, seen = [], set()
    for entry in re.split(r"Error \d+:", message):
        text = " ".join(entry.split())
        key = re.sub(r"\d+", "#", text)
        if text and key not in seen:
            seen.add(key)
            entries.append(text)
    said = " | ".join(entries) or "no message"
    return (
        f"the {module} executor cannot start workers (Parsl put it in a bad state: a block "
        f"failed to start or to run, or its workers could not join): {said}"
    )


class WorkerStartWatch:
    """An observer of the coordinator's loop (see
    :attr:`~palflow.pipeline.engine.core.Engine.observers`): the executor of a module
    that has had tasks waiting ``timeout_s`` seconds without a single worker ever
    connecting (its pilot jobs queued and never started, or started and never
    reached the coordinator) stops the campaign as failed, naming the jobs and, on
    Slurm, why they wait (``squeue``'s reason).

    Parameters
    ----------
    executors
        The loaded Parsl executors by label; those without a provider (thread
        pools) are not watched.
    timeout_s
        The site's ``worker_start_timeout_s``.
    """

    def __init__(self, executors: dict[str, Any], timeout_s: float, every_s: float = 5.0) -> None:
        self.executors = {
            label: executor
            for label, executor in executors.items()
            if getattr(executor, "provider", None) is not None
            and hasattr(executor, "connected_managers")
        }
        self.timeout_s = timeout_s
        self.every_s = every_s
        self.waiting_since: dict[str, float] = {}
        self.started: set[str] = set()
        self._last = 0.0

    def __call__(self, coordinator: Any) -> None:
        import time

        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        try:
            self._check(coordinator, now)
        except Exception as error:  # an observer that raises is dropped: keep watching
            logger.warning("the worker start watch could not check: %s", describe_error(error))

    def _check(self, coordinator: Any, now: float) -> None:
        for label, executor in self.executors.items():
            if label in self.started:
                continue
            if executor.connected_managers():
                self.started.add(label)
                continue
            if not coordinator.engine.busy(label):
                self.waiting_since.pop(label, None)  # nothing waits: the clock restarts
                continue
            since = self.waiting_since.setdefault(label, now)
            if now - since >= self.timeout_s:
                reason = (
                    f"the {label} executor started no worker within {self.timeout_s:g} s "
                    f"(the site's worker_start_timeout_s): {_jobs_text(executor)}"
                )
                coordinator.policy.cannot_start(label, reason)
                self.started.add(label)  # said once


def _jobs_text(executor: Any) -> str:
    """The executor's pilot jobs and their states, with Slurm's reason for waiting."""
    import shutil
    import subprocess

    jobs = dict(getattr(executor, "blocks_to_job_id", {}))
    if not jobs:
        return "no pilot job was submitted"
    states = {}
    if shutil.which("squeue") and type(executor.provider).__name__ == "SlurmProvider":
        try:
            done = subprocess.run(
                ["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(jobs.values())],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            done = subprocess.CompletedProcess([], 1, "", "")
        for line in done.stdout.splitlines():
            job, state, why = (line.split(maxsplit=2) + ["", ""])[:3]
            states[job] = f"{state} ({why})" if why and why != "None" else state
    return "; ".join(
        f"block {block}: job {job} {states.get(job, 'state unknown')}"
        for block, job in sorted(jobs.items())
    )


class RepeatLog:
    """Log an error in full the first time; its repeats as a counted line, sparsely.

    Errors are alike when their type and message agree up to numbers (task ids,
    checkpoint numbers), per ``topic`` (a task kind).
    """

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.seen: Counter[tuple[str, str]] = Counter()

    def error(self, topic: str, headline: str, error: BaseException, traceback: bool) -> None:
        """Log ``headline`` and ``error`` (with its traceback when ``traceback``)."""
        key = (topic, re.sub(r"\d+", "#", f"{type(error).__name__}: {error}"))
        self.seen[key] += 1
        count = self.seen[key]
        if count == 1:
            exc_info = (type(error), error, error.__traceback__) if traceback else None
            self.log.warning("%s: %s", headline, describe_error(error), exc_info=exc_info)
        elif count <= 5 or count & (count - 1) == 0:
            self.log.warning("%s: same error again (x%d)", headline, count)


def describe_error(error: BaseException) -> str:
    """An error as ``Type: message``, at most 500 characters."""
    return f"{type(error).__name__}: {error}"[:500]
