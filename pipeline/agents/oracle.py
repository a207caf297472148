"""The oracle agent: initial labels, the held-out set, and active labels, paced.

Free oracle slots take the initial structures first, then the most worth-labelling
candidates of the queue (the selector's query), at most
``selection.max_labels_per_version`` per published ensemble version. A finished
batch is harvested into ``labels.db`` and the next training snapshot
(:meth:`~pipeline.campaign_state.CampaignState.harvest`); a structure that failed
transiently is tried again, up to ``oracle.max_attempts``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from apps.contracts import FailureKind, LabelRequest, ReferenceRequest
from apps.dataset import write_dataset
from pipeline.engine import TaskRecord
from pipeline.journal import candidate_arrays, retry_allowed
from pipeline.selection import Candidate

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


class OracleAgent:
    """Submits oracle batches and the held-out set; stores what comes back.

    Parameters
    ----------
    context
        The shared :class:`~pipeline.agents.Context`.
    oracle_resources
        Parsl resource specification of every oracle task (ranks, nodes), for sites
        whose oracle executor is an MPIExecutor; None elsewhere.
    mpi_command
        The site's launch prefix template (see :func:`apps.oracle.mpi_prefix`).
    """

    kinds = ("label", "reference")

    def __init__(
        self, context, oracle_resources: dict[str, Any] | None = None, mpi_command: str = "parsl"
    ) -> None:
        self.context = context
        self.mpi_command = mpi_command
        self.options = (
            {}
            if oracle_resources is None
            else {"parsl_resource_specification": dict(oracle_resources)}
        )
        self.reference_attempts = 0

    # ---------------------------------------------------------------- submitting
    def submit_ready(self, stopping: bool) -> None:
        if not stopping:
            self.submit_labels()

    def calculator_spec(self) -> dict[str, Any]:
        """The oracle calculator as the apps take it (:func:`apps.oracle.make_calculator`)."""
        oracle = self.context.campaign.oracle
        return {
            "calculator": oracle.calculator,
            "kwargs": dict(oracle.kwargs),
            "mpi_ranks": oracle.mpi_ranks,
            "mpi_nodes": oracle.mpi_nodes,
            "mpi_command": self.mpi_command,
        }

    def submit_reference(self) -> None:
        """Label the held-out set by oracle-driven MD, or read it from ``test.file``."""
        context = self.context
        state, settings, run = context.state, context.campaign, context.run
        if state.test_ready:
            return
        if settings.test.file:
            state.use_test_file(settings.test.file)
            return
        request = ReferenceRequest(
            start_path=state.start_path,
            output_path=run.test_set,
            calculator_spec=self.calculator_spec(),
            scratch_dir=run.oracle_scratch("reference"),
            n_frames=settings.test.n_structures,
            stride=settings.test.md_stride,
            temperature_K=settings.test.temperature_K or settings.generator.temperature_K,
            timestep_fs=settings.generator.timestep_fs,
            seed=settings.seed,
        )
        context.submit(ReferenceTask(), request, **self.options)

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
            if room <= 0 or not context.queue:
                break
            batch = context.selector.pick_batch(context.queue, min(batch_size, room))
            self.submit_batch(batch, "active")
            requested += len(batch)
        return requested

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
            room = min(room, paced_total - state.n_labels_active - in_flight)
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
            "labels: %d active (+%d %s), %d failed, queue %d",
            state.n_labels_active,
            new,
            task.source,
            state.n_failures,
            len(context.queue),
        )

    def on_failure(self, task: TaskRecord, error: BaseException) -> None:
        if isinstance(task, ReferenceTask):
            self.reference_attempts += 1
            if self.reference_attempts < self.context.campaign.oracle.max_attempts:
                self.submit_reference()  # a transient fault need not recur
            else:
                self.context.state.request_stop(f"the held-out set could not be labelled: {error}")
            return
        reason = FailureKind.TASK_LOST.reason(f"{type(error).__name__}: {error}")
        for candidate in task.candidates:
            self.retry_or_record(candidate, reason, task.source)

    def retry_or_record(self, candidate: Candidate, reason: str, source: str) -> None:
        """Give a transiently failed structure another attempt, or record its failure."""
        state = self.context.state
        if not retry_allowed(candidate, reason, self.context.campaign):
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
