"""The formats of a run's files: JSON lines, JSON values, and the labels database.

:mod:`palflow.pipeline.state.rundir` names every file of a run and calls these to
read and write them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def one_per_task(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines of ``events.jsonl``, one per task: a task whose result could not be
    used has two (its result, then its failure), merged here with the last one's
    values winning. Lines without a task id are kept as they are."""
    merged: dict[Any, dict[str, Any]] = {}
    for number, event in enumerate(events):
        key = event.get("task", ("line", number))
        merged[key] = {**merged.get(key, {}), **event}
    return list(merged.values())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, none when it is missing; torn or damaged
    lines are skipped, with one warning."""
    if not path.exists():
        return []
    records, skipped = [], 0
    for line in path.read_bytes().decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            skipped += 1
    if skipped:
        logger.warning("skipping %d torn or damaged line(s) in %s", skipped, path)
    return records


def open_labels(path: str | os.PathLike):
    """An ASE database of labels, without ASE's lock file.

    ASE guards writes with a ``.lock`` file that it creates and deletes; a process
    killed between the two leaves it behind, and every later writer waits for it
    forever. SQLite locks its own transactions, and the run directory's flock keeps
    a second coordinator away, so the lock file only adds that failure.
    """
    from ase.db import connect

    return connect(path, use_lock_file=False)


def export_extxyz(database, path: Path) -> None:
    """Write every row of the labels ``database`` to the extended XYZ file ``path``,
    atomically."""
    from ase.io import write

    rows = [row.toatoms(add_additional_information=False) for row in database.select()]
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp, rows, format="extxyz")
    os.replace(tmp, path)


def jsonable(value: Any) -> Any:
    """Turn NumPy scalars and arrays into JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
