"""The run directory: every file a campaign writes, and the only place it writes.

Layout::

    RUN_DIR/
      campaign.json        resolved campaign settings
      labels.db            labelled data, ASE database (SQLite)
      labels.extxyz        the same, exported at the end
      events.jsonl         one line per finished task
      summary.json         written at the end
      system/start.extxyz  the start structure, for walker resets
      data/                training snapshots and the held-out test set (.npz)
      models/              member checkpoints and one ensemble checkpoint per version
      oracle/              oracle inputs and results (the results are the journal)
      generator/           MD frames and walker states
      infer/               candidate sets sent for re-scoring
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ase import Atoms

from apps.dataset import atomic_write_bytes

logger = logging.getLogger(__name__)

SUBDIRECTORIES = ("system", "data", "models", "oracle", "generator", "infer")


class RunDirectoryError(ValueError):
    """A run directory cannot be created, reopened or locked as asked."""


class RunDirectory:
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

        Raises
        ------
        RunDirectoryError
            When ``root`` exists and is not empty, so that no earlier run is
            overwritten.
        """
        run = cls(root)
        if run.root.exists() and any(run.root.iterdir()):
            raise RunDirectoryError(
                f"run directory {run.root} exists and is not empty: "
                "continue it with --resume, or choose another --run-dir"
            )
        run.root.parent.mkdir(parents=True, exist_ok=True)
        building = cls(run.root.parent / f".{run.root.name}.creating-{os.getpid()}")
        building.root.mkdir(mode=0o700)
        os.chmod(building.root, 0o700)
        for name in SUBDIRECTORIES:
            (building.root / name).mkdir()
        if campaign is not None:
            building.write_json("campaign.json", campaign)
        os.replace(building.root, run.root)  # also over an empty directory
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
        if not (run.root / "campaign.json").is_file():
            raise RunDirectoryError(
                f"{run.root} is not a palflow run directory (no campaign.json): "
                "give the directory a run wrote"
            )
        return run

    def lock(self) -> None:
        """Hold an exclusive lock on the run directory while this process lives.

        The kernel drops the lock when the process ends, however it ends, so a
        killed coordinator never leaves a stale lock behind.

        Raises
        ------
        RunDirectoryError
            When another coordinator holds it.
        """
        import fcntl

        self._lock_handle = open(self.root / ".lock", "w")  # noqa: SIM115 (held for life)
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryError(
                f"another coordinator is running on {self.root}: stop it first"
            ) from None

    def path(self, *parts: str) -> str:
        """Absolute path of a file in the run directory, as a string for apps."""
        return str(self.root.joinpath(*parts))

    @property
    def labels_db(self) -> Path:
        return self.root / "labels.db"

    def write_json(self, name: str, data: Any) -> None:
        """Write ``data`` as JSON atomically."""
        text = json.dumps(data, indent=2, default=_jsonable).encode()
        atomic_write_bytes(self.root / name, lambda handle: handle.write(text))

    def append_event(self, event: dict[str, Any]) -> None:
        """Append one task record to ``events.jsonl``.

        The file stays open, and each line is flushed to the operating system at
        once: a killed coordinator loses no finished line, and the loop does not pay
        an open and a close per task (a third of its time on no-op tasks).
        """
        if self._events is None:
            self._events = open(self.root / "events.jsonl", "a")  # noqa: SIM115
        self._events.write(json.dumps(event, default=_jsonable) + "\n")
        self._events.flush()

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """Append one record to the JSON-lines file ``name`` (e.g. ``metrics.jsonl``)."""
        with open(self.root / name, "a") as handle:
            handle.write(json.dumps(record, default=_jsonable) + "\n")

    def close(self) -> None:
        """Close the events file; a later :meth:`append_event` reopens it."""
        if self._events is not None:
            self._events.close()
            self._events = None

    def read_events(self) -> list[dict[str, Any]]:
        """All task records written so far (a torn last line is skipped)."""
        path = self.root / "events.jsonl"
        if not path.exists():
            return []
        events = []
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping a torn line in %s", path)
        return events

    def labels(self):
        """``labels.db``, opened for reading or writing (see :func:`open_labels`)."""
        return open_labels(self.labels_db)

    def store_labels(self, structures: Sequence[Atoms], metadata: Iterable[dict]) -> None:
        """Add labelled structures to ``labels.db`` in one transaction."""
        with self.labels() as database:
            for atoms, key_value_pairs in zip(structures, metadata, strict=True):
                database.write(atoms, key_value_pairs=key_value_pairs)

    def export_extxyz(self) -> None:
        """Export ``labels.db`` to ``labels.extxyz`` for tools that do not read ASE db."""
        from ase.io import write

        if not self.labels_db.exists():
            return
        rows = [row.toatoms(add_additional_information=False) for row in self.labels().select()]
        tmp = self.root / ".labels.extxyz.tmp"
        write(tmp, rows, format="extxyz")
        os.replace(tmp, self.root / "labels.extxyz")


def open_labels(path: str | os.PathLike):
    """An ASE database of labels, without ASE's lock file.

    ASE guards writes with a ``.lock`` file that it creates and deletes; a process
    killed between the two leaves it behind, and every later writer waits for it
    forever. SQLite locks its own transactions, and the run directory's flock keeps
    a second coordinator away, so the lock file only adds that failure.
    """
    from ase.db import connect

    return connect(path, use_lock_file=False)


def _jsonable(value: Any) -> Any:
    """Turn NumPy scalars and arrays into JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
