"""Labelled structures as flat arrays in one ``.npz`` file.

Training and inference tasks read datasets from the run directory, never as task
arguments. The format is a handful of concatenated arrays so that loading is one
``numpy.load`` and no text parsing:

=============  ===================  ==========================================
key            shape                meaning
=============  ===================  ==========================================
``numbers``    (n_atoms_total,)     atomic numbers
``positions``  (n_atoms_total, 3)   Cartesian positions, Å
``n_atoms``    (n_structures,)      atoms per structure, in order
``cells``      (n_structures, 3, 3) cell vectors, Å (zeros when not periodic)
``pbc``        (n_structures, 3)    periodic directions
``energy``     (n_structures,)      potential energy, eV (NaN when unlabelled)
``forces``     (n_atoms_total, 3)   forces, eV/Å (NaN when unlabelled)
``stress``     (n_structures, 3, 3) stress, eV/Å³, ASE's sign (NaN when the
                                    oracle gave none, e.g. for a molecule)
=============  ===================  ==========================================
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

logger = logging.getLogger(__name__)


def full_stress(stress) -> np.ndarray:
    """A stress as a 3x3 array (eV/Å³), NaN when ``stress`` is None; takes ASE's
    Voigt 6-vector or a 3x3."""
    if stress is None:
        return np.full((3, 3), np.nan)
    stress = np.asarray(stress, dtype=float)
    return voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress.reshape(3, 3)


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Write a file so that readers see either the old or the complete new content.

    Parameters
    ----------
    path
        Destination.
    write
        Callable taking an open binary file object.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def structure_key(atoms: Atoms) -> int:
    """A stable key (63 bits) of a structure's content: its atomic numbers, positions
    and cell, rounded to 1e-4 Å. A label keeps its key however it was stored (a
    database, a written-out extxyz, a warm start's file) and whatever id it was given,
    so that what is keyed on it (the held-out split, a member's bootstrap resample)
    stays the same for it."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    for array in (atoms.positions, atoms.cell[:]):
        # + 0.0 turns -0.0 into 0.0, which would hash differently
        digest.update((np.round(np.asarray(array, dtype=np.float64), 4) + 0.0).tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def write_dataset(
    path: str | os.PathLike,
    structures: Sequence[Atoms],
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Write structures (labelled or not) to ``path`` atomically.

    Energies, forces and stress (3x3, eV/Å³, ASE's sign) are taken from each
    structure's calculator results when present; otherwise they are stored as NaN.
    ``extra`` holds further per-structure arrays (candidate ids, scores, statuses);
    plain dtypes only, nothing pickled.
    """
    numbers, positions, forces, n_atoms, cells, pbc, energy = [], [], [], [], [], [], []
    stress = []
    for atoms in structures:
        numbers.append(atoms.numbers)
        positions.append(atoms.positions)
        n_atoms.append(len(atoms))
        cells.append(np.asarray(atoms.cell[:]))
        pbc.append(atoms.pbc)
        results = atoms.calc.results if atoms.calc is not None else {}
        energy.append(results.get("energy", np.nan))
        forces.append(results.get("forces", np.full((len(atoms), 3), np.nan)))
        stress.append(full_stress(results.get("stress")))
    arrays = {
        "numbers": np.concatenate(numbers) if numbers else np.zeros(0, int),
        "positions": np.concatenate(positions) if positions else np.zeros((0, 3)),
        "n_atoms": np.asarray(n_atoms, dtype=np.int64),
        "cells": np.asarray(cells, dtype=float).reshape(-1, 3, 3),
        "pbc": np.asarray(pbc, dtype=bool).reshape(-1, 3),
        "energy": np.asarray(energy, dtype=float),
        "forces": np.concatenate(forces) if forces else np.zeros((0, 3)),
        "stress": np.asarray(stress, dtype=float).reshape(-1, 3, 3),
    }
    for key, values in (extra or {}).items():
        values = np.asarray(values)
        if key in arrays or len(values) != len(structures):
            raise ValueError(f"extra array {key!r} clashes or has the wrong length")
        arrays[key] = values
    atomic_write_bytes(path, lambda handle: np.savez(handle, **arrays))


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of a dataset file, including the ``extra`` ones."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def read_dataset(path: str | os.PathLike) -> list[Atoms]:
    """Read structures written by :func:`write_dataset`.

    Labelled structures come back with a :class:`SinglePointCalculator` holding
    ``energy`` (eV), ``forces`` (eV/Å) and, when it was stored, ``stress`` (eV/Å³,
    Voigt order as ASE gives it).
    """
    return structures_from_arrays(read_arrays(path))


def structures_from_arrays(arrays: dict[str, np.ndarray]) -> list[Atoms]:
    """The structures of a dataset already read with :func:`read_arrays`."""
    structures = []
    offsets = np.concatenate([[0], np.cumsum(arrays["n_atoms"])])
    for index, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        atoms = Atoms(
            numbers=arrays["numbers"][start:stop],
            positions=arrays["positions"][start:stop],
            cell=arrays["cells"][index],
            pbc=arrays["pbc"][index],
        )
        energy = arrays["energy"][index]
        if np.isfinite(energy):
            results = {"energy": float(energy), "forces": arrays["forces"][start:stop].copy()}
            # Files written before stress was stored have no "stress" array.
            if "stress" in arrays and np.all(np.isfinite(arrays["stress"][index])):
                results["stress"] = full_3x3_to_voigt_6_stress(arrays["stress"][index])
            atoms.calc = SinglePointCalculator(atoms, **results)
        structures.append(atoms)
    return structures
