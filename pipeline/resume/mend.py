"""Resume that mends or names: every file a resume reads is checked before it is read.

What the journal can rebuild is rebuilt, with a warning in the log:

* ``labels.db``: the rows that still read are kept, the oracle's results
  (``oracle/batch*.out.npz``) give back the rest, and a warm start's file the labels
  it gave;
* ``state.json``: rebuilt from the journal (walkers from the system's start
  structures and their newest MD frame, versions and held-out errors from
  ``metrics.jsonl``, members from their checkpoints);
* ``state.queue.npz``: dropped; candidates sent to the oracle are queued again from
  the oracle's inputs, and the walkers make new ones;
* an oracle output: the candidates of its input are labelled again;
* a member checkpoint: the member goes back to its previous good checkpoint, or to
  its copy in the newest readable ensemble version, or starts afresh;
* the newest ensemble version: dropped, and published again by the members;
* a walker's last MD frame, the held-out set, the start structures (from the
  campaign's ``structure`` when it still reads).

What cannot be rebuilt (``campaign.json``, an oracle input whose labels are nowhere
else, a start structure whose source is gone) is named in one
:class:`~palflow.pipeline.state.rundir.RunDirectoryError`, with the fix: exit status 2.

A damaged file is never deleted: it is moved to ``RUN/damaged/``, under its own
relative path, for a post-mortem.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from ase.io import read, write

from palflow.apps.data.dataset import read_arrays
from palflow.pipeline.resume import mend_state, warm_start
from palflow.pipeline.resume.journal import read_candidates
from palflow.pipeline.resume.mend_base import (
    DAMAGED,
    dataset_problem,
    move_aside,
    name_problem,
    record_mend,
    structure_problem,
    why,
)
from palflow.pipeline.resume.mend_labels import CheckedFiles, mend_label_log
from palflow.pipeline.state.rundir import (
    EVENTS_FILE,
    LABELS_EXPORTED,
    METRICS_FILE,
    QUEUE_FILE,
    SUBDIRECTORIES,
    RunDirectory,
)
from palflow.pipeline.state.structures import load_start_structures

logger = logging.getLogger(__name__)


def mend_run(campaign: Any, run: RunDirectory) -> list[str]:
    """Check every file a resume of ``run`` reads; rebuild or name what is damaged.

    Call it with the run directory locked, before
    :func:`palflow.pipeline.resume.restore.resume_state`.

    Returns
    -------
    list
        One line per mend (each also logged as a warning).

    Raises
    ------
    RunDirectoryError
        Naming the file that cannot be rebuilt, and the fix.
    """
    mends: list[str] = []
    for folder in SUBDIRECTORIES:  # a folder deleted by hand: its files are mended below
        if not (run.root / folder).is_dir():
            record_mend(run, mends, None, f"{folder}/ was missing: made again")
            (run.root / folder).mkdir()
    _mend_start_structures(campaign, run, mends)
    # What the labels and the oracle's journal lost, the resume finds again by reading
    # every oracle batch; the other mends leave the journal whole.
    journal = len(mends)
    stored, rows, labels_damaged = _check_labels(campaign, run)
    _mend_oracle_journal(run, stored, mends)
    if labels_damaged:
        _rebuild_labels(campaign, run, rows, labels_damaged, mends)
    _mend_queue(run, mends)
    journal = len(mends) - journal
    journal += mend_label_log(run, mends)
    for name in (EVENTS_FILE, METRICS_FILE):
        _mend_jsonl(run, name, mends)
    mend_state.mend_checkpoints(campaign, run, mends)
    before_state = len(mends)
    mend_state.mend_state(campaign, run, mends)
    run.journal_mended = bool(journal) or len(mends) > before_state
    mend_state.mend_walker_frames(run, mends)
    mend_state.mend_test_sets(run, mends)
    sweep_empty_scratch(run)
    run.mended, run.mends = True, mends
    return mends


# ---------------------------------------------------------------- start structures
def _mend_start_structures(campaign: Any, run: RunDirectory, mends: list[str]) -> None:
    """The start structure and each system's homes, rebuilt from the campaign's
    ``structure`` when missing or damaged."""

    start = Path(run.start_structure)
    start_bad = structure_problem(start)
    for index, system in enumerate(campaign.all_systems()):
        homes = {Path(run.system_start(system.name, 0))}
        homes |= set(run.root.glob(f"system/{system.name}.start[0-9][0-9][0-9].extxyz"))
        bad = {p: structure_problem(p) for p in sorted(homes) if structure_problem(p)}
        if index == 0 and start_bad and not bad:
            # The first system's first home is what start.extxyz held.
            record_mend(run, mends, start, f"system/start.extxyz {start_bad}: copied again "
                        f"from {run.system_start(system.name, 0)}")  # fmt: skip
            shutil.copyfile(run.system_start(system.name, 0), start)
            start_bad = None
        if not bad and not (index == 0 and start_bad):
            continue
        try:
            frames = load_start_structures(system.structure, system.vacuum)
        except ValueError as error:
            path, problem = next(iter(bad.items()), (start, start_bad))
            raise name_problem(path, run, f"{problem}, and the campaign's structure cannot be read "
                        f"again ({error})", f"put the structure back at {system.structure!r}, "
                        "or copy a good start structure to that file") from None  # fmt: skip
        for path, problem in bad.items():
            k = int(path.name.split(".start")[1].split(".")[0])
            if k < len(frames):
                record_mend(run, mends, path, f"{path.relative_to(run.root)} {problem}: "
                            f"written again from {system.structure}")  # fmt: skip
                write(path, frames[k], format="extxyz")
        if index == 0 and start_bad:
            record_mend(run, mends, start, f"system/start.extxyz {start_bad}: written again "
                        f"from {system.structure}")  # fmt: skip
            write(start, frames[0], format="extxyz")
            start_bad = None


# ---------------------------------------------------------------- labels
def _check_labels(
    campaign: Any, run: RunDirectory
) -> tuple[set[int], list[tuple[Any, dict]], str | None]:
    """The candidate ids ``labels.db`` holds, and why the database is damaged (None
    when it is sound) with the rows that still read, as ``(atoms, key_value_pairs)``
    (none when it is sound: a sound database is checked without reading its rows)."""
    path = run.labels_db
    if not path.exists() or path.stat().st_size == 0:
        # Rebuilt from the journal as always, and said.
        lost = run.oracle_batches() or campaign.initial.file
        return set(), [], ("is missing" if not path.exists() else "is empty") if lost else None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            verdict = connection.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise sqlite3.DatabaseError(verdict)
            (n_rows,) = connection.execute("SELECT count(*) FROM systems").fetchone()
        stored = run.stored_candidate_ids()
        if len(stored) != n_rows:
            raise ValueError(f"{n_rows - len(stored)} of its rows have no candidate id")
        return set(stored), [], None
    except Exception as error:
        rows = _salvage_rows(run)
        return {int(pairs["candidate_id"]) for _, pairs in rows}, rows, f"is damaged ({why(error)})"


def _salvage_rows(run: RunDirectory) -> list[tuple[Any, dict]]:
    """The rows of a damaged ``labels.db`` that still read, one by one."""
    rows = []
    try:
        with sqlite3.connect(f"file:{run.labels_db}?mode=ro", uri=True) as connection:
            ids = [i for (i,) in connection.execute("SELECT id FROM systems ORDER BY id")]
        database = run.labels()
    except Exception:
        return []
    for row_id in ids:
        try:
            row = database.get(id=row_id)
            rows.append((row.toatoms(), dict(row.key_value_pairs)))
            int(row.candidate_id)
        except Exception:
            continue
    return rows


def _rebuild_labels(
    campaign: Any, run: RunDirectory, rows: list, why: str, mends: list[str]
) -> None:
    """A new ``labels.db``: the rows that read, and a warm start's labels; the
    oracle's results are harvested into it by the resume."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        side = run.root / f"{run.labels_db.name}{suffix}"
        if suffix and side.exists():
            move_aside(run, side)
    run.file(LABELS_EXPORTED).unlink(missing_ok=True)  # its rows are in a new order
    record_mend(
        run,
        mends,
        run.labels_db,
        f"labels.db {why}: rebuilt from the oracle's results in oracle/"
        + (f" and the {len(rows)} rows that still read" if rows else ""),
    )
    known = {int(pairs["candidate_id"]) for _, pairs in rows}
    if campaign.initial.file:
        try:
            frames = warm_start.read_warm_labels(
                campaign.initial.file, campaign, read(run.start_structure)
            )
        except Exception as error:
            raise name_problem(
                run.labels_db,
                run,
                f"{why}, and the warm start's labels in it cannot be read "
                f"again from initial.file ({error})",
                f"put {campaign.initial.file!r} back, or restore labels.db from the copy in "
                f"{DAMAGED}/ with a backup",
            ) from None
        rows = rows + [
            (atoms, {"candidate_id": k, "source": warm_start.SOURCE})
            for k, atoms in enumerate(frames, start=1)
            if k not in known
        ]
    if rows:
        run.store_labels([atoms for atoms, _ in rows], [pairs for _, pairs in rows])


