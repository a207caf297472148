"""The oracle agent: initial labels, the held-out set, and active labels, paced.

Free oracle slots take the initial structures first, then the most worth-labelling
candidates of the queue (the selector's query), at most
``selection.max_labels_per_version`` per published ensemble version, requested while
that version is the newest (an allowance not used is not banked). A finished
batch is harvested into ``labels.db`` and the next training snapshot
(:meth:`~palflow.pipeline.state.labels.LabelStore.harvest`); a structure that failed
transiently is tried again, up to ``oracle.max_attempts``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from palflow.apps.contracts import FailureKind, LabelRequest, ReferenceRequest
from palflow.apps.data.dataset import read_dataset, write_dataset
from palflow.pipeline.engine.core import TaskRecord
from palflow.pipeline.engine.watchdog import cannot_start_workers
from palflow.pipeline.policies.selection import Candidate, retry_allowed
from palflow.pipeline.resume.journal import candidate_arrays
from palflow.pipeline.state.structures import read_labelled_file

logger = logging.getLogger(__name__)


@dataclass
class LabelTask(TaskRecord):
    kind = "label"
    candidates: list[Candidate] = field(default_factory=list)
    source: str = "active"
    """``initial`` (the start structure and its rattled copies) or ``active``."""


@dataclass
class ReferenceTask(TaskRecord):
    kind = "reference"
    system: str = ""
    """The system whose held-out frames it labels."""


class OracleAgent:
    """Submits oracle batches and the held-out set; stores what comes back.

    Parameters
    ----------
    context
        The shared :class:`~palflow.pipeline.engine.agents.Context`.
    oracle_resources
        Parsl resource specification of every oracle task (ranks, nodes), for sites
        whose oracle executor is an MPIExecutor; None elsewhere.
    """

    kinds = ("label", "reference")

    def __init__(self, context, oracle_resources: dict[str, Any] | None = None) -> None:
        self.context = context
        self.options = (
            {}
            if oracle_resources is None
            else {"parsl_resource_specification": dict(oracle_resources)}
        )
        self.reference_attempts = 0
        # Pacing: the newest version's number and the active labels requested under it.
        self._paced_version: int | None = None
        self._requested_under_version = 0

    # ---------------------------------------------------------------- submitting
    def submit_ready(self, stopping: bool) -> None:
        if not stopping:
            self.submit_labels()

    def calculator_spec(self) -> dict[str, Any]:
        """The oracle calculator as the apps take it (a ``CalculatorSpec``'s dict)."""
        return self.context.oracle.as_dict()

    def submit_reference(self) -> None:
        """Label the held-out set by oracle-driven MD from each system's start, or read
        it from ``test.file``; nothing with ``test.n_structures = 0``.

        With several systems, each system's frames are labelled by their own task into
        a part of the set; once every part is there, they are joined into the held-out
        set, each frame tagged with its system for the per-system metrics.
        """
        context = self.context
        state, settings, run = context.state, context.campaign, context.run
        if state.test_ready or not settings.has_test_set:
            return
        if settings.test.file:
            state.use_test_file(settings.test.file)
            return
        systems = settings.all_systems()
        if len(systems) == 1 and os.path.exists(run.test_set):
            state.test_ready = True
            return
        if len(systems) > 1 and all(os.path.exists(run.test_part(s.name)) for s in systems):
            self.join_reference_parts()
            return
        busy = {t.system for t in context.engine.tasks() if isinstance(t, ReferenceTask)}
        for system in systems:
            output = run.test_set if len(systems) == 1 else run.test_part(system.name)
            if system.name in busy or os.path.exists(output):
                continue
            if system.test_file:  # the system's own labelled held-out frames
                write_dataset(output, read_labelled_file(system.test_file))
                self.submit_reference()  # done, or joins the parts once all are there
                return
            homes = [w.home for w in state.walkers if w.system == system.name and w.home]
            temperature = (
                settings.test.temperature_K
                or (system.temperatures_K or [settings.generator.temperature_K])[0]
            )
            request = ReferenceRequest(
                start_path=homes[0] if homes else state.start_path,
                output_path=output,
                calculator_spec=self.calculator_spec(),
                scratch_dir=run.oracle_scratch(f"reference-{system.name}"),
                n_frames=settings.test.n_structures,
                stride=settings.test.md_stride,
                temperature_K=temperature,
                timestep_fs=settings.generator.timestep_fs,
                seed=settings.seed,
            )
            context.submit(ReferenceTask(system=system.name), request, **self.options)

    def join_reference_parts(self) -> None:
        """Join the systems' held-out parts into the held-out set, tagged by system."""
        context = self.context
        frames, names = [], []
        for system in context.campaign.all_systems():
            part = read_dataset(context.run.test_part(system.name))
            frames.extend(part)
            names.extend([system.name] * len(part))
        write_dataset(context.run.test_set, frames, extra={"system": np.array(names, dtype=str)})
        context.state.test_ready = True
        logger.info("held-out set ready: %d frames of %d systems", len(frames), len(set(names)))

    def submit_labels(self, quota: int | None = None, paced: bool = True) -> int:
        """Fill free oracle slots: initial structures first, then the queue.

        Parameters
        ----------
        quota
            Most active labels to request now (the serial loop's iteration size).
        paced
            Hold to ``selection.max_labels_per_version`` per ensemble version.

        Returns
        -------
        int
            Active labels requested.
        """
        context = self.context
        state, batch_size = context.state, context.campaign.oracle.batch_size
        requested = 0
        while context.engine.free("oracle"):
            if state.pending_initial:
                batch = state.pending_initial[:batch_size]
                del state.pending_initial[:batch_size]
                self.submit_batch(batch, "initial")
                continue
            room = self.label_room(paced)
            if quota is not None:
                room = min(room, quota - requested)
            counts = self.drop_capped_systems()
            if room <= 0 or not context.queue:
                break
            batch = context.selector.pick_batch(context.queue, min(batch_size, room))
            batch = self.within_system_caps(batch, counts)
            if not batch:
                continue
            self.submit_batch(batch, "active")
            requested += len(batch)
            self._requested_under_version += len(batch)
        return requested

    def system_caps(self) -> dict[str, int]:
        return {s.name: s.max_labels for s in self.context.campaign.all_systems() if s.max_labels}

    def within_system_caps(self, batch: list[Candidate], counts: Counter) -> list[Candidate]:
        """The candidates of ``batch`` that their systems' label caps still admit."""
        caps, kept = self.system_caps(), []
        for candidate in batch:
            cap = caps.get(candidate.system)
            if cap is None or counts[candidate.system] < cap:
                counts[candidate.system] += 1
                kept.append(candidate)
        return kept

    def drop_capped_systems(self) -> Counter:
        """Take out of the queue the candidates of every system whose own label cap
        (``max_labels``) the labels stored and in flight have reached; return those
        counts per system."""
        context = self.context
        capped = self.system_caps()
        counts = Counter(context.state.active_by_system)
        if not capped:
            return counts
        for task in context.engine.tasks():
            if isinstance(task, LabelTask) and task.source == "active":
                counts.update(c.system for c in task.candidates)
        full = {name for name, cap in capped.items() if counts[name] >= cap}
        dropped = [c.candidate_id for c in context.queue.candidates() if c.system in full]
        if dropped:
            context.queue.remove(dropped)
        return counts

    def submit_batch(self, batch: list[Candidate], source: str) -> None:
        """Write one oracle batch to the run directory and submit it."""
        context = self.context
        oracle, run = context.campaign.oracle, context.run
        task_id = context.engine.next_task_id
        input_path, output_path = run.oracle_batch(task_id)
        write_dataset(input_path, [c.atoms for c in batch], extra=candidate_arrays(batch, source))
        request = LabelRequest(
            input_path=input_path,
            output_path=output_path,
            calculator_spec=self.calculator_spec(),
            scratch_dir=run.oracle_scratch(f"batch{task_id:06d}"),
            max_force=oracle.max_force,
            timeout_s=oracle.timeout_s,
            isolate=oracle.isolate,
        )
        context.submit(LabelTask(candidates=batch, source=source), request, **self.options)

    def label_room(self, paced: bool = True) -> int:
        """Active labels that may be requested now: the budget, and the pacing."""
        context = self.context
        state = context.state
        in_flight = self.labels_in_flight()
        room = state.label_room(context.campaign, in_flight)
        per_version = context.campaign.selection.max_labels_per_version
        if paced and per_version:
            paced_total = per_version * len(state.versions)
            # No banking: versions published while the queue was empty do not add up
            # to a burst later; each version may request at most its own allowance.
            newest = state.version.number if state.version else None
            if newest != self._paced_version:
                self._paced_version, self._requested_under_version = newest, 0
            room = min(
                room,
                paced_total - state.n_labels_active - in_flight,
                per_version - self._requested_under_version,
            )
        return room

    def labels_in_flight(self) -> int:
        """Active labels requested and not yet returned."""
        return sum(
            len(task.candidates)
            for task in self.context.engine.tasks("label")
            if task.source == "active"
        )

    # ---------------------------------------------------------------- results
    def on_result(self, task: TaskRecord, result: dict[str, Any]) -> None:
        if isinstance(task, ReferenceTask):
            if len(self.context.campaign.all_systems()) > 1:
                self.submit_reference()  # joins the parts once every one is there
                return
            self.context.state.test_ready = True
            logger.info("held-out set ready: %d frames", result["n_frames"])
            return
        context = self.context
        state = context.state
        new, failed = state.harvest(result["output_path"], task.task_id)
        by_id = {c.candidate_id: c for c in task.candidates}
        for candidate_id, reason in failed:
            self.retry_or_record(by_id[candidate_id], reason, task.source)
        failed_ids = {candidate_id for candidate_id, _ in failed}
        context.selector.note_labelled(
            [c.atoms for c in task.candidates if c.candidate_id not in failed_ids]
        )
        logger.info(
            "label task %d: %d new %s labels; in all %d active, %d initial, %d failed; queue %d",
            task.task_id,
            new,
            task.source,
            state.n_labels_active,
            state.n_labels_initial,
            state.n_failures,
            len(context.queue),
        )

    def on_failure(self, task: TaskRecord, error: BaseException) -> None:
        if cannot_start_workers(error):  # never ran; the campaign stops
            return self.on_not_run(task)
        if isinstance(task, ReferenceTask):
            self.reference_attempts += 1
            if self.reference_attempts < self.context.campaign.oracle.max_attempts:
                self.submit_reference()  # a transient fault need not recur
            else:
                self.context.policy.fail(f"the held-out set could not be labelled: {error}")
            return
        reason = FailureKind.TASK_LOST.reason(f"{type(error).__name__}: {error}")
        for candidate in task.candidates:
            self.retry_or_record(candidate, reason, task.source)

    def on_not_run(self, task: TaskRecord) -> None:
        """The task never ran (its executor cannot start workers): its structures go
        back where they came from, their attempts uncounted; a held-out set task
        is submitted again by a ``--resume``."""
        for candidate in getattr(task, "candidates", []):
            if task.source == "initial":
                self.context.state.pending_initial.append(candidate)
            else:
                self.context.queue.push(candidate)

    def retry_or_record(self, candidate: Candidate, reason: str, source: str) -> None:
        """Give a transiently failed structure another attempt, or record its failure."""
        state = self.context.state
        if not retry_allowed(candidate, reason, self.context.campaign.oracle.max_attempts):
            state.record_failure(candidate.candidate_id, reason)
            return
        candidate.attempts += 1
        state.retried[FailureKind.of(reason).value] += 1
        logger.info(
            "candidate %d: attempt %d after %s",
            candidate.candidate_id,
            candidate.attempts + 1,
            reason[:120],
        )
        if source == "initial":
            state.pending_initial.append(candidate)
        else:
            self.context.queue.push(candidate)
