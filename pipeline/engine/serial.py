"""The serial active-learning loop, built from the same apps and handlers.

Label, then train, then generate and select, in turn, each phase waiting for the
last: the loop palflow exists to beat, kept here so that benchmarks compare the two
on the very same work. One iteration:

1. **label** up to ``labels_per_iteration`` candidates (the initial structures in
   the first), ``slots["oracle"]`` batches at a time;
2. **train** every member until its error stops improving (a member whose
   validation force MAE has not fallen by ``improvement`` for ``patience`` tasks in
   a row is done; at most ``max_train_tasks`` tasks), as a user's serial loop
   would. While the snapshot has too few labels for a validation split (the first
   iteration, as a rule), the training loss is judged instead. Or, with
   ``train="one task"``, one task each. Then evaluate the new ensemble version;
3. **generate**: one MD segment per walker, in the coordinator's groups; the frames
   they select are the next iteration's candidates.

Only the order of submission differs from :class:`~palflow.pipeline.engine.coordinator.Coordinator`:
the loop replaces its public :meth:`~palflow.pipeline.engine.coordinator.Coordinator.submit_ready`
and calls the agents' public methods; stopping, bookkeeping and files are the same.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from palflow.pipeline.engine.coordinator import Coordinator

logger = logging.getLogger(__name__)

PHASES = ("label", "train", "generate")
TRAINING = ("plateau", "one task")


class SerialLoop(Coordinator):
    """Run a campaign one phase at a time (see the module's description).

    Parameters
    ----------
    labels_per_iteration
        Candidates labelled per iteration (N in PAL's model); by default one batch
        per oracle slot.
    train
        ``"plateau"``: each member trains until validation stops improving;
        ``"one task"``: one training task per member and iteration.
    patience, improvement, max_train_tasks
        With ``"plateau"``: a member stops after ``patience`` tasks in a row that did
        not lower its validation force MAE by the fraction ``improvement`` (its
        training loss, when its task had too few frames for validation), or after
        ``max_train_tasks`` tasks in the iteration (the summary counts these).
    *args, **kwargs
        As for :class:`~palflow.pipeline.engine.coordinator.Coordinator`.
    """

    def __init__(
        self,
        *args: Any,
        labels_per_iteration: int | None = None,
        train: str = "plateau",
        patience: int = 2,
        improvement: float = 0.01,
        max_train_tasks: int = 100,
        **kwargs: Any,
    ):
        if train not in TRAINING:
            raise ValueError(f"train={train!r}: expected one of {', '.join(TRAINING)}")
        if patience < 1 or max_train_tasks < 1 or not 0 <= improvement < 1:
            raise ValueError("patience and max_train_tasks must be >= 1, 0 <= improvement < 1")
        super().__init__(*args, **kwargs)
        self.train, self.patience, self.improvement = train, patience, improvement
        self.max_train_tasks = max_train_tasks
        self.train_tasks: dict[int, int] = {}
        """Training tasks per member in the current iteration."""
        self.train_history: list[dict[int, int]] = []
        """:attr:`train_tasks` of every finished training phase."""
        self.capped = 0
        """Member-iterations that ended at ``max_train_tasks``, not at a plateau."""
        self._best: dict[int, tuple[str, float]] = {}
        self._stale: dict[int, int] = {}
        self.phase_seconds: dict[str, list[float]] = {phase: [] for phase in PHASES}
        """Wall time of every finished phase, by phase (PAL's t_oracle, t_train, t_gen)."""
        self._phase_started: float | None = None
        self.labels_per_iteration = labels_per_iteration or (
            self.slots["oracle"] * self.campaign.oracle.batch_size
        )
        self.phase = "label"
        self.iterations = 0
        self._quota = self.labels_per_iteration
        self._done_this_phase: set[int] = set()

    def run(self) -> dict:
        """Run as the coordinator does; the summary adds ``serial``: iterations, the
        median wall time of each phase, and the training tasks per member and iteration."""
        summary = super().run()
        summary["serial"] = {
            "iterations": self.iterations,
            "train": self.train,
            "phase_s": {
                phase: statistics.median(times) if times else None
                for phase, times in self.phase_seconds.items()
            },
            "train_tasks": [list(tasks.values()) for tasks in self.train_history],
            "capped": self.capped,
        }
        return summary

    def submit_ready(self) -> None:
        if self._phase_started is None:
            self._phase_started = time.monotonic()
        if self.policy.stopping:
            super().submit_ready()  # drain and finish exactly as the coordinator does
            return
        for _ in PHASES:  # a phase with nothing to do hands over at once
            if not self._advance_phase():
                return
            self._next_phase()

    def _next_phase(self) -> None:
        if self.phase == "train":
            self.train_history.append(dict(self.train_tasks))
        now = time.monotonic()
        self.phase_seconds[self.phase].append(now - (self._phase_started or now))
        self._phase_started = now
        self.phase = PHASES[(PHASES.index(self.phase) + 1) % len(PHASES)]
        self._done_this_phase = set()
        if self.phase == "train":
            self.train_tasks, self._best, self._stale = {}, {}, {}
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
            if member.index in self._done_this_phase or member.busy:
                continue
            if not engine.free("train"):
                break
            if self._trains_on(member):
                self.train_tasks[member.index] = self.train_tasks.get(member.index, 0) + 1
                self.training.submit_member(member, snapshot)
            else:
                self._done_this_phase.add(member.index)
        if engine.busy("train") or len(self._done_this_phase) < len(state.members):
            return False
        # Members that plateau at different task counts leave the last tasks of the
        # others out of any version (one needs every member to have advanced): the
        # phase ends with a version of every member's newest checkpoint, which the
        # evaluation and the next MD then use.
        published = self.training.publish(final=True)
        if published is not None:
            logger.info(
                "serial loop: ensemble v%d published at the end of training (%d labels)",
                published.number,
                published.n_labels,
            )
        version = state.version
        if version is not None and self.inference.due(version):
            self.inference.submit_evaluation()  # evaluation only, no re-scoring
            return False
        return engine.busy("infer") == 0

    def _trains_on(self, member) -> bool:
        """Whether ``member`` needs another task this iteration; called once per
        finished task (and once before the first)."""
        tasks = self.train_tasks.get(member.index, 0)
        if tasks == 0:
            return True
        if self.train == "one task":
            return False
        if tasks >= self.max_train_tasks:
            self.capped += 1
            return False
        error = plateau_error(member)
        best = self._best.get(member.index)
        if error is not None and (
            best is None or best[0] != error[0] or error[1] < best[1] * (1 - self.improvement)
        ):
            self._best[member.index], self._stale[member.index] = error, 0
        else:
            self._stale[member.index] = self._stale.get(member.index, 0) + 1
        return self._stale[member.index] < self.patience

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


def plateau_error(member) -> tuple[str, float] | None:
    """What the plateau rule judges for ``member``: ``("validation", force MAE)``
    when its latest task measured one, else ``("training", loss)``; None when the
    task reported neither. A change of kind starts the comparison afresh."""
    error = (member.validation or {}).get("force_mae")
    if error is not None:
        return "validation", float(error)
    if member.train_loss is not None:
        return "training", member.train_loss
    return None