# ---------------------------------------------------------------- the oracle's journal
def _mend_oracle_journal(run: RunDirectory, stored: set[int], mends: list[str]) -> None:
    """Each oracle batch's input and output must read; ``stored`` are the candidate
    ids whose labels ``labels.db`` holds in rows that read."""

    checked = CheckedFiles(run)
    for _, in_path, out_path in run.oracle_batches():
        if checked.unchanged(in_path, out_path):
            continue  # found sound by an earlier resume, and not changed since
        in_bad = dataset_problem(in_path, "candidate_id")
        out_bad = dataset_problem(out_path, "candidate_id", "status") if out_path.exists() else None
        if out_bad:
            record_mend(
                run,
                mends,
                out_path,
                f"oracle/{out_path.name} {out_bad}: its candidates that "
                "labels.db lacks are labelled again",
            )
        if not in_bad:
            checked.add(in_path, out_path)  # a damaged output was moved aside just above
            continue
        if not out_path.exists() or out_bad:
            record_mend(
                run,
                mends,
                in_path,
                f"oracle/{in_path.name} {in_bad}: the candidates it "
                "sent and that labels.db lacks are given up (the walkers find others)",
            )
            continue
        answered = read_arrays(out_path)
        done = {
            int(i)
            for i, s in zip(answered["candidate_id"], answered["status"], strict=True)
            if s == "ok"
        }
        if done <= stored:
            record_mend(
                run,
                mends,
                in_path,
                f"oracle/{in_path.name} {in_bad}: its labels are all in labels.db already",
            )
            continue
        raise name_problem(
            in_path,
            run,
            f"{in_bad}, and {len(done - stored)} labels of its output are in no readable "
            "labels.db: they cannot be stored without it",
            "restore it from a backup, or move it and its .out.npz out of the run directory "
            "to give those labels up",
        )
    checked.save()


