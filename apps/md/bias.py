"""The bias of uncertainty-driven MD (``generator.kind = "biased_md"``): walkers are
pushed towards where the committee disagrees.

The bias is a function of the committee's energy variance σ² = mean_k (E_k - Ē)²,
whose gradient needs nothing but what every step already has, the members' energies
and forces: ∂σ²/∂x = -(2/K) Σ_k (E_k - Ē) F_k. Two shapes
(``generator.bias_shape``):

- ``"udd"``, uncertainty-driven dynamics (Kulichenko et al., Nat. Comput. Sci. 3,
  230, 2023): ``E_b = A (exp(-σ²/(N B²)) - 1)``, a well of depth A that saturates
  once the spread per √atom passes B;
- ``"hal"``, hyperactive learning (van der Oord et al., npj Comput. Mater. 9, 168,
  2023): ``E_b = -τ σ``.

With ``bias_force_fraction`` the strength (A or τ) adapts, walker by walker, so that
the bias's mean force per atom stays that fraction of the physical one (running
means, as hyperactive learning does), up to ``bias_strength``: where the committee
disagrees so much that the well is flat, no strength could make it pull, and none
is tried. ``max_bias_force`` caps the force on any atom.
The bias only moves the walkers: the frames they record carry the unbiased
committee's predictions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms

MEMORY_STEPS = 20
"""The running means of the adaptive strength forget over about this many steps."""


def variance_and_gradient(
    member_energies: np.ndarray, member_forces: np.ndarray
) -> tuple[float, np.ndarray]:
    """The committee's energy variance σ² (eV²) and its gradient [n, 3] (eV²/Å), from
    the members' energies [K] (eV) and forces [K, n, 3] (eV/Å)."""
    deviation = member_energies - member_energies.mean()
    variance = float(np.mean(deviation**2))
    gradient = -2.0 / len(deviation) * np.einsum("k,kna->na", deviation, member_forces)
    return variance, gradient


def cap_forces(forces: np.ndarray, largest: float) -> np.ndarray:
    """``forces`` [n, 3] with every atom's force at most ``largest`` long."""
    norms = np.linalg.norm(forces, axis=1, keepdims=True)
    return forces * np.minimum(1.0, largest / np.maximum(norms, 1e-300))


class UncertaintyBias:
    """The bias of ``biased_md`` for a task's walkers (one running strength each).

    Parameters
    ----------
    settings
        The generator section (``bias_shape``, ``bias_strength``, ``bias_width_eV``,
        ``bias_force_fraction``, ``max_bias_force``).
    n_walkers
        The task's walkers.
    """

    def __init__(self, settings: dict[str, Any], n_walkers: int) -> None:
        self.shape = settings["bias_shape"]
        self.largest_strength = float(settings["bias_strength"])
        self.strength = np.full(n_walkers, self.largest_strength)
        self.width = settings["bias_width_eV"]
        self.fraction = settings["bias_force_fraction"]
        self.largest = settings["max_bias_force"]
        self.physical = np.full(n_walkers, np.nan)  # running mean |F| per atom
        self.unit = np.full(n_walkers, np.nan)  # running mean |F_b| per atom at strength 1

    def unit_bias(self, atoms: Atoms, evaluation) -> tuple[np.ndarray, float]:
        """The bias's forces [n, 3] and energy at strength 1."""
        variance, gradient = variance_and_gradient(
            np.asarray(evaluation.member_energies, dtype=float),
            np.asarray(evaluation.member_forces, dtype=float),
        )
        if self.shape == "hal":
            sigma = np.sqrt(variance)
            return gradient / (2 * max(sigma, 1e-12)), -sigma
        scale = len(atoms) * self.width**2
        well = np.exp(-variance / scale)
        return well / scale * gradient, well - 1.0

    def forces(self, i: int, atoms: Atoms, evaluation, kT: float) -> tuple[np.ndarray, float]:
        """Walker ``i``'s bias forces [n, 3] (eV/Å) and bias energy (eV)."""
        forces, energy = self.unit_bias(atoms, evaluation)
        if self.fraction > 0:
            self._adapt(i, evaluation.forces, forces)
        forces = cap_forces(self.strength[i] * forces, self.largest)
        return forces, float(self.strength[i] * energy)

    def _adapt(self, i: int, physical: np.ndarray, unit: np.ndarray) -> None:
        """Move walker ``i``'s strength so that its mean bias force per atom is
        ``bias_force_fraction`` of the physical one (both as running means)."""
        weight = 1.0 / MEMORY_STEPS
        for means, forces in ((self.physical, physical), (self.unit, unit)):
            size = float(np.linalg.norm(forces, axis=1).mean())
            means[i] = size if np.isnan(means[i]) else (1 - weight) * means[i] + weight * size
        if self.unit[i] > 0:  # never past the largest strength: a saturated well stays flat
            wanted = self.fraction * self.physical[i] / self.unit[i]
            self.strength[i] = min(wanted, self.largest_strength)

    def state(self) -> dict[str, list[float]]:
        """What a report shows: each walker's strength now."""
        return {"strength": self.strength.tolist()}
