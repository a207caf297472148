"""The generator agent: segments of the walkers on the newest ensemble.

Walkers move in groups: one task advances a group in lockstep, with the generator
``generator.kind`` names (:func:`palflow.apps.generator._generate`; MD by default). When a
segment ends, its frames are scored by the selection measure, counted for the
exploration ratios (:mod:`palflow.pipeline.engine.convergence`), and the picks enter the
oracle queue; each walker moves on from its last frame, or is reset to the start
structure when it blew up or left the model's domain. Generators pause while the
queue holds enough candidates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from palflow.apps.contracts import MDRequest
from palflow.apps.data.dataset import read_arrays, structures_from_arrays
from palflow.pipeline.engine.convergence import SegmentCounts
from palflow.pipeline.engine.core import TaskRecord
from palflow.pipeline.engine.watchdog import cannot_start_workers
from palflow.pipeline.policies.measures import EnsemblePrediction
from palflow.pipeline.policies.selection import Candidate, select_frames
from palflow.pipeline.state.records import Version, Walker

logger = logging.getLogger(__name__)


@dataclass
class GenerateTask(TaskRecord):
    kind = "generate"
    walkers: list[Walker] = field(default_factory=list)
    version: int = 0
    """The ensemble version that drove the MD."""


class GeneratorAgent:
    """Submits MD segments and queues the frames worth labelling."""

    kinds = ("generate",)

    def __init__(self, context) -> None:
        self.context = context

    # ---------------------------------------------------------------- submitting
    def submit_ready(self, stopping: bool) -> None:
        version = self.context.state.version
        if stopping or version is None or self.queue_is_full():
            return  # no ensemble to drive MD yet, or the oracle is far behind
        for group in sorted(self.walker_groups(), key=lambda g: min(w.segments for w in g)):
            if not self.context.engine.free("generator"):
                return
            if any(walker.busy for walker in group):
                continue
            self.submit_group(group, version)

    def queue_is_full(self) -> bool:
        """Whether generators should pause: the oracle is far behind, or paced."""
        selection = self.context.campaign.selection
        limit = selection.max_queue
        if selection.max_labels_per_version:
            limit = min(limit, 2 * selection.max_labels_per_version)
        return len(self.context.queue) >= limit

    def walker_groups(self) -> list[list[Walker]]:
        """The walkers, in the groups that one generator task advances together: only
        walkers of one system at one temperature share a task, and a system that
        runs replica exchange goes in whole ladders (its walkers in order, one per
        rung). The walkers of a system that has reached its own label cap
        (``max_labels``) rest."""
        context = self.context
        walkers = [w for w in context.state.walkers if not self.system_is_full(w.system)]
        size = context.campaign.generator.walkers_per_task or -(
            -len(context.state.walkers) // context.engine.slots["generator"]
        )
        alike: dict[tuple, list[Walker]] = {}
        sizes: dict[tuple, int] = {}
        for walker in walkers:
            settings = self.settings_of(walker.system)
            if settings["kind"] == "replica_exchange":
                key = (walker.system, None)
                sizes[key] = len(settings["temperature_ladder_K"])
            else:
                key = (walker.system, walker.temperature_K)
            alike.setdefault(key, []).append(walker)
        return [
            group[i : i + sizes.get(key, size)]
            for key, group in alike.items()
            for i in range(0, len(group), sizes.get(key, size))
        ]

    def settings_of(self, system: str) -> dict[str, Any]:
        """The generator section as the walkers of ``system`` run it."""
        campaign = self.context.campaign
        return campaign.generator_for(campaign.system_named(system))

    def system_is_full(self, name: str) -> bool:
        """Whether the system ``name`` has its own label cap and has reached it."""
        cap = self.context.campaign.system_named(name).max_labels
        return cap is not None and self.context.state.active_by_system[name] >= cap

    def submit_group(self, group: list[Walker], version: Version) -> None:
        """Submit the next MD segment of the walkers of ``group`` on ``version``."""
        context = self.context
        outputs, last_frames = [], []
        for walker in group:
            walker.busy = True
            walker.segments += 1
            frames, last = context.run.walker_segment(walker.walker_id, walker.segments)
            outputs.append(frames)
            last_frames.append(last)
        first = group[0]
        settings = context.campaign.generator_for(context.campaign.system_named(first.system))
        if first.temperature_K is not None:
            settings["temperature_K"] = first.temperature_K
        if context.state.train_snapshot is not None:  # what "rattle" perturbs besides the start
            settings["labelled_path"] = context.state.train_snapshot.train
        if settings["kind"] == "metadynamics":  # each walker's hills, and its system's
            settings["hills_paths"] = [context.run.walker_hills(w.walker_id) for w in group]
            settings["shared_hills_paths"] = [
                context.run.walker_hills(w.walker_id)
                for w in context.state.walkers
                if w.system == first.system
            ]
        request = MDRequest(
            generator=settings["kind"],
            start_paths=[walker.start_path for walker in group],
            ensemble_path=version.path,
            output_paths=outputs,
            last_frame_paths=last_frames,
            settings=settings,
            seed=context.campaign.seed * 1_000_003 + context.engine.next_task_id,
        )
        context.submit(GenerateTask(walkers=group, version=version.number), request)

    def home(self, walker: Walker) -> str:
        """Where ``walker`` resets to: its system's start configuration."""
        return walker.home or self.context.state.start_path

    # ---------------------------------------------------------------- results
    def on_result(self, task: GenerateTask, result: dict[str, Any]) -> None:
        for walker in task.walkers:
            walker.busy = False
        for walker, outcome in zip(task.walkers, result["walkers"], strict=True):
            left_domain = self.queue_picks(outcome, task.version, walker.system)
            if outcome["blew_up"] and not outcome["n_frames"]:  # the blow-up frame alone
                self.context.policy.exploration.add(walker.system, SegmentCounts(0, 0, 1))
            reason = outcome["reason"] if outcome["blew_up"] or outcome.get("reset") else None
            if left_domain:
                reason = "a frame scored above selection.upper_threshold"
            if reason:
                walker.resets += 1
                walker.start_path = self.home(walker)
                logger.info("walker %d reset: %s", walker.walker_id, reason)
            else:
                walker.start_path = outcome["last_frame_path"]

    def on_not_run(self, task: GenerateTask) -> None:
        """The segment never ran: its walkers keep where they were."""
        for walker in task.walkers:
            walker.busy = False

    def on_failure(self, task: GenerateTask, error: BaseException) -> None:
        if cannot_start_workers(error):  # never ran; the campaign stops
            return self.on_not_run(task)
        for walker in task.walkers:
            walker.busy = False
            walker.start_path = self.home(walker)

    def queue_picks(self, outcome: dict[str, Any], version: int, system: str = "") -> bool:
        """Score one walker's segment, and queue the frames selection picks (above the
        system's own threshold when it has one), tagged with the walker's ``system``.

        Returns
        -------
        bool
            Whether a frame lay above the upper trust level: the walker left the
            model's domain, and neither that frame nor any after it is taken.
        """
        if not outcome["n_frames"]:
            return False
        context = self.context
        selection, selector = context.campaign.selection, context.selector
        arrays = read_arrays(outcome["output_path"])
        frames = structures_from_arrays(arrays)
        prediction = EnsemblePrediction.from_arrays(arrays)
        if prediction is None:  # a generator that keeps no member predictions
            scores = np.asarray(outcome["force_disagreement"], dtype=float)
        else:
            scores = selector.score(prediction, frames)
        outside = selector.out_of_domain(scores)
        threshold = context.campaign.system_named(system).threshold or selector.threshold()
        context.policy.exploration.add(
            system, SegmentCounts.classify(scores, threshold, outside, bool(outcome["blew_up"]))
        )
        if outside.any():
            scores = scores[: int(np.argmax(outside))]
        picks = select_frames(
            scores, threshold, selection.max_per_trajectory, selection.min_frame_gap
        )
        context.queue.extend(
            Candidate(
                context.state.new_candidate_id(),
                frames[i],
                outcome["force_disagreement"][i],
                outcome["energy_disagreement"][i],
                version,
                priority=float(scores[i]),
                system=system,
            )
            for i in picks
        )
        return bool(outside.any())
