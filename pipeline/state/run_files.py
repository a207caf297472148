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


def stored_candidate_ids(path: Path) -> list[int]:
    """The candidate id of each row of the labels database at ``path``, in row order,
    read with one query (no row is turned into a structure); none without it."""
    import sqlite3

    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        found = connection.execute(
            "SELECT value FROM number_key_values WHERE key = 'candidate_id' ORDER BY id"
        ).fetchall()
    return [int(value) for (value,) in found]


def export_extxyz(database, path: Path, mark: Path) -> None:
    """Write every row of the labels ``database`` to the extended XYZ file ``path``,
    in row order, appending only the rows an earlier export did not write.

    ``mark`` (a small JSON file) says how many rows and bytes the last export left in
    the file: the next one cuts the file back to those bytes (whatever a
    killed export appended after) and appends the rows after those. Without it, or
    when it does not match the file, the whole file is written again, atomically.
    """
    from ase.io import write

    try:
        done = json.loads(mark.read_text())
        rows, size = int(done["rows"]), int(done["bytes"])
        if path.stat().st_size < size:
            raise ValueError("the file is shorter than its mark")
    except (OSError, ValueError, KeyError, TypeError):
        rows, size = 0, 0
    frames = (
        row.toatoms(add_additional_information=False)
        for row in database.select(sort="id", offset=rows)
    )
    written = 0
    if rows:
        with open(path, "r+") as handle:
            handle.truncate(size)
            handle.seek(size)
            for atoms in frames:
                write(handle, atoms, format="extxyz")
                written += 1
            handle.flush()
            os.fsync(handle.fileno())
    else:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as handle:
            for atoms in frames:
                write(handle, atoms, format="extxyz")
                written += 1
        os.replace(tmp, path)
    mark.write_text(json.dumps({"rows": rows + written, "bytes": path.stat().st_size}))


def jsonable(value: Any) -> Any:
    """Turn NumPy scalars and arrays into JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
