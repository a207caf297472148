"""Whether a periodic start structure can carry a MACE cutoff: its neighbour count.

A cutoff larger than half the cell (the minimum-image limit) is no problem: the
neighbour lists (vesin's, MACE's own) are full lists over the periodic images, so a
4-atom fcc cell of 3.75 Å with MACE-MP-0's 6 Å cutoff gives each atom its 78
neighbours, images included, and a supercell gives the same energy per atom. What
grows with the cutoff is the neighbour count, as the cube of the cutoff in a bulk
cell, and with it the graph's memory: MACE-MP-0-small's shape takes about 0.1 MB per
neighbour pair in float64 for one forward-and-forces pass, more in training. A dense
crystal has about 80 neighbours within 6 Å; :data:`MAX_NEIGHBOURS` is over ten times
that, which only a cutoff in the wrong unit (Bohr, nm) or far beyond any MACE model's
reaches. Numpy and ASE only: the pre-flight checks it before torch loads.
"""

from __future__ import annotations

import math

import numpy as np
from ase import Atoms

MAX_NEIGHBOURS = 1000
"""Most neighbours per atom (mean over the atoms) that a periodic start structure may
have within the cutoff."""


def estimated_neighbours(atoms: Atoms, cutoff: float) -> float | None:
    """Mean neighbours per atom within ``cutoff`` (Å) of a structure periodic in some
    direction, from its density: ``n / V * 4/3 pi r^3`` periodic in three directions,
    ``n / A * pi r^2`` in two (a slab seen from above), ``n / L * 2 r`` in one; None
    when nothing is periodic (then at most the other atoms, however large the cutoff).
    The shells of a crystal make the true count jump around it: within 15% for a
    bulk cell and 25% for a thin slab or wire at MACE-MP-0's 6 Å (tests)."""
    periodic = [i for i in range(3) if atoms.pbc[i]]
    if not periodic or len(atoms) == 0:
        return None
    cell = np.asarray(atoms.cell[:], dtype=float)
    vectors = cell[periodic]
    if len(periodic) == 3:
        measure, ball = abs(float(np.linalg.det(cell))), 4.0 / 3.0 * math.pi * cutoff**3
    elif len(periodic) == 2:
        measure, ball = float(np.linalg.norm(np.cross(*vectors))), math.pi * cutoff**2
    else:
        measure, ball = float(np.linalg.norm(vectors[0])), 2.0 * cutoff
    if measure < 1e-9:  # no cell there: the pre-flight's structure check refuses it
        return None
    return len(atoms) / measure * ball


def cutoff_problem(atoms: Atoms, cutoff: float, foundation: str | None = None) -> str | None:
    """The one-line refusal of a cutoff ``cutoff`` (Å: ``model.r_max``, or the one of
    the ``foundation`` file) that gives the periodic structure ``atoms`` more than
    :data:`MAX_NEIGHBOURS` neighbours per atom; None when it does not."""
    count = estimated_neighbours(atoms, cutoff)
    if count is None or count <= MAX_NEIGHBOURS:
        return None
    if foundation:
        source = f"the cutoff {cutoff:g} Å of the foundation model {foundation!r}"
        fix = "choose a foundation model with a cutoff of a few Å (MACE-MP-0's is 6 Å)"
    else:
        source = f"model.r_max = {cutoff:g} Å"
        fix = "lower model.r_max (MACE's usual cutoffs are 4 to 6 Å)"
    return (
        f"{source} gives each atom of the periodic start structure about {count:.0f} "
        f"neighbours, more than {MAX_NEIGHBOURS} (a dense crystal has about 80 within 6 Å, "
        f"and the graph's memory grows with the count): is it in Å? If so, {fix}"
    )
