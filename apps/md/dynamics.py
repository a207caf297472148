"""Molecular dynamics of several walkers in lockstep, driven by an ensemble in one
batched pass per step (or by any ASE calculator), at constant volume or pressure.

:class:`BatchedDynamics` is the integrator the ``"md"`` generator
(:func:`palflow.apps.generator._run_md`) runs; :class:`Evaluation` is what the driving
potential says about one frame, and :func:`evaluations` turns a batched prediction
into those, for any generator.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from ase import Atoms, units

MAX_CELL_STRAIN = 0.01
"""The largest change of a cell's lengths in one barostat step (a fraction; a real
barostat moves them by about 1e-5 per step)."""


class Evaluation(NamedTuple):
    """What the driving potential says about one walker's frame."""

    forces: np.ndarray
    """[n, 3] the members' mean forces, eV/Å."""
    force_disagreement: float
    energy_disagreement: float
    member_energies: np.ndarray
    """[K] eV."""
    member_forces: np.ndarray
    """[K, n, 3] eV/Å."""
    stress: np.ndarray | None = None
    """[3, 3] the members' mean stress, eV/Å³ (None without a cell)."""
    member_stress: np.ndarray | None = None
    """[K, 3, 3] eV/Å³ (None without a cell)."""


def evaluations(out: dict[str, Any]) -> list[Evaluation]:
    """One :class:`Evaluation` per structure of a
    :func:`palflow.apps.models.calculator.predict_structures` result."""
    n_structures = len(out["forces"])
    member_stress = out.get("member_stress")
    result = []
    for n in range(n_structures):
        with_stress = member_stress is not None and np.isfinite(member_stress[:, n]).all()
        result.append(
            Evaluation(
                out["forces"][n],
                float(out["force_disagreement"][n]),
                float(out["energy_disagreement"][n]),
                out["member_energies"][:, n],
                out["member_forces"][n],
                out["stress"][n] if with_stress else None,
                member_stress[:, n] if with_stress else None,
            )
        )
    return result


