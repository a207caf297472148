"""How much the members of a committee disagree: numpy only, so that the
coordinator's selection measures read it without torch.

Uncertainty follows DP-GEN: the force disagreement of a structure is the largest,
over atoms, root-mean-square deviation of the members' force vectors from their
mean (eV/Å); the energy disagreement is the members' standard deviation of the
energy per atom (eV/atom).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def atom_force_spread(member_forces: np.ndarray) -> np.ndarray:
    """[N] per atom, ``sqrt(mean_k |F_ik - <F_i>|^2)``: the root-mean-square deviation
    of the members' force vectors [K, N, 3] from their mean, eV/Å."""
    member_forces = np.asarray(member_forces, dtype=np.float64)
    deviation = member_forces - member_forces.mean(axis=0, keepdims=True)
    return np.sqrt((deviation**2).sum(axis=-1).mean(axis=0))


def ensemble_disagreement(
    member_energies: np.ndarray,
    member_forces: np.ndarray,
    structure_index: np.ndarray,
    n_atoms: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spread of an ensemble's predictions per structure.

    Parameters
    ----------
    member_energies
        [K, S] total energies, eV.
    member_forces
        [K, N, 3] forces, eV/Å.
    structure_index
        [N] structure of each atom.
    n_atoms
        [S] atoms per structure.

    Returns
    -------
    energy_spread_per_atom
        [S] standard deviation over members of energy / n_atoms, eV/atom.
    max_force_spread
        [S] max over atoms of ``sqrt(mean_k |F_ik - <F_i>|^2)``, eV/Å.
    mean_force_spread
        [S] the same per-atom deviation averaged over the structure's atoms, eV/Å.
    """
    member_energies = np.asarray(member_energies, dtype=np.float64)
    structure_index = np.asarray(structure_index, dtype=np.int64)
    n_atoms = np.asarray(n_atoms, dtype=np.int64)
    n_structures = len(n_atoms)

    energy_spread = member_energies.std(axis=0) / np.maximum(n_atoms, 1)
    per_atom = atom_force_spread(member_forces)
    max_spread = np.zeros(n_structures)
    np.maximum.at(max_spread, structure_index, per_atom)
    mean_spread = np.bincount(structure_index, weights=per_atom, minlength=n_structures)
    mean_spread = mean_spread / np.maximum(n_atoms, 1)
    return energy_spread, max_spread, mean_spread


def stress_disagreement(member_stress: np.ndarray) -> np.ndarray:
    """[S] the largest, over the 9 components, standard deviation over the members of
    the stress [K, S, 3, 3], eV/Å³ (NaN for a structure without a cell)."""
    member_stress = np.asarray(member_stress, dtype=np.float64)
    return member_stress.std(axis=0).reshape(member_stress.shape[1], 9).max(axis=1)
