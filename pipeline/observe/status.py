"""``palflow status``: what a run has done, from its files alone.

It reads a run directory while a coordinator may be writing it: it never holds the
run's lock (:meth:`~palflow.pipeline.state.rundir.RunDirectory.is_locked` only tests
it) and writes nothing; a missing or torn file counts as not written yet. The state
and its reason are the report's too (:func:`~palflow.pipeline.observe.run_data.run_outcome`).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

from palflow.apps.contracts import MODULES, failure_counts
from palflow.pipeline.observe.run_data import run_outcome
from palflow.pipeline.state.run_files import one_per_task
from palflow.pipeline.state.rundir import (
    CAMPAIGN_FILE,
    LABELS_DB,
    METRICS_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    RunDirectory,
)

logger = logging.getLogger(__name__)


def run_status_facts(root: str | Path) -> dict[str, Any]:
    """What a run has done so far, from its files alone.

    Parameters
    ----------
    root
        The run directory; it may be running, stopped, killed or not started.

    Returns
    -------
    dict
        ``state`` is ``running``, ``finished`` or ``failed`` (``stop_reason`` says
        why, whole), ``stopped early`` (killed or crashed, no summary) or ``not
        started``; the
        label counts, the oracle failures by kind, the ensemble versions, the latest
        test force MAE (eV/Å), the elapsed wall time (s) and the finished tasks per
        module (and how many of them failed).

    Raises
    ------
    RunDirectoryError
        When ``root`` is not a run directory.
    """
    run = RunDirectory.open(root)  # reading only: no lock
    campaign = run.read_json(CAMPAIGN_FILE) or {}
    summary = run.read_json(SUMMARY_FILE) or {}
    state = run.read_state()
    events = run.read_events()
    state_name, reason = run_state(run, state, events)
    active, initial = count_labels(run)
    if active is None:  # labels.db unreadable this instant: the last counts written
        active, initial = summary.get("labels"), summary.get("initial_labels")
    reasons = state.get("task_failures", {}).values()
    failures = failure_counts(reasons) if state else summary.get("oracle_failures_by_kind", {})
    ensembles = run.ensembles()
    rows = run.read_jsonl(METRICS_FILE) or state.get("test_errors", [])
    newest = max(rows, key=lambda e: e.get("version", 0), default={})
    tested = [e for e in rows if e.get("force_mae") is not None]
    latest = max(tested, key=lambda e: e.get("version", 0), default={})
    stop, test = campaign.get("stop", {}), campaign.get("test", {})
    return {
        "run_dir": str(run.root),
        "campaign": campaign.get("name", run.root.name),
        "state": state_name,
        "stop_reason": reason,
        "labels": {"active": active, "initial": initial, "budget": stop.get("max_labels")},
        "oracle_failures": {"total": sum(failures.values()), "by_kind": failures},
        "ensemble_versions": len(ensembles),
        "newest_ensemble": str(ensembles[-1][1]) if ensembles else None,
        "test_force_mae": latest.get("force_mae"),
        "test_force_mae_at": {"version": latest.get("version"), "labels": latest.get("labels")},
        "has_test_set": bool(test.get("file")) or test.get("n_structures", 1) > 0,
        "validation_force_mae": newest.get("validation_force_mae"),
        "exploration": newest.get("exploration"),
        "elapsed_s": elapsed_s(run, summary, state, state_name),
        "wall_budget_s": stop.get("max_wall_s"),
        "tasks": tasks_by_module(events),
    }


def run_state(run, state: dict, events: list[dict]) -> tuple[str, str | None]:
    """``running``, ``finished``, ``failed``, ``stopped early`` or ``not started``, and
    the whole reason of a run that has ended (the report says the same:
    :func:`~palflow.pipeline.observe.run_data.run_outcome`)."""
    status, reason = run_outcome(run.root)
    if status in ("running", "finished", "failed"):
        return status, reason
    return ("stopped early" if state or events else "not started"), None


def tasks_by_module(events: list[dict]) -> dict[str, dict[str, int]]:
    """Finished tasks per module, and how many of them failed (a task whose result
    could not be used counts once, as failed)."""

    events = one_per_task(events)
    finished = Counter(e["module"] for e in events if "module" in e)
    failed = Counter(e["module"] for e in events if "module" in e and not e.get("ok"))
    return {
        module: {"finished": finished[module], "failed": failed[module]}
        for module in sorted(finished, key=_module_order)
    }


def count_labels(run) -> tuple[int | None, int | None]:
    """Active and initial labels in ``labels.db`` (``source`` of each row); zeros
    before it exists, and ``(None, None)`` when it cannot be read now."""
    path = run.file(LABELS_DB)
    # ASE creates the tables of an empty file: never hand it one, or this reader
    # would write to the run.
    if not path.exists() or path.stat().st_size == 0:
        return 0, 0
    try:
        with run.labels() as database:
            return database.count(source="active"), database.count(source="initial")
    except (sqlite3.Error, OSError) as error:
        logger.warning("could not read %s: %s", path, error)
        return None, None


def elapsed_s(run, summary: dict, state: dict, state_name: str) -> float | None:
    """Wall time of the campaign (s): the summary's once stopped; while running, the
    last saved state's plus the time since it was saved."""
    if state_name in ("finished", "failed") and "wall_s" in summary:
        return summary["wall_s"]
    if "elapsed_s" not in state:
        return None
    elapsed = state["elapsed_s"]
    if state_name == "running":
        try:
            elapsed += max(0.0, time.time() - run.file(STATE_FILE).stat().st_mtime)
        except OSError:
            pass
    return elapsed


