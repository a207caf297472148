"""What survives a kill of the coordinator, and how a run picks it up again.

Labels are journalled by the oracle itself: a finished batch is an atomically
written ``oracle/batchNNNNNN.out.npz``, beside the ``.in.npz`` that says what was
asked (candidate ids, their source and scores). ``labels.db`` is filled from those
files in one SQLite transaction per batch, so on resume:

* an output not yet in ``labels.db`` (it finished while the coordinator was down)
  is harvested, never recomputed;
* an input without an output (selected, sent, not labelled) is queued again;
* a candidate id already in ``labels.db`` is never stored twice.

The rest of the coordinator's bookkeeping (elapsed time, members, walkers, test
errors, the oracle queue) goes to ``state.json`` and ``state.queue.npz`` at most
once a second and at the end. What the last second added to the queue may be lost
in a kill; those are unlabelled MD frames, which the walkers make again.

This module writes the journal (:class:`Journal`) and the candidate files;
:mod:`palflow.pipeline.resume.restore` reads it all back on ``--resume``, after
:mod:`palflow.pipeline.resume.mend` has checked every file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from palflow.apps.data.dataset import read_arrays, read_dataset, write_dataset
from palflow.pipeline.policies.selection import Candidate, OracleQueue
from palflow.pipeline.state.campaign_state import CampaignState
from palflow.pipeline.state.rundir import QUEUE_FILE, RunDirectory

if TYPE_CHECKING:
    from palflow.pipeline.engine.core import Engine

logger = logging.getLogger(__name__)


def candidate_arrays(candidates: list[Candidate], source: str | None = None) -> dict:
    """The per-candidate arrays stored beside their structures."""
    arrays = {
        "candidate_id": np.array([c.candidate_id for c in candidates], dtype=np.int64),
        "force_disagreement": np.array([c.force_disagreement for c in candidates], dtype=float),
        "energy_disagreement": np.array([c.energy_disagreement for c in candidates], dtype=float),
        "version": np.array([c.version for c in candidates], dtype=np.int64),
        "attempts": np.array([c.attempts for c in candidates], dtype=np.int64),
        "priority": np.array(
            [np.nan if c.priority is None else c.priority for c in candidates], dtype=float
        ),
        "system": np.array([c.system for c in candidates], dtype=str).reshape(len(candidates)),
    }
    if source is not None:
        arrays["source"] = np.array([source] * len(candidates), dtype=str)
    return arrays


def read_candidates(path: str | Path) -> tuple[list[Candidate], list[str]]:
    """Candidates stored with :func:`candidate_arrays`, and their sources."""
    arrays = read_arrays(path)
    structures = read_dataset(path)
    n = len(structures)
    forces = arrays.get("force_disagreement", np.full(n, np.inf))
    energies = arrays.get("energy_disagreement", np.zeros(n))
    versions = arrays.get("version", np.zeros(n, dtype=int))
    attempts = arrays.get("attempts", np.zeros(n, dtype=int))
    priorities = arrays.get("priority", np.full(n, np.nan))
    sources = [str(s) for s in arrays.get("source", np.array(["active"] * n))]
    systems = [str(s) for s in arrays.get("system", np.array([""] * n))]
    candidates = [
        Candidate(
            int(i), atoms, float(f), float(e), int(v), int(a), None if np.isnan(p) else p, system
        )
        for i, atoms, f, e, v, a, p, system in zip(
            arrays["candidate_id"],
            structures,
            forces,
            energies,
            versions,
            attempts,
            priorities.astype(float),
            systems,
            strict=True,
        )
    ]
    return candidates, sources


MAX_SHARE = 20
"""The journal waits at least this many times its last save's duration before the
next save."""


class Journal:
    """Saves the coordinator's bookkeeping, throttled, and restores it on resume."""

    def __init__(self, run: RunDirectory, min_interval_s: float = 1.0) -> None:
        self.run = run
        self.min_interval_s = min_interval_s
        self._last_save = 0.0
        self._interval_s = min_interval_s

    def save(
        self, state: CampaignState, queue: OracleQueue, engine: Engine, force: bool = False
    ) -> None:
        """Write ``state.json`` and ``state.queue.npz``, at most once per interval.

        ``oracle_settled_below`` is the lowest task id of an oracle batch still in
        flight (or the next task id): every batch below it was harvested, and what
        failed in it is in the queue saved with it, so a resume reads only the
        batches from it on (:mod:`palflow.pipeline.resume.restore`).
        """
        now = time.time()
        if not force and now - self._last_save < self._interval_s:
            return
        self._last_save, began = now, time.perf_counter()
        next_task_id = engine.next_task_id
        in_flight = [task.task_id for task in engine.tasks("label")]
        queued = queue.candidates()
        write_dataset(
            self.run.file(QUEUE_FILE), [c.atoms for c in queued], extra=candidate_arrays(queued)
        )
        self.run.write_state(
            {
                "elapsed_s": now - state.t0,
                "last_candidate_id": state.last_candidate_id,
                "next_task_id": next_task_id,
                "oracle_settled_below": min(in_flight, default=next_task_id),
                "members": [{**asdict(m), "busy": False} for m in state.members],
                "walkers": [{**asdict(w), "busy": False} for w in state.walkers],
                "versions": [asdict(v) for v in state.versions],
                "test_errors": state.test_errors,
                "task_failures": {str(k): v for k, v in state.failures.items()},
                "resumes": state.resumes,
                "retried": dict(state.retried),
                "model_spec": state.resolved_model,
            },
        )
        # Saving costs more as the queue and the versions grow: at most a twentieth of
        # the coordinator's time goes to it (never less often than once a minute).
        spent = time.perf_counter() - began
        self._interval_s = min(max(self.min_interval_s, MAX_SHARE * spent), 60.0)


def labelled_ids_in_results(run: RunDirectory) -> set[int]:
    """Candidate ids the oracle labelled successfully, from its result files alone."""
    ids: set[int] = set()
    for _, _, path in run.oracle_batches():
        if not path.exists():
            continue
        arrays = read_arrays(path)
        ids.update(
            int(i)
            for i, s in zip(arrays["candidate_id"], arrays["status"], strict=True)
            if s == "ok"
        )
    return ids
