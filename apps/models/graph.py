"""Structures as graphs: the batches every model of palflow evaluates.

:func:`build_batch` turns ASE structures into one :class:`AtomsBatch`: their atoms
concatenated, and a full neighbour list within the cutoff (vesin), periodic shifts
included. Both backends (:mod:`palflow.apps.models.core`, :mod:`palflow.apps.models.mace`) take it.

Units: positions and cutoff in Å, energies in eV, forces in eV/Å.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import vesin
from ase import Atoms

from palflow.apps.data.dataset import full_stress


@dataclass
class AtomsBatch:
    """Many structures concatenated into one graph.

    Attributes
    ----------
    numbers
        Atomic numbers, [N] long.
    positions
        Cartesian positions, [N, 3] float32, Å.
    edge_src, edge_dst
        Global atom indices of each directed pair, [E] long; both directions of
        every pair are present (full neighbour list).
    edge_shift
        Cartesian periodic shift, [E, 3], Å, so that the pair vector is
        ``positions[edge_dst] - positions[edge_src] + edge_shift``.
    edge_unit_shift
        The same shift in cell vectors, [E, 3] (whole numbers, stored as floats).
    structure_index
        Structure of each atom, [N] long.
    n_structures
        Number of structures S.
    n_atoms
        Atoms per structure, [S] long.
    energy
        Reference energies, [S] float64, eV; ``None`` unless every structure is
        labelled.
    forces
        Reference forces, [N, 3] float32, eV/Å; ``None`` unless every structure is
        labelled.
    cell
        Cell vectors, [S, 3, 3] float32, Å (zeros for a structure that is not
        periodic).
    stress
        Reference stress, [S, 3, 3] float32, eV/Å³ (ASE's sign), NaN for a structure
        without one; ``None`` when no structure has one.
    """

    numbers: torch.Tensor
    positions: torch.Tensor
    edge_src: torch.Tensor
    edge_dst: torch.Tensor
    edge_shift: torch.Tensor
    structure_index: torch.Tensor
    n_structures: int
    n_atoms: torch.Tensor
    energy: torch.Tensor | None = None
    forces: torch.Tensor | None = None
    edge_unit_shift: torch.Tensor | None = None
    cell: torch.Tensor | None = None
    stress: torch.Tensor | None = None

    @property
    def volume(self) -> torch.Tensor:
        """Cell volume per structure, [S], Å³ (0 for a structure that is not periodic)."""
        return torch.linalg.det(self.cell.double()).abs()

    @property
    def periodic(self) -> bool:
        """Whether every structure has a cell with a volume (stress is defined)."""
        return self.n_structures > 0 and bool((self.volume > 1e-6).all())

    def to(self, device: str | torch.device) -> AtomsBatch:
        """Return a copy with every tensor moved to ``device``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return AtomsBatch(
            **{
                name: value.to(device) if isinstance(value, torch.Tensor) else value
                for name, value in values.items()
            }
        )


@dataclass
class StructureGraph:
    """Neighbour list and labels of one structure, as numpy arrays (local indices)."""

    numbers: np.ndarray
    positions: np.ndarray
    edge_src: np.ndarray
    edge_dst: np.ndarray
    edge_shift: np.ndarray
    energy: float | None
    forces: np.ndarray | None
    unit_shift: np.ndarray | None = None
    cell: np.ndarray | None = None
    stress: np.ndarray | None = None


def structure_graph(
    atoms: Atoms,
    cutoff: float,
    with_targets: bool = True,
    neighbor_list: vesin.NeighborList | None = None,
) -> StructureGraph:
    """Compute the full neighbour list (within ``cutoff``, Å) of one structure.

    Parameters
    ----------
    atoms
        The structure; directions with ``pbc`` False are treated as open.
    cutoff
        Neighbour cutoff, Å.
    with_targets
        Read ``energy`` (eV) and ``forces`` (eV/Å) from ``atoms.calc.results`` when
        both are present, and ``stress`` (eV/Å³) when it is too. The results are
        read directly so that no calculation is ever triggered.
    neighbor_list
        Reusable :class:`vesin.NeighborList` with the same cutoff.
    """
    nl = neighbor_list or vesin.NeighborList(cutoff=cutoff, full_list=True)
    positions = np.ascontiguousarray(atoms.positions, dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any():
        cell = np.ascontiguousarray(atoms.cell[:], dtype=np.float64)
        periodic: bool | list[bool] = pbc.tolist()
    else:
        # vesin ignores the box when nothing is periodic; zeros avoid relying on
        # whatever (possibly degenerate) cell an isolated molecule carries.
        cell = np.zeros((3, 3))
        periodic = False
    if len(atoms) > 0:
        src, dst, shift = nl.compute(positions, cell, periodic, quantities="ijS")
    else:
        src = dst = np.zeros(0, dtype=np.int64)
        shift = np.zeros((0, 3), dtype=np.int64)
    energy = forces = stress = None
    results = getattr(atoms.calc, "results", None) if with_targets else None
    if results and "energy" in results and "forces" in results:
        energy = float(results["energy"])
        forces = np.asarray(results["forces"], dtype=np.float64).reshape(len(atoms), 3)
        if results.get("stress") is not None:
            stress = full_stress(results["stress"])
    return StructureGraph(
        numbers=np.asarray(atoms.numbers, dtype=np.int64),
        positions=positions,
        edge_src=src.astype(np.int64),
        edge_dst=dst.astype(np.int64),
        edge_shift=shift.astype(np.float64) @ cell,
        energy=energy,
        forces=forces,
        unit_shift=shift.astype(np.float64),
        cell=cell,
        stress=stress,
    )


def collate(graphs: Sequence[StructureGraph], device: str | torch.device = "cpu") -> AtomsBatch:
    """Concatenate per-structure graphs into one :class:`AtomsBatch` on ``device``."""
    n_atoms = np.array([len(g.numbers) for g in graphs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_atoms)[:-1]]).astype(np.int64)

    def cat(arrays: list[np.ndarray], width: int, dtype) -> torch.Tensor:
        shape = (0, width) if width else (0,)
        joined = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(shape, dtype)
        return torch.as_tensor(joined, device=device)

    labelled = len(graphs) > 0 and all(g.energy is not None for g in graphs)
    return AtomsBatch(
        numbers=cat([g.numbers for g in graphs], 0, np.int64),
        positions=cat([g.positions for g in graphs], 3, np.float32),
        edge_src=cat([g.edge_src + o for g, o in zip(graphs, offsets, strict=True)], 0, np.int64),
        edge_dst=cat([g.edge_dst + o for g, o in zip(graphs, offsets, strict=True)], 0, np.int64),
        edge_shift=cat([g.edge_shift for g in graphs], 3, np.float32),
        structure_index=torch.as_tensor(np.repeat(np.arange(len(graphs)), n_atoms), device=device),
        n_structures=len(graphs),
        n_atoms=torch.as_tensor(n_atoms, device=device),
        energy=cat([np.array([g.energy for g in graphs])], 0, np.float64) if labelled else None,
        forces=cat([g.forces for g in graphs], 3, np.float32) if labelled else None,
        edge_unit_shift=cat([g.unit_shift for g in graphs], 3, np.float32),
        cell=torch.as_tensor(
            np.asarray([g.cell for g in graphs], dtype=np.float32).reshape(-1, 3, 3), device=device
        ),
        stress=(
            torch.as_tensor(
                np.asarray(
                    [g.stress if g.stress is not None else np.full((3, 3), np.nan) for g in graphs],
                    dtype=np.float32,
                ),
                device=device,
            )
            if labelled and any(g.stress is not None for g in graphs)
            else None
        ),
    )


def build_batch(
    structures: Sequence[Atoms],
    cutoff: float,
    device: str | torch.device = "cpu",
    with_targets: bool = True,
) -> AtomsBatch:
    """Build one graph holding all ``structures`` with neighbours within ``cutoff`` (Å).

    Parameters
    ----------
    structures
        Periodic, partly periodic or isolated structures.
    cutoff
        Neighbour cutoff, Å.
    device
        Device of the returned tensors.
    with_targets
        Attach reference energies/forces when every structure carries them.

    Returns
    -------
    AtomsBatch
    """
    nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
    graphs = [structure_graph(atoms, cutoff, with_targets, nl) for atoms in structures]
    return collate(graphs, device)


def strain(
    batch: AtomsBatch, positions: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deform every structure of ``batch`` by a symmetric strain ε (zero, but part of
    the autograd graph) so that ``dE/dε / V`` is the stress.

    Parameters
    ----------
    positions
        [K, N, 3] positions of K members (requires grad for forces).
    shift
        [E, 3] Cartesian periodic shifts of the edges.

    Returns
    -------
    strained positions [K, N, 3], strained shifts [K, E, 3], and the displacement
    [K, S, 3, 3] to differentiate with respect to.
    """
    k = positions.shape[0]
    displacement = positions.new_zeros(k, batch.n_structures, 3, 3, requires_grad=True)
    symmetric = 0.5 * (displacement + displacement.transpose(-1, -2))
    per_atom = symmetric[:, batch.structure_index]
    per_edge = symmetric[:, batch.structure_index[batch.edge_src]]
    positions = positions + torch.einsum("kni,knij->knj", positions, per_atom)
    shift = shift + torch.einsum("ei,keij->kej", shift, per_edge)
    return positions, shift, displacement


def stress_from_strain(
    batch: AtomsBatch, grad: torch.Tensor | None, displacement: torch.Tensor
) -> torch.Tensor:
    """Stress [K, S, 3, 3] (eV/Å³) from ``dE/dε``; NaN where a structure has no volume."""
    if grad is None:  # the energy does not depend on the cell (e.g. no edges)
        grad = torch.zeros_like(displacement)
    volume = batch.volume.to(grad.device, grad.dtype)
    has_volume = volume > 1e-6
    safe = torch.where(has_volume, volume, torch.ones_like(volume))  # no 0/0 in backward
    stress = grad / safe[None, :, None, None]
    return torch.where(has_volume[None, :, None, None], stress, torch.full_like(stress, math.nan))