def format_status(facts: dict[str, Any]) -> str:
    """The facts of :func:`run_status_facts` as aligned ``name: value`` lines."""
    labels, failures = facts["labels"], facts["oracle_failures"]
    state = facts["state"]
    if facts["stop_reason"]:
        state += f": {facts['stop_reason']}"
    elif state == "stopped early":
        state += " (killed or crashed; continue it: palflow run --site SITE --resume RUN_DIR)"
    budget = f" of {labels['budget']}" if labels["budget"] is not None else ""
    by_kind = ", ".join(f"{k} {n}" for k, n in sorted(failures["by_kind"].items()))
    mae = "-"
    if facts["test_force_mae"] is not None:
        at = facts["test_force_mae_at"]
        mae = f"{facts['test_force_mae']:.4f} eV/Å (version {at['version']}, {at['labels']} labels)"
    elif not facts.get("has_test_set", True):
        mae = "none: no held-out set (test.n_structures = 0), so no independent test error"
    label_line = f"{_count(labels['active'])}{budget} active, {_count(labels['initial'])} initial"
    wall = "-" if facts["elapsed_s"] is None else _clock(facts["elapsed_s"])
    if facts["wall_budget_s"] is not None:
        wall += f" of {_clock(facts['wall_budget_s'])}"
    tasks = ", ".join(
        f"{module} {n['finished']}" + (f" ({n['failed']} failed)" if n["failed"] else "")
        for module, n in facts["tasks"].items()
    )
    rows = [
        ("run", facts["run_dir"]),
        ("campaign", facts["campaign"]),
        ("state", state),
        ("labels", label_line),
        ("oracle failures", f"{failures['total']}" + (f" ({by_kind})" if by_kind else "")),
        ("ensemble versions", str(facts["ensemble_versions"])),
        ("test force MAE", mae),
        *_convergence_rows(facts),
        ("elapsed", wall),
        ("tasks finished", tasks or "none yet"),
    ]
    return "\n".join(f"{name + ':':<19}{value}" for name, value in rows)


def _convergence_rows(facts: dict[str, Any]) -> list[tuple[str, str]]:
    """The validation error and the exploration ratios, where the run records them."""
    rows = []
    if facts.get("validation_force_mae") is not None:
        rows.append(("validation MAE", f"{facts['validation_force_mae']:.4f} eV/Å (ensemble)"))
    ratios = facts.get("exploration") or {}
    shares = [
        f"{name} {r['accurate']:.2f} accurate, {r['candidate']:.2f} candidate, "
        f"{r['failed']:.2f} failed ({r['segments']} segments)"
        for name, r in ratios.items()
        if r.get("accurate") is not None
    ]
    if shares:
        rows.append(("exploration", "; ".join(shares)))
    return rows


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _module_order(module: str) -> int:

    return MODULES.index(module) if module in MODULES else len(MODULES)