class BatchedDynamics:
    """Langevin (BAOAB) or velocity-Verlet MD of several walkers in lockstep, at
    constant volume or, with ``pressure_bar``, at constant pressure.

    Every step evaluates all walkers in one batched ensemble pass
    (:func:`palflow.apps.models.calculator.predict_structures`), which costs little more than one
    walker's pass (``benchmarks/batched_ensemble.py``). Any ASE calculator can drive
    the dynamics instead (one walker at a time), which is how the integrator is checked
    against ASE's own (``tests/test_npt.py``). Walkers are ASE ``Atoms`` whose
    positions, momenta and cells advance in place; units are ASE's.

    Constant pressure is the isotropic stochastic cell rescaling of Bernetti and Bussi
    (J. Chem. Phys. 153, 114107, 2020): after each step the volume's logarithm ε moves
    by ``-(β/τ)(P0 - P - kT/V) dt + sqrt(2 kT β dt / (V τ)) ξ``, and positions and the
    cell scale by ``exp(Δε/3)``, momenta by its inverse. ``P`` is the instantaneous
    pressure, kinetic part included; β (``compressibility_per_bar``) and τ
    (``barostat_time_fs``) set only how fast the volume relaxes, not where to.

    Parameters
    ----------
    model
        The ensemble driving the dynamics, or an ASE calculator.
    walkers
        Structures with momenta.
    settings
        The campaign's generator section as a dict (integrator, timestep, temperature,
        friction, pressure).
    rng
        Random numbers for the thermostat and the barostat.
    device
        Device for the ensemble passes.
    bias
        Extra forces on top of the potential's (:class:`palflow.apps.md.bias.UncertaintyBias`,
        :class:`palflow.apps.md.metadynamics.Metadynamics`): an object whose
        ``forces(i, atoms, evaluation, kT)`` gives walker ``i``'s bias forces [n, 3]
        and bias energy. :attr:`results` stay the potential's own.

    Attributes
    ----------
    kT
        Each walker's temperature times Boltzmann's constant (eV), which a generator
        may change between steps (ramps, ladders).
    bias_energy
        Each walker's bias energy at its last evaluation, eV (0 without a bias).
    """

    def __init__(
        self, model, walkers: list[Atoms], settings: dict[str, Any], rng, device=None, bias=None
    ):
        self.model, self.device, self.rng = model, device, rng
        self.walkers = walkers
        self.dt = settings["timestep_fs"] * units.fs
        self.kT = np.full(len(walkers), units.kB * settings["temperature_K"])
        self.bias = bias
        self.bias_forces: dict[int, np.ndarray] = {}
        self.bias_energy = np.zeros(len(walkers))
        self.langevin = settings["integrator"] == "langevin"
        self.c1 = float(np.exp(-settings["friction"] / units.fs * self.dt))
        self.pressure = settings.get("pressure_bar")
        if self.pressure is not None:
            not_periodic = [i for i, atoms in enumerate(walkers) if not atoms.pbc.all()]
            if not_periodic:
                raise ValueError(
                    f"walkers {not_periodic} have no cell periodic in all directions: "
                    "constant pressure (generator.pressure_bar) needs one"
                )
            self.pressure *= units.bar
            self.barostat_time = settings["barostat_time_fs"] * units.fs
            self.compressibility = settings["compressibility_per_bar"] / units.bar
        self.results = self._evaluate(range(len(walkers)))
        self._add_bias(range(len(walkers)))

    @property
    def constant_pressure(self) -> bool:
        return self.pressure is not None

    def _evaluate(self, active) -> dict[int, Evaluation]:
        """What the potential says about each active walker."""
        from ase.calculators.calculator import Calculator

        active = list(active)
        if isinstance(self.model, Calculator):
            return {i: self._evaluate_with_calculator(self.walkers[i]) for i in active}
        from palflow.apps.models.calculator import predict_structures

        out = predict_structures(
            self.model, [self.walkers[i] for i in active], self.device, batch_size=len(active)
        )
        return dict(zip(active, evaluations(out), strict=True))

    def _add_bias(self, active) -> None:
        if self.bias is None:
            return
        for i in active:
            forces, energy = self.bias.forces(i, self.walkers[i], self.results[i], self.kT[i])
            self.bias_forces[i], self.bias_energy[i] = forces, energy

    def forces(self, i: int) -> np.ndarray:
        """The forces walker ``i`` moves by: the potential's, plus the bias's."""
        forces = self.results[i].forces
        return forces + self.bias_forces[i] if i in self.bias_forces else forces

    def swap(self, i: int, j: int) -> None:
        """Exchange the configurations of walkers ``i`` and ``j`` (positions, cells,
        ``info`` and what the potential said), each keeping its temperature: momenta
        are rescaled by the square root of the temperatures' ratio."""
        a, b = self.walkers[i], self.walkers[j]
        ratio = np.sqrt(self.kT[i] / self.kT[j])
        state_a = (a.get_positions(), a.get_cell(), a.get_momenta(), dict(a.info))
        a.set_cell(b.get_cell())
        a.set_positions(b.get_positions())
        a.set_momenta(b.get_momenta() * ratio)
        a.info = dict(b.info)
        b.set_cell(state_a[1])
        b.set_positions(state_a[0])
        b.set_momenta(state_a[2] / ratio)
        b.info = state_a[3]
        self.results[i], self.results[j] = self.results[j], self.results[i]
        if self.bias_forces:
            self.bias_forces[i], self.bias_forces[j] = self.bias_forces[j], self.bias_forces[i]
        self.bias_energy[[i, j]] = self.bias_energy[[j, i]]

    def _evaluate_with_calculator(self, atoms: Atoms) -> Evaluation:
        work = atoms.copy()
        work.calc = self.model
        forces = work.get_forces()
        energy = work.get_potential_energy()
        stress = work.get_stress(voigt=False) if self.constant_pressure else None
        member_stress = None if stress is None else stress[None]
        return Evaluation(forces, 0.0, 0.0, np.array([energy]), forces[None], stress, member_stress)

    def step(self, active: list[int]) -> None:
        """Advance the ``active`` walkers by one step: B A O A, [cell], forces, B."""
        half = 0.5 * self.dt
        for i in active:
            atoms = self.walkers[i]
            masses = atoms.get_masses()[:, None]
            momenta = atoms.get_momenta() + half * self.forces(i)
            positions = atoms.get_positions() + half * momenta / masses
            if self.langevin:
                noise = self.rng.standard_normal(momenta.shape)
                kT = self.kT[i]
                momenta = self.c1 * momenta + np.sqrt((1 - self.c1**2) * masses * kT) * noise
            atoms.set_positions(positions + half * momenta / masses)
            atoms.set_momenta(momenta)
            if self.constant_pressure:
                self._rescale_cell(atoms, self.results[i].stress, self.kT[i])
        self.results.update(self._evaluate(active))
        self._add_bias(active)
        for i in active:
            atoms = self.walkers[i]
            atoms.set_momenta(atoms.get_momenta() + half * self.forces(i))

    def _rescale_cell(self, atoms: Atoms, stress: np.ndarray, kT: float) -> None:
        """One stochastic cell rescaling step (isotropic) from the last stress (3x3)."""
        volume = atoms.get_volume()
        momenta, masses = atoms.get_momenta(), atoms.get_masses()[:, None]
        kinetic_pressure = float((momenta**2 / masses).sum()) / (3 * volume)
        pressure = kinetic_pressure - float(np.trace(stress)) / 3
        rate = self.compressibility / self.barostat_time
        drift = -rate * (self.pressure - pressure - kT / volume) * self.dt
        noise = np.sqrt(2 * kT * rate * self.dt / volume) * self.rng.standard_normal()
        # A wild stress (an ensemble far outside its data) would shrink the cell to
        # nothing in one step, and its neighbour list would fill the memory; the cell
        # moves at most MAX_CELL_STRAIN per step, and the walker's checks catch the rest.
        log_scale = (drift + noise) / 3 if np.isfinite(drift + noise) else 0.0
        scale = float(np.exp(np.clip(log_scale, -MAX_CELL_STRAIN, MAX_CELL_STRAIN)))
        atoms.set_cell(atoms.cell[:] * scale, scale_atoms=True)
        atoms.set_momenta(momenta / scale)
