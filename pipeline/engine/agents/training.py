"""The training agent: every member, a few epochs at a time, on the newest labels.

A training task continues one member from its checkpoint, optimiser state included,
on the newest training snapshot (:func:`palflow.apps.training._train_member`). Once every
member has advanced, the K members are stacked into a new ensemble version, which
the next MD segments use at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from palflow.apps.contracts import TrainRequest
from palflow.apps.models import registry
from palflow.pipeline.engine.core import TaskRecord
from palflow.pipeline.engine.watchdog import MAX_FAILURES_IN_A_ROW
from palflow.pipeline.state.records import Member, Snapshot, Version

logger = logging.getLogger(__name__)


@dataclass
class TrainTask(TaskRecord):
    kind = "train"
    member: Member | None = None
    labels: int = 0
    """Labels (initial and active) in the snapshot it trains on."""
    checkpoint_out: str = ""


class TrainingAgent:
    """Submits member training tasks and publishes ensemble versions."""

    kinds = ("train",)

    def __init__(self, context) -> None:
        self.context = context

    def submit_ready(self, stopping: bool) -> None:
        context = self.context
        state = context.state
        snapshot = state.train_snapshot
        if snapshot is None:
            return
        if not (state.versions or stopping or any(m.checkpoint for m in state.members)):
            self.publish_foundation()  # not for a warm start: its members have checkpoints
        resting = stopping and not context.policy.final_training()
        watchdog = context.policy.watchdog
        # Members that have not advanced since the newest version (not fresh) first,
        # then the least-trained: every member advances and versions get published,
        # even where members have trained unequally (the serial loop's plateau rule)
        # before a stop.
        for member in sorted(state.members, key=lambda m: (m.fresh, m.tasks)):
            if not context.engine.free("train"):
                return
            # Once resting, each member takes in the last labels once, then stops; one
            # whose last task failed is not tried again, nor, at all, one that failed
            # the watchdog's limit in a row (it would otherwise be retried for ever).
            failing = watchdog.failures_in_a_row(member)
            if (
                member.busy
                or failing >= MAX_FAILURES_IN_A_ROW
                or (resting and (failing or member.trained_on >= state.n_labels_total))
            ):
                continue
            self.submit_member(member, snapshot)

    def submit_member(self, member: Member, snapshot: Snapshot) -> None:
        """Submit one training task of ``member`` on the labels of ``snapshot``."""
        context = self.context
        campaign = context.campaign
        member.busy = True
        out = context.run.member_checkpoint(member.index, member.tasks)
        member.tasks += 1
        request = TrainRequest(
            member=member.index,
            dataset_path=snapshot.train,
            checkpoint_in=member.checkpoint,
            checkpoint_out=out,
            spec=context.state.model_spec(campaign, context.oracle),
            settings=campaign.training.model_dump(),
            seed=campaign.seed * 1000 + member.index,
            n_epochs=campaign.training.epochs_per_task,
            validation_path=snapshot.valid,
        )
        record = TrainTask(member=member, labels=snapshot.n_labels, checkpoint_out=out)
        context.submit(record, request)

    def on_result(self, task: TrainTask, result: dict[str, Any]) -> None:
        context = self.context
        task.member.busy = False
        task.member.advance(result["checkpoint"], task.labels, result["epochs"], result)
        last_of_stop = context.policy.stopping and context.engine.busy("train") == 0
        self.publish(final=last_of_stop)

    def publish_foundation(self) -> Version | None:
        """Version 0, before any member trains, when the members start from a
        pretrained model (``ModelBackend.starts_from_foundation``)."""
        context = self.context
        spec = context.state.model_spec(context.campaign, context.oracle)
        if not registry.backend(spec["name"]).starts_from_foundation(spec):
            return None
        seeds = [context.campaign.seed * 1000 + m.index for m in context.state.members]
        version = context.policy.note_version(context.state.publish_foundation(spec, seeds))
        logger.info("ensemble v0 published: the foundation, before any training (zero-shot)")
        return version

    def publish(self, final: bool = False) -> Version | None:
        """Publish a new version once every member has advanced (or, ``final``, any
        has); the stop policy takes the exploration ratios at it."""
        version = self.context.state.maybe_publish_version(final=final)
        if version is not None:
            version = self.context.policy.note_version(version)
            logger.info("ensemble v%d published (%d labels)", version.number, version.n_labels)
        return version

    def on_failure(self, task: TrainTask, error: BaseException) -> None:
        task.member.busy = False
