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
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from palflow.apps.contracts import FailureKind
from palflow.apps.data.dataset import read_arrays, read_dataset, write_dataset
from palflow.pipeline.config.settings import Campaign
from palflow.pipeline.policies.selection import Candidate, OracleQueue
from palflow.pipeline.state.campaign_state import CampaignState, Member, Version, Walker, is_initial
from palflow.pipeline.state.rundir import QUEUE_FILE, RunDirectory

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


class Journal:
    """Saves the coordinator's bookkeeping, throttled, and restores it on resume."""

    def __init__(self, run: RunDirectory, min_interval_s: float = 1.0) -> None:
        self.run = run
        self.min_interval_s = min_interval_s
        self._last_save = 0.0

    def save(
        self, state: CampaignState, queue: OracleQueue, next_task_id: int, force: bool = False
    ) -> None:
        """Write ``state.json`` and ``state.queue.npz``, at most once per interval."""
        now = time.time()
        if not force and now - self._last_save < self.min_interval_s:
            return
        self._last_save = now
        queued = queue.candidates()
        write_dataset(
            self.run.file(QUEUE_FILE), [c.atoms for c in queued], extra=candidate_arrays(queued)
        )
        self.run.write_state(
            {
                "elapsed_s": now - state.t0,
                "last_candidate_id": state.last_candidate_id,
                "next_task_id": next_task_id,
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


def retry_allowed(candidate: Candidate, reason: str, campaign: Campaign) -> bool:
    """Whether a failed structure gets another oracle attempt."""
    transient = FailureKind.of(reason).transient
    return transient and candidate.attempts + 1 < campaign.oracle.max_attempts


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


def resume_state(campaign: Campaign, run: RunDirectory) -> tuple[CampaignState, OracleQueue, int]:
    """Rebuild a campaign's state from its run directory.

    Returns
    -------
    tuple
        The state, the oracle queue, and the next free task id.
    """
    from ase.io import read
    from palflow.pipeline.resume.mend import highest_task_id, mend_run

    if not getattr(run, "mended", False):
        mend_run(campaign, run)  # every file read below is checked first
    saved: dict[str, Any] = run.read_state()
    start_path = run.start_structure
    state = CampaignState(
        campaign=campaign,
        run=run,
        start=read(start_path),
        start_path=start_path,
        walkers=[Walker(**_own(run, w, "start_path", "home")) for w in saved.get("walkers", [])]
        or [Walker(i, start_path) for i in range(campaign.generator.n_walkers)],
        members=[Member(**_own(run, m, "checkpoint")) for m in saved.get("members", [])]
        or [Member(i) for i in range(campaign.model.n_members)],
    )
    state.t0 = time.time() - saved.get("elapsed_s", _elapsed_from_events(run))
    state.versions = [Version(**_own(run, v, "path")) for v in saved.get("versions", [])]
    state.test_errors = saved.get("test_errors", [])
    state.failures = {int(k): v for k, v in saved.get("task_failures", {}).items()}
    state.resumes = saved.get("resumes", [])
    state.retried = Counter(saved.get("retried", {}))
    state.resolved_model = saved.get("model_spec")
    state.test_ready = Path(run.test_set).exists()
    _restore_labels(state, run)
    _restore_checkpoints(state, run)
    for walker in state.walkers:
        if not Path(walker.start_path).exists():
            walker.start_path = walker.home if Path(walker.home or "").is_file() else start_path

    queue = OracleQueue(campaign.selection.max_queue)
    seen: set[int] = set(state.label_ids)
    stored = set(state.label_ids)
    next_task_id = max(int(saved.get("next_task_id", 0)), highest_task_id(run) + 1)
    batches = run.oracle_batches()
    last_batch = {}
    for _, in_path, _ in batches:
        for candidate in read_candidates(in_path)[0]:
            last_batch[candidate.candidate_id] = in_path
    for task_id, in_path, out_path in batches:
        next_task_id = max(next_task_id, task_id + 1)
        candidates, sources = read_candidates(in_path)
        seen.update(c.candidate_id for c in candidates)
        failed: dict[int, str] = {}
        if out_path.exists():
            failed = dict(state.harvest(str(out_path), task_id)[1])
        for candidate, source in zip(candidates, sources, strict=True):
            if last_batch[candidate.candidate_id] != in_path:
                continue  # tried again in a later batch, which decides
            if candidate.candidate_id in stored:
                continue  # labelled (also when the output was lost after it was stored)
            if out_path.exists() and candidate.candidate_id not in failed:
                continue  # labelled
            reason = failed.get(candidate.candidate_id)
            if reason is not None and not retry_allowed(candidate, reason, campaign):
                state.record_failure(candidate.candidate_id, reason)
                continue
            if reason is not None:
                candidate.attempts += 1
            if source == "initial":
                state.pending_initial.append(candidate)
            else:
                queue.push(candidate)
    logger.info(
        "resume: %d candidates sent but not labelled are queued again",
        len(queue) + len(state.pending_initial),
    )
    if run.file(QUEUE_FILE).exists():
        queued, _ = read_candidates(run.file(QUEUE_FILE))
        queue.extend(c for c in queued if c.candidate_id not in seen)
        seen.update(c.candidate_id for c in queued)
    initial_ids = set(range(1, campaign.initial.n_structures + 1))
    state.pending_initial.extend(
        c for c in state.initial_candidates(campaign) if c.candidate_id not in seen
    )
    state.pending_initial.sort(key=lambda c: c.candidate_id)
    state.last_candidate_id = max(
        [saved.get("last_candidate_id", 0), *seen, *initial_ids, *state.failures]
    )
    if state.labelled:
        state.write_snapshot()
    events = run.read_events()
    next_task_id = max([next_task_id, *(e["task"] + 1 for e in events)])
    return state, queue, next_task_id


def _own(run: RunDirectory, record: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``record`` with its paths in ``keys`` moved into ``run``: a run directory that
    was moved or copied reads its own files, not those of where it was."""
    return {k: run.own(v) if k in keys and v else v for k, v in record.items()}


def _elapsed_from_events(run: RunDirectory) -> float:
    events = run.read_events()
    if not events:
        return 0.0
    return max(e["returned"] for e in events) - min(e["submitted"] for e in events)


def _restore_labels(state: CampaignState, run: RunDirectory) -> None:
    if not run.labels_db.exists():
        return
    for row in run.labels().select(sort="id"):
        state.labelled.append(row.toatoms())
        state.label_ids.append(int(row.candidate_id))
        if is_initial(row.source):
            state.n_labels_initial += 1
        else:
            state.n_labels_active += 1
            state.active_by_system[row.get("system", "")] += 1


def _restore_checkpoints(state: CampaignState, run: RunDirectory) -> None:
    """Take each member's newest checkpoint on disk and every published version."""
    for member in state.members:
        if member.checkpoint and not Path(member.checkpoint).exists():
            member.checkpoint = None  # moved aside as damaged: its older copy is found below
        found = run.member_checkpoints(member.index)
        if found:
            task, path = found[-1]
            member.checkpoint = str(path)
            member.tasks = task + 1
    # The newest versions whose files were moved aside as damaged are published again
    # under their numbers; their held-out errors go with them.
    while state.versions and not Path(run.ensemble(state.versions[-1].number)).exists():
        state.versions.pop()
    known = {v.number for v in state.versions}
    for number, path in run.ensembles():
        if number not in known:
            # Published after the last save: its label count and time are not known
            # exactly; the current ones are an upper bound.
            state.versions.append(
                Version(number, str(path), state.n_labels_active, time.time() - state.t0)
            )
    state.versions.sort(key=lambda v: v.number)
    newest = state.versions[-1].number if state.versions else 0
    state.test_errors = [e for e in state.test_errors if e["version"] <= newest]
    state.evaluated_version = max((e["version"] for e in state.test_errors), default=0)
