"""The ensemble potential as an ASE calculator, plus batched scoring of candidates.

Uncertainty follows DP-GEN: the force disagreement of a structure is the largest,
over atoms, root-mean-square deviation of the members' force vectors from their
mean (eV/Å); the energy disagreement is the members' standard deviation of the
energy per atom (eV/atom).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from apps.model import SchNetEnsemble, build_batch, default_device, load_checkpoint

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


def _run(model: SchNetEnsemble, batch) -> tuple[np.ndarray, np.ndarray]:
    """Member energies [K, S] (eV) and forces [K, N, 3] (eV/Å) as float64 numpy."""
    was_training = model.training
    model.eval()
    try:
        out = model(batch, compute_forces=True)
    finally:
        model.train(was_training)
    energies = out["energy"].detach().to("cpu", torch.float64).numpy()
    forces = out["forces"].detach().to("cpu", torch.float64).numpy()
    return energies, forces


def predict_structures(
    model: SchNetEnsemble,
    structures: Sequence[Atoms],
    device: str | torch.device | None = None,
    batch_size: int = 64,
) -> dict[str, object]:
    """Ensemble predictions and disagreement for many structures in batched passes.

    Parameters
    ----------
    model
        Ensemble on ``device``.
    structures
        Structures to score (their calculators are ignored).
    device
        Device for the batches; default the model's device.
    batch_size
        Structures per forward pass.

    Returns
    -------
    dict
        ``energy`` [S] mean energy (eV); ``forces`` list of [n_s, 3] mean forces
        (eV/Å); ``energy_disagreement`` [S] (eV/atom); ``force_disagreement`` [S] max
        force deviation (eV/Å); ``mean_force_disagreement`` [S] (eV/Å);
        ``member_energies`` [K, S] (eV); ``member_forces`` list of [K, n_s, 3] (eV/Å).
    """
    device = device or next(model.parameters()).device
    structures = list(structures)
    energy, forces, e_spread, f_max, f_mean, members = [], [], [], [], [], []
    per_structure_member_forces = []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        batch = build_batch(chunk, model.spec.cutoff, device, with_targets=False)
        member_energies, member_forces = _run(model, batch)
        index = batch.structure_index.cpu().numpy()
        n_atoms = batch.n_atoms.cpu().numpy()
        spread = ensemble_disagreement(member_energies, member_forces, index, n_atoms)
        e_spread.append(spread[0])
        f_max.append(spread[1])
        f_mean.append(spread[2])
        energy.append(member_energies.mean(axis=0))
        members.append(member_energies)
        mean_forces = member_forces.mean(axis=0)
        forces.extend(np.split(mean_forces, np.cumsum(n_atoms)[:-1]))
        per_structure_member_forces.extend(np.split(member_forces, np.cumsum(n_atoms)[:-1], axis=1))
    n_members = model.n_members

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0)

    return {
        "energy": cat(energy),
        "forces": forces,
        "energy_disagreement": cat(e_spread),
        "force_disagreement": cat(f_max),
        "mean_force_disagreement": cat(f_mean),
        "member_energies": (
            np.concatenate(members, axis=1) if members else np.zeros((n_members, 0))
        ),
        "member_forces": per_structure_member_forces,
    }


class EnsembleCalculator(Calculator):
    """ASE calculator returning the ensemble mean and its disagreement.

    Parameters
    ----------
    model
        A loaded ensemble; moved to ``device`` when one is given.
    device
        Torch device; default the model's current device.
    **kwargs
        Passed to :class:`ase.calculators.calculator.Calculator`.

    Notes
    -----
    Besides ``energy``/``free_energy`` (eV) and ``forces`` (eV/Å), ``results`` holds
    ``energy_disagreement`` (eV/atom), ``force_disagreement`` (eV/Å),
    ``member_energies`` [K] (eV) and ``member_forces`` [K, N, 3] (eV/Å).
    """

    implemented_properties = ["energy", "forces", "free_energy"]

    def __init__(
        self,
        model: SchNetEnsemble,
        device: str | torch.device | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.checkpoint_extra: dict = {}
        """What the checkpoint recorded besides weights, e.g. the ensemble ``version``."""

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | torch.device | None = None, **kwargs
    ) -> EnsembleCalculator:
        """Load an ensemble checkpoint (default device: CUDA when available)."""
        model, extra = load_checkpoint(path, device=device or default_device())
        calculator = cls(model, **kwargs)
        calculator.checkpoint_extra = extra
        return calculator

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        batch = build_batch([self.atoms], self.model.spec.cutoff, self.device, with_targets=False)
        member_energies, member_forces = _run(self.model, batch)
        e_spread, f_max, _ = ensemble_disagreement(
            member_energies,
            member_forces,
            batch.structure_index.cpu().numpy(),
            batch.n_atoms.cpu().numpy(),
        )
        energy = float(member_energies[:, 0].mean())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": member_forces.mean(axis=0),
            "energy_disagreement": float(e_spread[0]),
            "force_disagreement": float(f_max[0]),
            "member_energies": member_energies[:, 0].copy(),
            "member_forces": member_forces,
        }
