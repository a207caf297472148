"""The records a campaign keeps: walkers, ensemble members, published versions,
training snapshots, and which label sources count as initial.

They are plain dataclasses, saved as they are in ``state.json``
(:mod:`palflow.pipeline.resume.journal`) and checked on resume
(:mod:`palflow.pipeline.resume.mend_state`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any


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
    held_back: bool = False
    """The validation gate kept its newest state from publication
    (:mod:`palflow.apps.publication`): its checkpoint publishes its last good state."""
    validation: dict | None = None
    """Its published state's validation errors (``force_mae``, ``energy_mae_per_atom``)
    and frame count (``n``), as its latest task measured them."""
    train_loss: float | None = None
    """Its latest task's mean loss over the last epoch on its training frames (None
    when the task reported none)."""

    def advance(
        self, checkpoint: str, labels: int, epochs: int, result: dict | None = None
    ) -> None:
        """Move to a newer checkpoint; the older one is in a stacked version already.
        ``result``: the training task's result, for what the validation gate decided."""
        previous, self.checkpoint = self.checkpoint, checkpoint
        self.trained_on, self.epochs, self.fresh = labels, epochs, True
        result = result or {}
        self.held_back = not result.get("published", True)
        self.validation = {
            "force_mae": result.get("val_force_mae"),
            "energy_mae_per_atom": result.get("val_energy_mae"),
            "n": int(result.get("n_validation") or 0),
        }
        loss = result.get("train_loss")
        self.train_loss = float(loss) if loss is not None and math.isfinite(loss) else None
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
    held_back: int = 0
    """Members whose newest state the validation gate kept out of this version."""
    val_force_mae: float | None = None
    """The members' mean validation force MAE (eV/Å), each on its own validation
    frames; None when some member's gate did not measure one."""
    val_energy_mae_per_atom: float | None = None
    """The same of the energy per atom (eV/atom)."""
    n_validation: int = 0
    """The fewest validation frames any member was judged on."""
    exploration: dict[str, dict[str, Any]] | None = None
    """Per system, the exploration ratios when it was published
    (:meth:`palflow.pipeline.engine.convergence.ExplorationTally.ratios`)."""


@dataclass(frozen=True)
class Snapshot:
    """A training snapshot: the labels one training task sees, as selections of the
    label log's rows (:meth:`palflow.apps.data.label_log.LabelLog.selection`)."""

    train: dict
    valid: dict | None
    """None when the rows hold no validation label."""
    n_labels: int


INITIAL_SOURCES = ("initial", "file")
"""Sources of labels that count as initial, not against the active-label budget: the
rattled start structures, and a warm start's file (:mod:`palflow.pipeline.resume.warm_start`)."""


def is_initial(source: str) -> bool:
    """Whether a label of ``source`` is initial (not counted against the budget)."""
    return source in INITIAL_SOURCES
