"""Rebuilding a campaign's state from its run directory, on ``--resume``.

:func:`resume_state` mends the run first (:mod:`palflow.pipeline.resume.mend`), then
reads back what the journal (:mod:`palflow.pipeline.resume.journal`) saved:
``state.json`` for the bookkeeping, ``labels.db`` for the labels, the checkpoints
on disk for the members and versions, and the oracle's batches for what was sent
but not labelled, which is queued again.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ase.io import read

from palflow.pipeline.config.settings import Campaign
from palflow.pipeline.policies.selection import Candidate, OracleQueue, retry_allowed
from palflow.pipeline.resume.journal import read_candidates
from palflow.pipeline.resume.mend import mend_run
from palflow.pipeline.resume.mend_base import highest_task_id
from palflow.pipeline.state.campaign_state import CampaignState
from palflow.pipeline.state.records import Member, Version, Walker
from palflow.pipeline.state.rundir import QUEUE_FILE, RunDirectory

logger = logging.getLogger(__name__)


def resume_state(campaign: Campaign, run: RunDirectory) -> tuple[CampaignState, OracleQueue, int]:
    """Rebuild a campaign's state from its run directory.

    Returns
    -------
    tuple
        The state, the oracle queue, and the next free task id.
    """
    if not getattr(run, "mended", False):
        mend_run(campaign, run)  # every file read below is checked first
    saved: dict[str, Any] = run.read_state()
    state = saved_state(campaign, run, saved)
    state.restore_labels()
    _restore_checkpoints(state, run)
    for walker in state.walkers:
        if not Path(walker.start_path).exists():
            walker.start_path = (
                walker.home if Path(walker.home or "").is_file() else state.start_path
            )

    queue = OracleQueue(campaign.selection.max_queue)
    next_task_id = max(int(saved.get("next_task_id", 0)), highest_task_id(run) + 1)
    # Batches below the saved mark were harvested before the save; after a mend of the
    # labels, the oracle's files, the queue or state.json, or without a mark (a run of
    # an earlier version), every batch is read again.
    journal_mended = getattr(run, "journal_mended", False)
    settled = 0 if journal_mended else int(saved.get("oracle_settled_below", 0))
    seen, next_task_id = _requeue_unlabelled(campaign, run, state, queue, next_task_id, settled)
    logger.info(
        "resume: %d candidates sent but not labelled are queued again",
        len(queue) + len(state.pending_initial),
    )
    _restore_queue(run, queue, seen)
    initial_ids = set(range(1, campaign.initial.n_structures + 1))
    state.pending_initial.extend(
        c for c in state.initial_candidates(campaign) if c.candidate_id not in seen
    )
    state.pending_initial.sort(key=lambda c: c.candidate_id)
    state.last_candidate_id = max(
        [saved.get("last_candidate_id", 0), *seen, *initial_ids, *state.failures]
    )
    _queue_validation_failures(run, state, queue)
    state.write_snapshot()
    events = run.read_events()
    next_task_id = max([next_task_id, *(e["task"] + 1 for e in events)])
    return state, queue, next_task_id


def _queue_validation_failures(run: RunDirectory, state: CampaignState, queue: OracleQueue) -> None:
    """The frames just before a failed MD check (``palflow validate``) join the oracle
    queue ahead of everything, once: a failed check becomes labels on the resume. Each
    file is renamed ``*.failures.queued.extxyz`` once its frames are queued."""
    for path in sorted(run.root.glob("validate/*.failures.extxyz")):
        frames = read(path, index=":") if path.stat().st_size else []
        system = path.name.removesuffix(".failures.extxyz").rsplit(".", 1)[0]
        for atoms in frames:
            spread = float(atoms.info.get("force_spread", 0.0))
            atoms.info = {}
            queue.push(
                Candidate(
                    state.new_candidate_id(), atoms, spread, 0.0, 0, priority=math.inf,
                    system=system,
                )
            )  # fmt: skip
        path.rename(path.with_name(path.name.replace(".failures.", ".failures.queued.")))
        if frames:
            logger.info(
                "resume: %d frames of a failed MD check queued (%s)", len(frames), path.name
            )


def saved_state(campaign: Campaign, run: RunDirectory, saved: dict[str, Any]) -> CampaignState:
    """The state as ``state.json`` saved it (``saved``), its paths in ``run``; with no
    saved walkers or members, fresh ones."""
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
    return state


def _requeue_unlabelled(
    campaign: Campaign,
    run: RunDirectory,
    state: CampaignState,
    queue: OracleQueue,
    next_task_id: int,
    settled: int = 0,
) -> tuple[set[int], int]:
    """Harvest every oracle result not yet stored, and queue again each candidate that
    was sent but not labelled (or failed with an attempt left); only the batches from
    task ``settled`` on are read (those below were harvested, see
    :meth:`~palflow.pipeline.resume.journal.Journal.save`).

    Returns
    -------
    tuple
        The candidate ids labelled, given up, or seen in the oracle's inputs read, and
        the next free task id.
    """
    seen: set[int] = set(state.labelled_ids) | set(state.failures)
    stored = set(state.labelled_ids)
    batches = run.oracle_batches()
    if batches:
        next_task_id = max(next_task_id, batches[-1][0] + 1)
    batches = [batch for batch in batches if batch[0] >= settled]
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
            _requeue(campaign, state, queue, candidate, source, failed.get(candidate.candidate_id))
    return seen, next_task_id


def _requeue(
    campaign: Campaign,
    state: CampaignState,
    queue: OracleQueue,
    candidate: Candidate,
    source: str,
    reason: str | None,
) -> None:
    """Queue a candidate again, unless it failed (``reason``) with no attempt left."""
    if reason is not None and not retry_allowed(candidate, reason, campaign.oracle.max_attempts):
        state.record_failure(candidate.candidate_id, reason)
        return
    if reason is not None:
        candidate.attempts += 1
    if source == "initial":
        state.pending_initial.append(candidate)
    else:
        queue.push(candidate)


def _restore_queue(run: RunDirectory, queue: OracleQueue, seen: set[int]) -> None:
    """Put back the saved oracle queue's candidates that were not sent."""
    if run.file(QUEUE_FILE).exists():
        queued, _ = read_candidates(run.file(QUEUE_FILE))
        queue.extend(c for c in queued if c.candidate_id not in seen)
        seen.update(c.candidate_id for c in queued)


def _own(run: RunDirectory, record: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``record`` with its paths in ``keys`` moved into ``run``: a run directory that
    was moved or copied reads its own files, not those of where it was."""
    return {k: run.own(v) if k in keys and v else v for k, v in record.items()}


def _elapsed_from_events(run: RunDirectory) -> float:
    events = run.read_events()
    if not events:
        return 0.0
    return max(e["returned"] for e in events) - min(e["submitted"] for e in events)


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
    state.evaluated_version = max((e["version"] for e in state.test_errors), default=-1)
