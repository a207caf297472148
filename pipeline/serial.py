"""The serial active-learning loop, built from the same apps and handlers.

Label, then train, then generate and select, in turn, each phase waiting for the
last: the loop palflow exists to beat, kept here so that benchmarks compare the two
on the very same work. One iteration:

1. **label** up to ``labels_per_iteration`` candidates (the initial structures in
   the first), ``slots["oracle"]`` batches at a time;
2. **train** every member for one task, then evaluate the new ensemble version;
3. **generate**: one MD segment per walker, in the coordinator's groups; the frames
   they select are the next iteration's candidates.

Only the order of submission differs from :class:`~pipeline.coordinator.Coordinator`;
stopping, bookkeeping and files are the same.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.coordinator import Coordinator

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
        As for :class:`~pipeline.coordinator.Coordinator`.
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

    def _submit_ready(self) -> None:
        if self.state.stop_reason is not None:
            super()._submit_ready()  # drain and finish exactly as the coordinator does
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
        batch_size = self.campaign.oracle.batch_size
        while self._free("oracle"):
            if self.state.pending_initial:
                batch = self.state.pending_initial[:batch_size]
                del self.state.pending_initial[:batch_size]
                self._submit_label_batch(batch, "initial")
                continue
            room = min(self._quota, self.state.label_room(self.campaign, self._labels_in_flight()))
            if room <= 0 or not self.queue:
                break
            batch = self.selector.pick_batch(self.queue, min(batch_size, room))
            self._quota -= len(batch)
            self._submit_label_batch(batch, "active")
        return self._busy("oracle") == 0

    def _train(self) -> bool:
        snapshot = self.state.train_snapshot
        if snapshot is None:
            return self._busy("train") == 0
        for member in self.state.members:
            if member.index in self._done_this_phase or not self._free("train"):
                continue
            self._done_this_phase.add(member.index)
            self._submit_member(member, snapshot)
        if self._busy("train") or len(self._done_this_phase) < len(self.state.members):
            return False
        version = self.state.version
        if (
            version is not None
            and self.state.test_ready
            and self.state.evaluated_version < version.number
        ):
            if self._free("infer"):
                self._submit_inference(stopping=True)  # evaluation only, no re-scoring
            return False
        return self._busy("infer") == 0

    def _generate(self) -> bool:
        version = self.state.version
        if version is None:
            return True
        groups = self._walker_groups()
        for number, group in enumerate(groups):
            if number in self._done_this_phase or not self._free("generator"):
                continue
            self._done_this_phase.add(number)
            self._submit_walker_group(group, version)
        return self._busy("generator") == 0 and len(self._done_this_phase) == len(groups)
