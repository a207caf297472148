"""The label log: every label written once, appended, and read back by row.

Each label is written once, and a training snapshot is a range of rows
(:meth:`LabelLog.selection`), never a copy. In the run directory's ``data/labels/``::

    atoms.bin    float64, one row per atom:  Z, x, y, z, fx, fy, fz   (Å, eV/Å)
    frames.bin   float64, one row per label: the fields of FRAME_FIELDS
    log.json     the format, the log's uid, and the system names

Rows are appended, atoms first and the label's row last: a label exists once its row
in ``frames.bin`` is whole, and :meth:`LabelLog.open` trims a torn tail. Each label's
row carries a CRC-32 of its atoms' bytes, so damage anywhere is found
(:meth:`LabelLog.problem`). ``labels.db`` stays the campaign's record of its labels,
and the log can always be rebuilt from it (:mod:`palflow.pipeline.state.labels`).

Readers (training, evaluation, the generator's rattle) take a selection: rows
``[start, stop)`` and one side of the fixed train/validation split, which is decided
per label by its content (:func:`~palflow.apps.data.dataset.structure_key`).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from palflow.apps.data.dataset import (
    atomic_write_bytes,
    full_stress,
    read_dataset,
    structure_key,
    structures_from_arrays,
)

FORMAT = 1
"""The log's format; a log of another format is refused with one line."""
ATOM_WIDTH = 7
FRAME_FIELDS = (
    "atom_offset", "n_atoms", "energy",
    *(f"cell{i}" for i in range(9)), *(f"pbc{i}" for i in range(3)),
    *(f"stress{i}" for i in range(9)),
    "candidate_id", "split_key", "initial", "system", "crc",
)  # fmt: skip
FRAME_WIDTH = len(FRAME_FIELDS)
COLUMN = {name: i for i, name in enumerate(FRAME_FIELDS)}
INTEGER_COLUMNS = [
    COLUMN[name]
    for name in ("atom_offset", "n_atoms", "candidate_id", "split_key", "initial", "system", "crc")
]
SPLIT_MODULUS = 1000
"""A label is a validation label when ``split_key / SPLIT_MODULUS`` is below the
campaign's ``validation_fraction`` (the key is its structure key modulo this)."""


class LabelLogError(ValueError):
    """The log cannot be read as asked (damaged, or of another format)."""


def _crc(atom_rows: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(atom_rows).tobytes())


def label_rows(structures: Sequence[Atoms]) -> tuple[np.ndarray, np.ndarray]:
    """The ``atoms.bin`` and ``frames.bin`` rows of labelled structures (the offsets,
    candidate ids, flags, systems and CRCs are filled in by :meth:`LabelLog.append`)."""
    atom_rows, frame_rows = [], np.zeros((len(structures), FRAME_WIDTH))
    for k, atoms in enumerate(structures):
        results = atoms.calc.results
        rows = np.empty((len(atoms), ATOM_WIDTH))
        rows[:, 0] = atoms.numbers
        rows[:, 1:4] = atoms.positions
        rows[:, 4:7] = results["forces"]
        atom_rows.append(rows)
        frame = frame_rows[k]
        frame[COLUMN["n_atoms"]] = len(atoms)
        frame[COLUMN["energy"]] = results["energy"]
        frame[COLUMN["cell0"] : COLUMN["cell0"] + 9] = np.asarray(atoms.cell[:]).ravel()
        frame[COLUMN["pbc0"] : COLUMN["pbc0"] + 3] = atoms.pbc
        frame[COLUMN["stress0"] : COLUMN["stress0"] + 9] = full_stress(
            results.get("stress")
        ).ravel()
        frame[COLUMN["split_key"]] = structure_key(atoms) % SPLIT_MODULUS
    return (np.concatenate(atom_rows) if atom_rows else np.zeros((0, ATOM_WIDTH))), frame_rows


