"""The serial active-learning loop, built from the same apps and handlers.

Label, then train, then generate and select, in turn, each phase waiting for the
last: the loop palflow exists to beat, kept here so that benchmarks compare the two
on the very same work. One iteration:

1. **label** up to ``labels_per_iteration`` candidates (the initial structures in
   the first), ``slots["oracle"]`` batches at a time;
2. **train** every member for one task, then evaluate the new ensemble version;
3. **generate**: one MD segment per walker, in the coordinator's groups; the frames
   they select are the next iteration's candidates.

Only the order of submission differs from :class:`~palflow.pipeline.engine.coordinator.Coordinator`:
the loop replaces its public :meth:`~palflow.pipeline.engine.coordinator.Coordinator.submit_ready`
and calls the agents' public methods; stopping, bookkeeping and files are the same.
"""

from __future__ import annotations

import logging
from typing import Any

from palflow.pipeline.engine.coordinator import Coordinator

logger = logging.getLogger(__name__)

PHASES = ("label", "train", "generate")


class SerialLoop(Coordinator):
    """Run a campaign one phase at a time (see the module's description).

    Parameters
    ----------
    labels_per_iteration
        Candidates labelled per iteration (N in PAL's model); by default one batch
        per oracle slot.
    *args, **kwargs
        As for :class:`~palflow.pipeline.engine.coordinator.Coordinator`.
    """

    def __init__(self, *args: Any, labels_per_iteration: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.labels_per_iteration = labels_per_iteration or (
            self.slots["oracle"] * self.campaign.oracle.batch_size
        )
        self.phase = "label"
        self.iterations = 0
        self._quota = self.labels_per_iteration
        self._done_this_phase: set[int] = set()

    def submit_ready(self) -> None:
        if self.policy.stopping:
            super().submit_ready()  # drain and finish exactly as the coordinator does
            return
        for _ in PHASES:  # a phase with nothing to do hands over at once
            if not self._advance_phase():
                return
            self._next_phase()

    def _next_phase(self) -> None:
        self.phase = PHASES[(PHASES.index(self.phase) + 1) % len(PHASES)]
        self._done_this_phase = set()
        if self.phase == "label":
            self.iterations += 1
            self._quota = self.labels_per_iteration
        logger.info("serial loop: iteration %d, %s", self.iterations, self.phase)

    def _advance_phase(self) -> bool:
        """Submit what the current phase still needs; True when the phase is over."""
        return {"label": self._label, "train": self._train, "generate": self._generate}[
            self.phase
        ]()

    def _label(self) -> bool:
        self._quota -= self.oracle.submit_labels(quota=self._quota, paced=False)
        return self.engine.busy("oracle") == 0

    def _train(self) -> bool:
        engine, state = self.engine, self.state
        snapshot = state.train_snapshot
        if snapshot is None:
            return engine.busy("train") == 0
        for member in state.members:
            if member.index in self._done_this_phase or not engine.free("train"):
                continue
            self._done_this_phase.add(member.index)
            self.training.submit_member(member, snapshot)
        if engine.busy("train") or len(self._done_this_phase) < len(state.members):
            return False
        version = state.version
        if version is not None and state.test_ready and state.evaluated_version < version.number:
            self.inference.submit_evaluation()  # evaluation only, no re-scoring
            return False
        return engine.busy("infer") == 0

    def _generate(self) -> bool:
        version = self.state.version
        if version is None:
            return True
        groups = self.generator.walker_groups()
        for number, group in enumerate(groups):
            if number in self._done_this_phase or not self.engine.free("generator"):
                continue
            self._done_this_phase.add(number)
            self.generator.submit_group(group, version)
        return self.engine.busy("generator") == 0 and len(self._done_this_phase) == len(groups)
