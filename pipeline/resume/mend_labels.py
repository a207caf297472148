"""Mending on resume at the cost of what changed, not of what the run holds.

A resume of a sound run must not read every label and every oracle batch again: a
campaign of 10⁵ labels would take minutes to resume. Two things keep it cheap, and
thorough where something is damaged:

* :class:`CheckedFiles`: the oracle batches found sound, by size and modification
  time (``oracle/checked.jsonl``): by the coordinator as it harvests each batch, and
  by a resume's mend. A resume reads only batches that are new or changed since; a
  damaged file changes, and is read.
* :func:`mend_label_log`: the label log (:mod:`palflow.apps.data.label_log`) is
  checked whole (its rows, and each label's CRC) against ``labels.db``'s candidate
  ids, read with one query; one that does not match is moved aside and made again
  from ``labels.db`` by the resume
  (:meth:`palflow.pipeline.state.labels.LabelStore.restore_labels`).
"""

from __future__ import annotations

import json
from pathlib import Path

from palflow.apps.data.dataset import atomic_write_bytes
from palflow.apps.data.label_log import LabelLog, LabelLogError
from palflow.pipeline.resume.mend_base import record_mend
from palflow.pipeline.state.run_files import read_jsonl
from palflow.pipeline.state.rundir import RunDirectory, file_stamp


class CheckedFiles:
    """The files of ``oracle/`` an earlier resume found sound, and unchanged since."""

    def __init__(self, run: RunDirectory) -> None:
        self.path = run.checked_batches
        self.known: dict[str, list[int]] = {}
        for record in read_jsonl(self.path) if self.path.exists() else []:
            self.known.update(record)  # a torn or damaged line: those batches are read
        self.found: dict[str, list[int]] = {}

    _stamp = staticmethod(file_stamp)

    def unchanged(self, *paths: Path) -> bool:
        """Whether every one of ``paths`` was found sound as it is now (a missing
        output counts: it must still be missing); remembered for :meth:`save`."""
        stamps = {p.name: self._stamp(p) for p in paths}
        if all(self.known.get(name) == stamp for name, stamp in stamps.items()):
            self.found.update(stamps)
            return True
        return False

    def add(self, *paths: Path) -> None:
        """``paths`` were read and are sound."""
        self.found.update({p.name: self._stamp(p) for p in paths})

    def save(self) -> None:
        """Keep what this resume found sound (and only that) for the next."""
        text = (json.dumps(self.found, separators=(",", ":")) + "\n").encode()
        atomic_write_bytes(self.path, lambda handle: handle.write(text))


def mend_label_log(run: RunDirectory, mends: list[str]) -> bool:
    """Check the label log whole against ``labels.db``; move it aside when it is
    damaged or does not match (the resume makes it again), and return whether it did.
    A run without a log (a new one, or one of a version before it) is left to the
    resume. A log that holds labels ``labels.db`` lacks (it is written after it) says
    that the database lost rows: the resume then reads every oracle batch again."""
    folder = run.label_log
    if not folder.exists():
        return False
    try:
        log = LabelLog.open(folder, check_crc=True)
        have, stored = log.column("candidate_id"), run.stored_candidate_ids()
        if len(have) > len(stored) or have != stored[: len(have)]:
            problem = "frames.bin does not hold the labels of labels.db in their order"
        else:
            return False
    except (LabelLogError, OSError) as error:
        problem = str(error).removeprefix(f"{folder.name}/")
    record_mend(
        run,
        mends,
        folder,
        f"the label log's data/labels/{problem}: the log is made again from labels.db",
    )
    return True