class LabelLog:
    """An open label log: appends labels, and knows its rows' ids and flags.

    What it keeps in memory is a few numbers per label (candidate id, split key,
    initial flag, system), never the structures.
    """

    def __init__(self, folder: str | os.PathLike, meta: dict[str, Any], frames: np.ndarray):
        self.folder = Path(folder)
        self.uid: str = meta["uid"]
        self.systems: list[str] = list(meta.get("systems", []))
        self._columns = {
            name: frames[:, COLUMN[name]].astype(np.int64).tolist()
            for name in ("candidate_id", "split_key", "initial", "system")
        }
        self._atoms_end = int(frames[-1, 0] + frames[-1, 1]) if len(frames) else 0
        self._valid_counts: dict[float, list[int]] = {}

    # ------------------------------------------------------------ opening
    @classmethod
    def create(cls, folder: str | os.PathLike) -> LabelLog:
        """A new, empty log in ``folder`` (made; an old log there is replaced)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("atoms.bin", "frames.bin"):
            (folder / name).write_bytes(b"")
        meta = {"format": FORMAT, "uid": uuid.uuid4().hex, "systems": []}
        _write_meta(folder, meta)
        return cls(folder, meta, np.zeros((0, FRAME_WIDTH)))

    @classmethod
    def open(cls, folder: str | os.PathLike, check_crc: bool = False) -> LabelLog:
        """Open the log in ``folder``, trimming a torn tail (a kill mid-append); with
        ``check_crc``, every label's atoms are checked too (it reads them all).

        Raises
        ------
        LabelLogError
            When it is missing, of another format, or damaged (:meth:`problem`).
        """
        folder = Path(folder)
        meta, frames = _read(folder)
        whole = frames[:, INTEGER_COLUMNS]
        if not (np.isfinite(whole).all() and np.array_equal(whole, np.round(whole))):
            raise LabelLogError(f"{folder.name}/frames.bin has label rows that do not read")
        log = cls(folder, meta, frames)
        problem = log.problem(frames, check_crc)
        if problem:
            raise LabelLogError(f"{folder.name}/{problem}")
        # Whole rows only, and no atoms beyond the last whole label.
        for name, size in (
            ("frames.bin", len(frames) * FRAME_WIDTH * 8),
            ("atoms.bin", log._atoms_end * ATOM_WIDTH * 8),
        ):
            if (folder / name).stat().st_size > size:
                os.truncate(folder / name, size)
        return log

    def problem(self, frames: np.ndarray | None = None, check_crc: bool = True) -> str | None:
        """What is wrong with the log's rows (None when they are sound): offsets that
        do not follow each other, atoms missing, or a CRC that does not match."""
        if frames is None:
            _, frames = _read(self.folder)
        if not len(frames):
            return None
        offsets, counts = frames[:, 0], frames[:, 1]
        expected = np.concatenate([[0], np.cumsum(counts)[:-1]])
        if not (np.all(counts >= 1) and np.array_equal(offsets, expected)):
            return "frames.bin has label rows that do not follow each other"
        atoms_size = (self.folder / "atoms.bin").stat().st_size // (ATOM_WIDTH * 8)
        if atoms_size < self._atoms_end:
            return (
                f"atoms.bin lacks the atoms of its last labels ({atoms_size} of {self._atoms_end})"
            )
        if check_crc:
            atoms = np.memmap(self.folder / "atoms.bin", dtype=np.float64, mode="r")
            atoms = atoms[: self._atoms_end * ATOM_WIDTH].reshape(-1, ATOM_WIDTH)
            bounds = zip(offsets.astype(int), (offsets + counts).astype(int), strict=True)
            for k, (start, stop) in enumerate(bounds):
                if _crc(atoms[start:stop]) != int(frames[k, COLUMN["crc"]]):
                    return f"atoms.bin has damaged atoms in label {k}"
        return None

    # ------------------------------------------------------------ what it holds
    def __len__(self) -> int:  # labels
        return len(self._columns["candidate_id"])

    def column(self, name: str) -> list[int]:
        """One of ``candidate_id``, ``split_key``, ``initial``, ``system`` per label
        (the list itself: do not change it)."""
        return self._columns[name]

    def system_names(self) -> list[str]:
        """Each label's system name ("" for none)."""
        return [self.systems[k] if k >= 0 else "" for k in self._columns["system"]]

    def count_valid(self, start: int, stop: int, fraction: float) -> int:
        """Validation labels among rows ``[start, stop)``, from a running count (the
        same cost however many labels the log holds)."""
        counts = self._valid_counts.setdefault(fraction, [0])
        keys = self._columns["split_key"]
        for key in keys[len(counts) - 1 : stop]:
            counts.append(counts[-1] + (key < fraction * SPLIT_MODULUS))
        return counts[stop] - counts[start]

    # ------------------------------------------------------------ appending
    def append(self, structures: Sequence[Atoms], metadata: Sequence[dict]) -> None:
        """Append labelled structures, each with its ``candidate_id``, ``initial``
        (bool) and ``system`` (name) in ``metadata``."""
        if not structures:
            return
        atom_rows, frame_rows = label_rows(structures)
        names = [m.get("system", "") for m in metadata]
        if any(name and name not in self.systems for name in names):
            self.systems += [n for n in dict.fromkeys(names) if n and n not in self.systems]
            _write_meta(self.folder, {"format": FORMAT, "uid": self.uid, "systems": self.systems})
        start = 0
        for k, (atoms, meta) in enumerate(zip(structures, metadata, strict=True)):
            frame = frame_rows[k]
            frame[COLUMN["atom_offset"]] = self._atoms_end + start
            frame[COLUMN["candidate_id"]] = int(meta["candidate_id"])
            frame[COLUMN["initial"]] = bool(meta.get("initial", False))
            frame[COLUMN["system"]] = self.systems.index(names[k]) if names[k] else -1
            frame[COLUMN["crc"]] = _crc(atom_rows[start : start + len(atoms)])
            start += len(atoms)
        # The atoms first, the label rows last: a label row never names missing atoms.
        with open(self.folder / "atoms.bin", "ab") as handle:
            handle.write(atom_rows.tobytes())
        with open(self.folder / "frames.bin", "ab") as handle:
            handle.write(frame_rows.tobytes())
        self._atoms_end += len(atom_rows)
        for name in self._columns:
            self._columns[name].extend(int(v) for v in frame_rows[:, COLUMN[name]])

    def selection(self, start: int, stop: int, side: str, fraction: float) -> dict[str, Any]:
        """What a task is given to read rows ``[start, stop)``, one ``side`` ("train",
        "valid" or "all"): a small dict, never the labels (see :func:`read_selection`)."""
        return {
            "store": str(self.folder),
            "uid": self.uid,
            "start": int(start),
            "stop": int(stop),
            "side": side,
            "validation_fraction": float(fraction),
        }


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    text = json.dumps(meta).encode()
    atomic_write_bytes(folder / "log.json", lambda handle: handle.write(text))


