"""Well-tempered metadynamics on collective variables (``generator.kind =
"metadynamics"``), in palflow's batched MD.

Every ``hill_interval`` steps a walker drops a Gaussian hill where it stands in the
space of ``generator.collective_variables`` (:mod:`palflow.apps.md.colvars`), of
height ``h exp(-V(s) / (k ΔT))`` with ``ΔT = (γ - 1) T`` (Barducci, Bussi and
Parrinello, Phys. Rev. Lett. 100, 020603, 2008); the bias's forces join the
ensemble's inside the integrator. Each walker keeps its hills in its own file of the
run directory (``generator/hills/walkerNNN.npz``), written when its task ends and
read when the next begins, so a resumed campaign goes on with the bias it had. With
``shared_hills`` the walkers of a system build one bias (multiple walkers, Raiteri et
al., J. Phys. Chem. B 110, 3533, 2006): a walker feels its task's other walkers'
hills at once and the other tasks' from their files at its next task.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from ase import Atoms

from palflow.apps.md.colvars import difference, evaluate


class Hills:
    """One walker's hills: centres [H, d], heights [H] (eV) and the walker's MD step
    when each was dropped."""

    def __init__(self, d: int) -> None:
        self.centres = np.zeros((0, d))
        self.heights = np.zeros(0)
        self.steps = np.zeros(0, dtype=np.int64)

    @classmethod
    def load(cls, path: str, d: int) -> Hills:
        """The hills in ``path``; none when it does not exist yet.

        Raises
        ------
        ValueError
            When the file holds hills of another number of collective variables.
        """
        hills = cls(d)
        if not os.path.exists(path):
            return hills
        with np.load(path) as data:
            hills.centres, hills.heights = data["centres"], data["heights"]
            hills.steps = data["steps"]
        if hills.centres.shape[1] != d:
            raise ValueError(
                f"{path} holds hills on {hills.centres.shape[1]} collective variables, not "
                f"{d}: the campaign's generator.collective_variables changed"
            )
        return hills

    def add(self, centre: np.ndarray, height: float, step: int) -> None:
        self.centres = np.vstack([self.centres, centre[None]])
        self.heights = np.append(self.heights, height)
        self.steps = np.append(self.steps, step)

    def save(self, path: str) -> None:
        """Write the hills to ``path`` atomically (beside it, then renamed)."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        partial = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(partial, centres=self.centres, heights=self.heights, steps=self.steps)
        os.replace(partial, path)


class Metadynamics:
    """The metadynamics bias of a task's walkers.

    Parameters
    ----------
    settings
        The generator section (``collective_variables``, ``hill_height_eV``,
        ``bias_factor``, ``shared_hills``), with ``hills_paths`` (one file per walker
        of the task) and, for shared hills, ``shared_hills_paths`` (every walker's of
        the system).
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.variables = settings["collective_variables"]
        self.kinds = [cv["kind"] for cv in self.variables]
        self.widths = np.array([cv["width"] for cv in self.variables], dtype=float)
        self.height = settings["hill_height_eV"]
        self.gamma = settings["bias_factor"]
        self.paths = list(settings["hills_paths"])
        d = len(self.variables)
        self.own = [Hills.load(path, d) for path in self.paths]
        self.shared = settings["shared_hills"]
        others = [p for p in settings.get("shared_hills_paths", []) if p not in self.paths]
        self.others = [Hills.load(path, d) for path in others] if self.shared else []
        self.values: dict[int, np.ndarray] = {}
        self.potentials: dict[int, float] = {}

    def hills_of(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The centres and heights walker ``i`` feels."""
        felt = [*self.others, *self.own] if self.shared else [self.own[i]]
        return np.vstack([h.centres for h in felt]), np.concatenate([h.heights for h in felt])

    def potential(self, i: int, values: np.ndarray) -> tuple[float, np.ndarray]:
        """The bias V (eV) at ``values`` of the collective variables for walker ``i``,
        and its derivative along each [d]."""
        centres, heights = self.hills_of(i)
        if not len(heights):
            return 0.0, np.zeros(len(values))
        scaled = difference(values[None], centres, self.kinds) / self.widths
        gaussians = heights * np.exp(-0.5 * (scaled**2).sum(axis=1))
        slope = -(gaussians[:, None] * scaled / self.widths).sum(axis=0)
        return float(gaussians.sum()), slope

    def forces(self, i: int, atoms: Atoms, evaluation, kT: float) -> tuple[np.ndarray, float]:
        """Walker ``i``'s bias forces [n, 3] (eV/Å) and bias energy (eV)."""
        values, gradients = evaluate(atoms, self.variables)
        energy, slope = self.potential(i, values)
        self.values[i], self.potentials[i] = values, energy
        return -np.einsum("d,dna->na", slope, gradients), energy

    def deposit(self, i: int, kT: float, step: int) -> None:
        """Drop a well-tempered hill where walker ``i`` stood at its last evaluation."""
        height = self.height * np.exp(-self.potentials[i] / ((self.gamma - 1.0) * kT))
        self.own[i].add(self.values[i], float(height), step)

    def save(self) -> None:
        """Write every walker's hills to its file."""
        for hills, path in zip(self.own, self.paths, strict=True):
            hills.save(path)