# ---------------------------------------------------------------- the queue
def _mend_queue(run: RunDirectory, mends: list[str]) -> None:

    path = run.file(QUEUE_FILE)
    if not path.exists():
        return
    try:
        read_candidates(path)
    except Exception as error:
        record_mend(
            run,
            mends,
            path,
            f"{QUEUE_FILE} does not read ({why(error)}): the oracle "
            "queue starts empty; sent candidates are queued again from oracle/, and the "
            "walkers make new ones",
        )


def _mend_jsonl(run: RunDirectory, name: str, mends: list[str]) -> None:
    """A JSON-lines file keeps its sound records; a torn or damaged line goes (a torn
    last line would swallow the next record appended)."""
    path = run.root / name
    if not path.exists() or path.stat().st_size == 0:
        return
    raw = path.read_bytes()
    lines = [line for line in raw.decode(errors="replace").splitlines() if line.strip()]
    good = []
    for line in lines:
        try:
            if isinstance(json.loads(line), dict):
                good.append(line)
        except json.JSONDecodeError:
            continue
    if len(good) == len(lines) and raw.endswith(b"\n"):
        return
    record_mend(run, mends, path, f"{name}: {len(lines) - len(good)} torn or damaged "
                f"line(s) dropped, {len(good)} kept")  # fmt: skip
    path.write_text("".join(line + "\n" for line in good))


# ---------------------------------------------------------------- scratch
def sweep_empty_scratch(run: RunDirectory) -> int:
    """Remove the empty per-task scratch folders that failed oracle calls left in
    ``oracle/scratch/`` (and the folder itself once empty); returns how many."""
    scratch = Path(run.oracle_scratch(""))
    if not scratch.is_dir():
        return 0
    removed = 0
    for folder in sorted(scratch.iterdir()):
        if folder.is_dir() and not any(not p.is_dir() for p in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    if not any(scratch.iterdir()):
        scratch.rmdir()
    return removed