def _read(folder: Path, start: int = 0, stop: int | None = None) -> tuple[dict, np.ndarray]:
    """The log's metadata and its whole label rows ``[start, stop)``."""
    try:
        meta = json.loads((folder / "log.json").read_text())
    except (OSError, ValueError) as error:
        raise LabelLogError(f"{folder.name}/log.json does not read ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "uid" not in meta:
        raise LabelLogError(
            f"{folder.name}/log.json is not a label log of format {FORMAT} "
            f"(it says {meta.get('format') if isinstance(meta, dict) else meta!r})"
        )
    path = folder / "frames.bin"
    if not path.exists() or not (folder / "atoms.bin").exists():
        missing = [n for n in ("frames.bin", "atoms.bin") if not (folder / n).exists()]
        raise LabelLogError(f"{folder.name}/{missing[0]} is missing")
    whole = path.stat().st_size // (FRAME_WIDTH * 8)
    stop = whole if stop is None else min(stop, whole)
    count = max(stop - start, 0) * FRAME_WIDTH
    frames = np.fromfile(path, dtype=np.float64, count=count, offset=start * FRAME_WIDTH * 8)
    return meta, frames.reshape(-1, FRAME_WIDTH)


# ---------------------------------------------------------------- reading rows
def read_rows(folder: str | os.PathLike, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows ``[start, stop)`` as the arrays of a dataset file
    (:func:`~palflow.apps.data.dataset.read_arrays`), plus ``candidate_id``,
    ``split_key`` and ``row``; each label's CRC is checked.

    Raises
    ------
    LabelLogError
        When a row is missing or its atoms are damaged.
    """
    folder = Path(folder)
    _, frames = _read(folder, start, stop)
    if len(frames) != stop - start:
        raise LabelLogError(f"{folder.name}/ holds {start + len(frames)} labels, not {stop}")
    n_atoms = frames[:, 1].astype(np.int64)
    first = int(frames[0, 0]) if len(frames) else 0
    total = int(n_atoms.sum())
    atoms = np.fromfile(
        folder / "atoms.bin", dtype=np.float64, count=total * ATOM_WIDTH,
        offset=first * ATOM_WIDTH * 8,
    ).reshape(-1, ATOM_WIDTH)  # fmt: skip
    if len(atoms) != total:
        raise LabelLogError(f"{folder.name}/atoms.bin lacks the atoms of labels {start}-{stop}")
    ends = np.cumsum(n_atoms)
    for k, (end, n) in enumerate(zip(ends, n_atoms, strict=True)):
        if _crc(atoms[end - n : end]) != int(frames[k, COLUMN["crc"]]):
            raise LabelLogError(f"{folder.name}/atoms.bin has damaged atoms in label {start + k}")
    c, p, s = COLUMN["cell0"], COLUMN["pbc0"], COLUMN["stress0"]
    return {
        "numbers": atoms[:, 0].astype(np.int64),
        "positions": atoms[:, 1:4],
        "forces": atoms[:, 4:7],
        "n_atoms": n_atoms,
        "cells": frames[:, c : c + 9].reshape(-1, 3, 3),
        "pbc": frames[:, p : p + 3].astype(bool),
        "energy": frames[:, COLUMN["energy"]],
        "stress": frames[:, s : s + 9].reshape(-1, 3, 3),
        "candidate_id": frames[:, COLUMN["candidate_id"]].astype(np.int64),
        "split_key": frames[:, COLUMN["split_key"]].astype(np.int64),
        "row": np.arange(start, stop),
    }


def on_side(split_keys: np.ndarray, side: str, fraction: float) -> np.ndarray:
    """Which of the labels with ``split_keys`` are on ``side`` of the split. When
    every label of a selection would be a validation label, none is (all train)."""
    valid = split_keys < fraction * SPLIT_MODULUS
    if valid.all():
        valid[:] = False
    if side == "all":
        return np.ones(len(split_keys), dtype=bool)
    return valid if side == "valid" else ~valid


class _Cache:
    """What one process read of one log, as the arrays of the rows read (chunks of
    :func:`read_rows`), for a process that reads it again and again (a training
    worker): the next read takes only the rows appended since, and chunks wholly
    below the newest start are let go. Structures are made afresh for each read, so
    that no two tasks share one; threads of one process share the cache safely."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.uid: str | None = None
        self.chunks: list[dict[str, np.ndarray]] = []

    def rows(self, selection: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        """The chunks that cover rows ``[start, stop)`` of the selection's log."""
        start, stop = selection["start"], selection["stop"]
        with self.lock:
            chunks = self.chunks
            if self.uid != selection["uid"] or not chunks or start < chunks[0]["row"][0]:
                self.uid, chunks = selection["uid"], []
            chunks = [c for c in chunks if c["row"][-1] >= start]  # a window moved on
            end = chunks[-1]["row"][-1] + 1 if chunks else start
            if stop > end:
                chunks.append(read_rows(selection["store"], end, stop))
            self.chunks = chunks
        return chunks


_cache = _Cache()


def _rows_of(chunks: list[dict[str, np.ndarray]], start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows ``[start, stop)`` of consecutive chunks, as one set of arrays."""
    per_frame = ("n_atoms", "cells", "pbc", "energy", "stress", "candidate_id", "split_key", "row")
    per_atom = ("numbers", "positions", "forces")
    parts: dict[str, list[np.ndarray]] = {key: [] for key in per_frame + per_atom}
    for chunk in chunks:
        rows = chunk["row"]
        first, last = max(start, rows[0]), min(stop, rows[-1] + 1)
        if first >= last:
            continue
        frames = slice(first - rows[0], last - rows[0])
        offsets = np.concatenate([[0], np.cumsum(chunk["n_atoms"])])
        atoms = slice(offsets[frames.start], offsets[frames.stop])
        for key in per_frame:
            parts[key].append(chunk[key][frames])
        for key in per_atom:
            parts[key].append(chunk[key][atoms])
    return {key: np.concatenate(values) for key, values in parts.items() if values}


def read_selection(selection: dict[str, Any], cache: bool = False) -> list[Atoms]:
    """The labelled structures of a selection made by :meth:`LabelLog.selection`.

    With ``cache``, this process keeps what it read of the log, so that the next
    selection of the same log reads only the rows it has not read yet (the labels
    appended since): one log at a time.
    """
    start, stop = selection["start"], selection["stop"]
    if stop <= start:
        return []
    if cache:
        arrays = _rows_of(_cache.rows(selection), start, stop)
    else:
        arrays = read_rows(selection["store"], start, stop)
    chosen = on_side(arrays["split_key"], selection["side"], selection["validation_fraction"])
    structures = structures_from_arrays(arrays)
    return [atoms for atoms, keep in zip(structures, chosen, strict=True) if keep]


def read_labelled(source: str | dict[str, Any] | None, cache: bool = False) -> list[Atoms]:
    """Labelled structures from a dataset file's path or a label log's selection
    (none for ``None``)."""
    if source is None or source == "":
        return []
    if isinstance(source, dict):
        return read_selection(source, cache=cache)
    return read_dataset(source)
