"""The records a campaign keeps: walkers, ensemble members, published versions,
training snapshots, and which label sources count as initial.

They are plain dataclasses, saved as they are in ``state.json``
(:mod:`palflow.pipeline.resume.journal`) and checked on resume
(:mod:`palflow.pipeline.resume.mend_state`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Walker:
    """One MD walker; it moves on from its last sound frame, or resets to its home,
    its system's start configuration."""

    walker_id: int
    start_path: str
    busy: bool = False
    segments: int = 0
    resets: int = 0
    system: str = ""
    """The system it samples (empty in runs made before systems had names)."""
    home: str = ""
    """Where it resets to; empty: the campaign's start structure."""
    temperature_K: float | None = None
    """Its own temperature; None: its system's generator settings."""


@dataclass
class Member:
    """One ensemble member and the checkpoint its training has reached."""

    index: int
    checkpoint: str | None = None
    busy: bool = False
    tasks: int = 0
    epochs: int = 0
    trained_on: int = 0
    """Labels (initial and active) in the snapshot of its latest finished task."""
    fresh: bool = False
    """Advanced since the last published ensemble version."""

    def advance(self, checkpoint: str, labels: int, epochs: int) -> None:
        """Move to a newer checkpoint; the older one is in a stacked version already."""
        previous, self.checkpoint = self.checkpoint, checkpoint
        self.trained_on, self.epochs, self.fresh = labels, epochs, True
        if previous and previous != checkpoint and os.path.exists(previous):
            os.remove(previous)


@dataclass(frozen=True)
class Version:
    """A published ensemble: K member checkpoints stacked into one file."""

    number: int
    path: str
    n_labels: int
    """Active-learning labels when it was published."""
    wall_s: float


@dataclass(frozen=True)
class Snapshot:
    """A training snapshot: the labels one training task sees, as files."""

    train_path: str
    valid_path: str | None
    n_labels: int


INITIAL_SOURCES = ("initial", "file")
"""Sources of labels that count as initial, not against the active-label budget: the
rattled start structures, and a warm start's file (:mod:`palflow.pipeline.resume.warm_start`)."""


def is_initial(source: str) -> bool:
    """Whether a label of ``source`` is initial (not counted against the budget)."""
    return source in INITIAL_SOURCES
