"""The ensemble potential as an ASE calculator, plus batched scoring of candidates.

Uncertainty follows DP-GEN: the force disagreement of a structure is the largest,
over atoms, root-mean-square deviation of the members' force vectors from their
mean (eV/Å); the energy disagreement is the members' standard deviation of the
energy per atom (eV/atom).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from palflow.apps.models.core import (
    AtomsBatch,
    PotentialEnsemble,
    build_batch,
    default_device,
    load_checkpoint,
)
from palflow.apps.models.disagreement import (  # noqa: F401 (re-exported)
    atom_force_spread,
    ensemble_disagreement,
    stress_disagreement,
)

logger = logging.getLogger(__name__)


def _numpy(out: dict[str, torch.Tensor]) -> tuple:
    """Energies [K, S], forces [K, N, 3] and stresses [K, S, 3, 3] (or None) of a
    forward pass as float64 numpy."""

    def numpy(key):
        return out[key].detach().to("cpu", torch.float64).numpy() if key in out else None

    return numpy("energy"), numpy("forces"), numpy("stress")


def _run(model: PotentialEnsemble, batch: AtomsBatch, compute_stress: bool = False):
    """Member energies [K, S] (eV), forces [K, N, 3] (eV/Å) and, with
    ``compute_stress``, stresses [K, S, 3, 3] (eV/Å³, else None) as float64 numpy."""
    was_training = model.training
    model.eval()
    try:
        out = model(batch, compute_forces=True, compute_stress=compute_stress)
    finally:
        model.train(was_training)
    return _numpy(out)


def predict_batches(
    model: PotentialEnsemble,
    structures: Sequence[Atoms],
    device: str | torch.device | None = None,
    batch_size: int = 64,
    with_targets: bool = False,
    compute_stress: bool | None = False,
) -> Iterator[tuple[AtomsBatch, dict[str, torch.Tensor]]]:
    """The members' predictions for many structures, one batched pass at a time.

    The one batched-prediction path: scoring (:func:`predict_structures`) and test
    errors (:func:`evaluate_errors`) both read it.

    Parameters
    ----------
    model
        Ensemble on ``device``; evaluated in eval mode, then put back as it was.
    structures
        The structures, in order.
    device
        Device for the batches; default the model's device.
    batch_size
        Structures per forward pass.
    with_targets
        Attach the labels to each batch (``batch.energy``, ``batch.forces``,
        ``batch.stress``).
    compute_stress
        Also predict stresses; None: for the batches that carry stress labels.

    Yields
    ------
    batch, out
        The batch and the detached ``forward`` output: ``energy`` [K, S] eV,
        ``forces`` [K, N, 3] eV/Å and, with stresses, ``stress`` [K, S, 3, 3] eV/Å³.
    """
    device = device or next(model.parameters()).device
    structures = list(structures)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(structures), batch_size):
            chunk = structures[start : start + batch_size]
            batch = build_batch(chunk, model.spec.cutoff, device, with_targets=with_targets)
            stress = batch.stress is not None if compute_stress is None else compute_stress
            out = model(batch, compute_forces=True, compute_stress=stress)
            yield batch, {key: value.detach() for key, value in out.items()}
    finally:
        model.train(was_training)


def predict_structures(
    model: PotentialEnsemble,
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
        ``member_energies`` [K, S] (eV); ``member_forces`` list of [K, n_s, 3] (eV/Å);
        and, when some structure has a cell, ``stress`` [S, 3, 3] mean stress
        (eV/Å³, NaN for a structure without a cell), ``member_stress``
        [K, S, 3, 3] and ``stress_disagreement`` [S] (:func:`stress_disagreement`).
    """
    structures = list(structures)
    energy, forces, e_spread, f_max, f_mean, members = [], [], [], [], [], []
    per_structure_member_forces, stresses = [], []
    with_stress = any(atoms.pbc.all() and atoms.cell.volume > 1e-6 for atoms in structures)
    batches = predict_batches(model, structures, device, batch_size, compute_stress=with_stress)
    for batch, out in batches:
        member_energies, member_forces, member_stress = _numpy(out)
        if with_stress:
            stresses.append(member_stress)
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

    stress = {}
    if with_stress:
        member_stress = np.concatenate(stresses, axis=1)
        stress = {
            "stress": member_stress.mean(axis=0),
            "member_stress": member_stress,
            "stress_disagreement": stress_disagreement(member_stress),
        }
    return {
        **stress,
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
    ``member_energies`` [K] (eV) and ``member_forces`` [K, N, 3] (eV/Å). For a cell
    periodic in all directions it also gives ``stress`` (Voigt, eV/Å³, the members'
    mean), ``stress_disagreement`` (eV/Å³, :func:`stress_disagreement`) and
    ``member_stress`` [K, 3, 3]. With a ``calibration`` (from the checkpoint that
    ``palflow export`` writes), ``force_uncertainty`` (eV/Å) is the expected mean
    absolute force error of the structure: ``calibration`` times
    ``force_disagreement``, fitted on the run's validation labels.
    """

    implemented_properties = ["energy", "forces", "free_energy", "stress"]

    def __init__(
        self,
        model: PotentialEnsemble,
        device: str | torch.device | None = None,
        calibration: float | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.calibration = calibration
        """Force error per unit of force spread, or None (no ``force_uncertainty``)."""
        self.checkpoint_extra: dict = {}
        """What the checkpoint recorded besides weights, e.g. the ensemble ``version``."""

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | torch.device | None = None, **kwargs
    ) -> EnsembleCalculator:
        """Load an ensemble checkpoint (default device: CUDA when available)."""
        model, extra = load_checkpoint(path, device=device or default_device())
        kwargs.setdefault(
            "calibration", (extra.get("calibration") or {}).get("force_error_per_spread")
        )
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
        periodic = bool(self.atoms.pbc.all()) and self.atoms.cell.volume > 1e-6
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs a cell periodic in all directions")
        member_energies, member_forces, member_stress = _run(self.model, batch, periodic)
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
        if self.calibration:
            self.results["force_uncertainty"] = float(self.calibration * f_max[0])
        if periodic:
            self.results.update(
                stress=full_3x3_to_voigt_6_stress(member_stress[:, 0].mean(axis=0)),
                stress_disagreement=float(stress_disagreement(member_stress)[0]),
                member_stress=member_stress[:, 0].copy(),
            )


def evaluate_errors(
    model: PotentialEnsemble,
    structures: Sequence[Atoms],
    device: str | torch.device | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Errors of the ensemble mean prediction against labelled ``structures`` (energy in
    eV, forces in eV/Å); ``model``, ``device`` and ``batch_size`` as for
    :func:`palflow.apps.models.calculator.predict_structures`.

    Returns
    -------
    dict
        ``energy_mae_per_atom`` and ``energy_rmse_per_atom`` (eV/atom), ``force_mae``
        and ``force_rmse`` (eV/Å, over force components), and ``stress_mae`` (eV/Å³,
        over the stress components of the structures with a stress label; NaN when none
        has one).
    """
    energy_abs, energy_sq, force_abs, force_sq, n_components = 0.0, 0.0, 0.0, 0.0, 0
    stress_abs, n_stress = 0.0, 0
    batches = predict_batches(
        model, structures, device, batch_size, with_targets=True, compute_stress=None
    )
    for batch, out in batches:
        energy, forces, stress = out["energy"], out["forces"], out.get("stress")
        per_atom = (energy.mean(0).double() - batch.energy) / batch.n_atoms
        energy_abs += float(per_atom.abs().sum())
        energy_sq += float(per_atom.pow(2).sum())
        error = (forces.mean(0) - batch.forces).double()
        force_abs += float(error.abs().sum())
        force_sq += float(error.pow(2).sum())
        n_components += error.numel()
        if stress is not None:
            labelled = torch.isfinite(batch.stress).all(dim=(-1, -2))
            error = (stress.mean(0)[labelled] - batch.stress[labelled]).double()
            stress_abs += float(error.abs().sum())
            n_stress += error.numel()
    n_structures = max(len(structures), 1)
    n_components = max(n_components, 1)
    return {
        "energy_mae_per_atom": energy_abs / n_structures,
        "energy_rmse_per_atom": math.sqrt(energy_sq / n_structures),
        "force_mae": force_abs / n_components,
        "force_rmse": math.sqrt(force_sq / n_components),
        "stress_mae": stress_abs / n_stress if n_stress else math.nan,
    }
