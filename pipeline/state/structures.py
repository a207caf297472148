r"""Reading structures a campaign is given: start structures (an ASE molecule name or
a file, one frame or several) and labelled files (held-out sets).

Errors are :class:`~palflow.apps.errors.StructureError`\ s (bad input) that name the
file and what is wrong, for the pre-flight (:mod:`palflow.pipeline.config.preflight`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.io import read

from palflow.apps.errors import InputError, StructureError


def load_start_structure(spec: str, vacuum: float = 0.0) -> Atoms:
    """The start structure: an ASE molecule name or a structure file.

    Raises
    ------
    StructureError
        When ``spec`` is neither a known molecule nor a readable file.
    """
    from ase.build import molecule
    from ase.collections import g2

    if spec in g2.names:
        atoms = molecule(spec)
    elif os.path.exists(spec):
        try:
            atoms = read(spec)
        except Exception as error:
            raise StructureError(f"structure file {spec!r} does not parse: {error}") from None
    else:
        raise StructureError(
            f"structure {spec!r} is neither an ASE molecule name nor an existing file"
        )
    if vacuum > 0 and not atoms.pbc.any():
        atoms.center(vacuum=vacuum)
    return atoms


def load_start_structures(spec: str, vacuum: float = 0.0) -> list[Atoms]:
    """Every start configuration of a system: an ASE molecule name gives one, a file
    every frame it holds (see :func:`load_start_structure`)."""
    if not os.path.exists(spec):
        return [load_start_structure(spec, vacuum)]
    frames = read_frames(spec, "structure file")
    for atoms in frames:
        atoms.calc = None
        if vacuum > 0 and not atoms.pbc.any():
            atoms.center(vacuum=vacuum)
    return frames


def read_frames(path: str, what: str, error: type[InputError] = StructureError) -> list[Atoms]:
    """Every frame of the structure file ``path``, which exists.

    Raises
    ------
    InputError
        ``error``, naming the file as ``what`` (``"initial.file"``), when it does not
        parse or holds no structure.
    """
    try:
        frames = read(path, index=":")
    except Exception as problem:
        raise error(f"{what} {path!r} does not parse: {problem}") from None
    if not frames:
        raise error(f"{what} {path!r} holds no structure")
    return frames


def element_carrier(starts: Sequence[Atoms]) -> Atoms:
    """One structure holding every element of ``starts``: what the model's element
    table and the warm-start checks read (no geometry is used)."""
    carrier = starts[0].copy()
    for atoms in starts[1:]:
        extra = sorted(set(atoms.numbers) - set(carrier.numbers))
        if extra:
            carrier += Atoms(numbers=extra, positions=np.zeros((len(extra), 3)))
    return carrier


def read_labelled_file(path: str) -> list[Atoms]:
    """Structures of a file that must hold energies and forces for every frame.

    Raises
    ------
    ValueError
        When the file does not parse, or a frame lacks its labels.
    """
    try:
        frames = read(path, index=":")
    except Exception as error:
        raise ValueError(f"test file {path!r} does not parse: {error}") from None
    if not frames or not all(f.calc is not None and "forces" in f.calc.results for f in frames):
        raise ValueError(f"test file {path!r} must hold energies and forces for every frame")
    return frames
