"""The run directory: every file a campaign writes, and the only place it writes.

Layout::

    RUN_DIR/
      campaign.json        resolved campaign settings
      labels.db            labelled data, ASE database (SQLite)
      labels.extxyz        the same, exported at the end
      events.jsonl         one line per finished task
      summary.json         written at the end
      report.html          the run report (observe/report.py), its figures in report/
      system/start.extxyz  the start structure, for walker resets
      data/labels/         the label log: every label once, appended (apps/data/label_log.py)
      data/                the held-out test set (.npz)
      models/              member checkpoints and one ensemble checkpoint per version
      oracle/              oracle inputs and results (the results are the journal)
      generator/           MD frames and walker states
      infer/               candidate sets sent for re-scoring
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ase import Atoms

from palflow.apps.data.dataset import atomic_write_bytes
from palflow.pipeline.state.run_files import (
    export_extxyz,
    jsonable,
    open_labels,
    read_jsonl,
    stored_candidate_ids,
)
from palflow.pipeline.state.run_lock import RunDirectoryError, RunLock

logger = logging.getLogger(__name__)

SUBDIRECTORIES = ("system", "data", "models", "oracle", "generator", "infer")

# Every file name of a run directory is spelled here, and only here.
CAMPAIGN_FILE = "campaign.json"
LABELS_DB = "labels.db"
LABELS_EXTXYZ = "labels.extxyz"
LABELS_EXPORTED = ".labels.extxyz.json"
"""How many rows of ``labels.db`` the last export wrote to ``labels.extxyz`` (the
next appends the rest); removed when ``labels.db`` is rebuilt."""
EVENTS_FILE = "events.jsonl"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
FAILURE_FILE = "failure.json"
"""Written by ``palflow run`` when a campaign raised (before or after it wrote its
summary): the one-line reason, its traceback in ``palflow.log``. Read before the
summary; a resume removes it."""
STATE_FILE = "state.json"
QUEUE_FILE = "state.queue.npz"
REPORT_FILE = "report.html"
REPORT_FIGURES = "report"


class RunDirectory(RunLock):
    """Paths and writers for one campaign's run directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self._events = None

    @classmethod
    def create(
        cls, root: str | os.PathLike, campaign: dict[str, Any] | None = None
    ) -> RunDirectory:
        """Create a new run directory, readable by its owner only.

        The directory is built under a temporary name, with ``campaign.json`` when
        ``campaign`` is given, and renamed into place: a kill never leaves a
        half-made run behind that could neither be resumed nor replaced.

        Creation is exclusive: of two callers racing on one new ``root`` exactly one
        wins; the other gets a :class:`RunDirectoryError`, and its temporary folder is
        removed.

        Raises
        ------
        RunDirectoryError
            When ``root`` exists and is not empty, so that no earlier run is
            overwritten; when another caller made it first; when it cannot be made.
        """
        run = cls(root)
        if run.root.is_dir() and any(run.root.iterdir()):
            raise RunDirectoryError(
                f"run directory {run.root} exists and is not empty: "
                "continue it with --resume, or choose another --run-dir"
            )
        if run.root.exists() and not run.root.is_dir():
            raise RunDirectoryError(f"run directory {run.root} is a file: choose another --run-dir")
        try:
            run.root.parent.mkdir(parents=True, exist_ok=True)
            # A name of its own per caller (and per thread), made with mode 0700.
            building = cls(
                tempfile.mkdtemp(prefix=f".{run.root.name}.creating-", dir=run.root.parent)
            )
        except OSError as error:
            raise RunDirectoryError(
                f"run directory {run.root} cannot be created: {error}"
            ) from None
        try:
            for name in SUBDIRECTORIES:
                (building.root / name).mkdir()
            if campaign is not None:
                building.write_json(CAMPAIGN_FILE, campaign)
            # rename(2) is atomic and replaces only an empty directory (or none): of
            # two coordinators racing on one new run directory exactly one gets here.
            os.replace(building.root, run.root)
        except OSError as error:
            shutil.rmtree(building.root, ignore_errors=True)
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise RunDirectoryError(
                    f"run directory {run.root} was created by another coordinator at the "
                    "same moment: continue it with --resume once that one stops, or choose "
                    "another --run-dir"
                ) from None
            raise RunDirectoryError(
                f"run directory {run.root} cannot be created: {error}"
            ) from None
        except BaseException:
            shutil.rmtree(building.root, ignore_errors=True)
            raise
        return run

    @classmethod
    def open(cls, root: str | os.PathLike) -> RunDirectory:
        """Reopen an existing run directory, to resume it.

        Raises
        ------
        RunDirectoryError
            When ``root`` is not a run directory (it has no ``campaign.json``).
        """
        run = cls(root)
        if not run.root.exists():
            raise RunDirectoryError(f"{run.root} does not exist: give the directory a run wrote")
        if not is_run_directory(run.root):
            raise RunDirectoryError(
                f"{run.root} is not a palflow run directory (no campaign.json): "
                "give the directory a run wrote"
            )
        try:
            settings = json.loads(run.file(CAMPAIGN_FILE).read_text())
        except (OSError, ValueError) as error:
            settings = error
        if not isinstance(settings, dict):
            problem = settings if isinstance(settings, Exception) else "holds no settings"
            raise RunDirectoryError(
                f"{CAMPAIGN_FILE} in {run.root} is damaged ({problem}): it holds the run's "
                "settings and nothing else does; restore it from a backup, or start a new "
                "run with --campaign (labels.db and oracle/ keep what this one labelled)"
            )
        return run

    def path(self, *parts: str) -> str:
        """Absolute path of a file in the run directory, as a string for apps."""
        return str(self.root.joinpath(*parts))

    def own(self, path: str) -> str:
        """``path``, a file of this run as a saved state names it, in this run
        directory: the state of a run that was moved or copied names the old place."""
        where = Path(path)
        if where.parent.name in SUBDIRECTORIES and not where.is_relative_to(self.root):
            return str(self.root / where.parent.name / where.name)
        return path

    # ------------------------------------------------------------ named files
    def file(self, name: str) -> Path:
        """One of the run's top-level files (``STATE_FILE``, ``SUMMARY_FILE``, ...)."""
        return self.root / name

    @property
    def labels_db(self) -> Path:
        return self.root / LABELS_DB

    @property
    def start_structure(self) -> str:
        """The start structure, which walkers reset to."""
        return self.path("system", "start.extxyz")

    def system_start(self, system: str, index: int) -> str:
        """Start configuration ``index`` of the system named ``system``."""
        return self.path("system", f"{system}.start{index:03d}.extxyz")

    @property
    def queue_at_stop(self) -> str:
        return self.path("system", "queue_at_stop.extxyz")

    @property
    def test_set(self) -> str:
        """The labelled held-out set."""
        return self.path("data", "test.npz")

    def test_part(self, system: str) -> str:
        """The held-out frames of one system, before the parts are joined."""
        return self.path("data", f"test.{system}.npz")

    @property
    def label_log(self) -> Path:
        """The label log's folder (:mod:`palflow.apps.data.label_log`)."""
        return self.root / "data" / "labels"

    def member_checkpoint(self, member: int, task: int) -> str:
        """Member ``member``'s checkpoint after its training task number ``task``."""
        return self.path("models", f"member{member}.{task:05d}.pt")

    def member_checkpoints(self, member: int) -> list[tuple[int, Path]]:
        """``(task, path)`` of the member's checkpoints on disk, oldest first."""
        found = self.root.glob(f"models/member{member}.*.pt")
        return sorted((int(p.suffixes[0].lstrip(".")), p) for p in found)

    @property
    def foundation_model(self) -> str:
        """The run's copy of ``model.foundation``, which every member starts from."""
        return self.path("models", "foundation.model")

    def ensemble(self, version: int) -> str:
        """The stacked checkpoint of ensemble ``version``."""
        return self.path("models", f"ensemble.v{version:05d}.pt")

    def ensembles(self) -> list[tuple[int, Path]]:
        """``(version, path)`` of every published ensemble, oldest first."""
        found = self.root.glob("models/ensemble.v*.pt")
        return sorted((int(p.name.split(".v")[1].split(".")[0]), p) for p in found)

    def oracle_batch(self, task_id: int) -> tuple[str, str]:
        """What oracle task ``task_id`` was asked (``.in.npz``) and answered (``.out.npz``)."""
        stem = f"batch{task_id:06d}"
        return self.path("oracle", f"{stem}.in.npz"), self.path("oracle", f"{stem}.out.npz")

    def oracle_batches(self) -> list[tuple[int, Path, Path]]:
        """``(task_id, input, output)`` of every oracle batch sent, oldest first; the
        output may not exist."""
        batches = []
        for path in self.root.glob("oracle/batch*.in.npz"):
            task_id = int(path.name[len("batch") :].split(".")[0])
            batches.append((task_id, path, path.with_name(path.name.replace(".in.", ".out."))))
        return sorted(batches)

    @staticmethod
    def batch_input_of(output_path: str) -> str:
        """The ``.in.npz`` beside an oracle batch's ``.out.npz``."""
        return output_path.replace(".out.npz", ".in.npz")

    @property
    def checked_batches(self) -> Path:
        """``oracle/checked.jsonl``: oracle batches found sound, by name, with their
        size and mtime (:class:`palflow.pipeline.resume.mend_labels.CheckedFiles`)."""
        return self.root / "oracle" / "checked.jsonl"

    def note_checked(self, *paths: str | Path) -> None:
        """Say that the files ``paths`` of ``oracle/`` read and are sound, as they are now
        (one line appended: a resume need not read them again)."""
        record = {Path(p).name: file_stamp(Path(p)) for p in paths}
        with open(self.checked_batches, "a") as handle:
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")

    def oracle_scratch(self, name: str) -> str:
        """Where a failed oracle task's scratch is kept for a post-mortem."""
        return self.path("oracle", "scratch", name)

    def walker_segment(self, walker: int, segment: int) -> tuple[str, str]:
        """A walker's MD segment: its frames (``.npz``) and last frame (``.extxyz``)."""
        stem = f"walker{walker:03d}.seg{segment:05d}"
        return self.path("generator", f"{stem}.npz"), self.path("generator", f"{stem}.last.extxyz")

    def walker_hills(self, walker: int) -> str:
        """A metadynamics walker's hills (:mod:`palflow.apps.md.metadynamics`)."""
        return self.path("generator", "hills", f"walker{walker:03d}.npz")

    def exchange_records(self) -> list[Path]:
        """The exchange counts of every replica-exchange task, in order."""
        return sorted(self.root.glob("generator/walker*.seg*.exchanges.json"))

    def walker_segments(self) -> list[tuple[int, Path]]:
        """``(walker, frames file)`` of every MD segment written, in order."""
        found = sorted(self.root.glob("generator/walker*.seg*.npz"))
        return [(int(p.name[len("walker") :].split(".")[0]), p) for p in found]

    def queue_for_scoring(self, version: int) -> tuple[str, str]:
        """The oracle queue sent for re-scoring with ``version``, and the scores."""
        stem = f"queue.v{version:05d}"
        return self.path("infer", f"{stem}.npz"), self.path("infer", f"{stem}.scores.npz")

    # ------------------------------------------------------------ reading and writing
    def read_json(self, name: str) -> Any:
        """A top-level JSON file, or None when it is missing or torn."""
        try:
            return json.loads((self.root / name).read_text())
        except (OSError, ValueError):
            return None

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        """The records of a JSON-lines file; torn or damaged lines are skipped, with
        one warning."""
        return read_jsonl(self.root / name)

    def read_state(self) -> dict[str, Any]:
        """The coordinator's saved bookkeeping (empty before the first save)."""
        return self.read_json(STATE_FILE) or {}

    def write_state(self, state: dict[str, Any]) -> None:
        """Write ``state.json`` (compact: it is written every second or so, and grows
        with the versions)."""
        self.write_json(STATE_FILE, state, indent=None)

    def write_json(self, name: str, data: Any, indent: int | None = 2) -> None:
        """Write ``data`` as JSON atomically."""
        text = json.dumps(data, indent=indent, default=jsonable).encode()
        atomic_write_bytes(self.root / name, lambda handle: handle.write(text))

    def append_event(self, event: dict[str, Any]) -> None:
        """Append one task record to ``events.jsonl``.

        The file stays open, and each line is flushed to the operating system at
        once: a killed coordinator loses no finished line, and the loop does not pay
        an open and a close per task (a third of its time on no-op tasks).
        """
        if self._events is None:
            self._events = open(self.root / EVENTS_FILE, "a")  # noqa: SIM115
        self._events.write(json.dumps(event, default=jsonable) + "\n")
        self._events.flush()

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """Append one record to the JSON-lines file ``name`` (e.g. ``metrics.jsonl``)."""
        with open(self.root / name, "a") as handle:
            handle.write(json.dumps(record, default=jsonable) + "\n")

    def close(self) -> None:
        """Close the events file; a later :meth:`append_event` reopens it."""
        if self._events is not None:
            self._events.close()
            self._events = None

    def read_events(self) -> list[dict[str, Any]]:
        """All task records written so far (a torn or damaged line is skipped)."""
        keys = ("task", "module", "ok", "submitted", "returned")
        return [e for e in self.read_jsonl(EVENTS_FILE) if all(k in e for k in keys)]

    def labels(self):
        """``labels.db``, opened for reading or writing (see :func:`open_labels`)."""
        return open_labels(self.labels_db)

    def stored_candidate_ids(self) -> list[int]:
        """The candidate id of each row of ``labels.db``, in row order (one query)."""
        return stored_candidate_ids(self.labels_db)

    def store_labels(self, structures: Sequence[Atoms], metadata: Iterable[dict]) -> None:
        """Add labelled structures to ``labels.db`` in one transaction."""
        with self.labels() as database:
            for atoms, key_value_pairs in zip(structures, metadata, strict=True):
                database.write(atoms, key_value_pairs=key_value_pairs)

    def export_extxyz(self) -> None:
        """Export ``labels.db`` to ``labels.extxyz`` for tools that do not read ASE db
        (the rows an earlier export wrote are not written again)."""
        if self.labels_db.exists():
            export_extxyz(self.labels(), self.root / LABELS_EXTXYZ, self.root / LABELS_EXPORTED)


def file_stamp(path: Path) -> list[int]:
    """A file's size and modification time (ns); ``[-1, -1]`` when it is missing."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return [-1, -1]
    return [stat.st_size, stat.st_mtime_ns]


def is_run_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a run (its ``campaign.json``)."""
    return (Path(path) / CAMPAIGN_FILE).is_file()
