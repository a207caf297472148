"""What every mend shares: moving a damaged file aside, recording the mend, and
saying what is wrong with a file (:mod:`palflow.pipeline.resume.mend` and
:mod:`palflow.pipeline.resume.mend_state` mend with these)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ase.io import read

from palflow.apps.data.dataset import read_arrays, structures_from_arrays
from palflow.pipeline.state.rundir import RunDirectory, RunDirectoryError

logger = logging.getLogger(__name__)

DAMAGED = "damaged"
"""Where damaged files go, under the run directory."""


def move_aside(run: RunDirectory, path: str | Path) -> Path:
    """Move a damaged file to ``RUN/damaged/`` under its relative path; never over
    an earlier one."""
    path = Path(path)
    target = run.root / DAMAGED / path.relative_to(run.root)
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while target.exists():
        target = target.with_name(f"{path.name}.{n}")
        n += 1
    shutil.move(str(path), str(target))
    return target


def record_mend(run: RunDirectory, mends: list[str], path: Path | None, what: str) -> None:
    """Move ``path`` aside (when given) and log the mend ``what``."""
    if path is not None and path.exists():
        where = move_aside(run, path).relative_to(run.root)
        what = f"{what} (the damaged file is kept as {where})"
    logger.warning("resume mends the run: %s", what)
    mends.append(what)


def name_problem(path: Path, run: RunDirectory, problem: str, fix: str) -> RunDirectoryError:
    return RunDirectoryError(f"{path.relative_to(run.root)} in {run.root} {problem}: {fix}")


def why(error: BaseException) -> str:
    """``error`` in one short line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 80 else line[:77].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def structure_problem(path: Path) -> str | None:
    """None when ``path`` is one readable structure with atoms; else why not."""
    if not path.exists():
        return "is missing"
    try:
        atoms = read(path)
    except Exception as error:
        return f"does not read ({why(error)})"
    return None if len(atoms) else "holds no atoms"


def dataset_problem(path: Path, *keys: str) -> str | None:
    """None when ``path`` is a readable dataset holding ``keys`` per structure."""
    try:
        arrays = read_arrays(path)
        n = len(structures_from_arrays(arrays))
        for key in keys:
            if len(arrays[key]) != n:
                return f"holds {len(arrays[key])} {key} for {n} structures"
    except Exception as error:
        return f"does not read ({why(error)})"
    return None


def highest_task_id(run: RunDirectory) -> int:
    """The highest task id any oracle file names, including those moved aside: a
    resume must never hand it out again."""
    ids = [-1]
    for folder in (run.root / "oracle", run.root / DAMAGED / "oracle"):
        for path in folder.glob("batch*.npz*"):
            digits = path.name[len("batch") :].split(".")[0]
            if digits.isdigit():
                ids.append(int(digits))
    return max(ids)
