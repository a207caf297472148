"""The generator: molecular dynamics driven by the current ensemble.

One task advances a group of walkers by a short MD segment, all of them in one
batched ensemble pass per step, records every ``sample_interval``-th frame with the
ensemble's disagreement on it, and stops a walker early when it blows up. The
coordinator decides what to label and where each walker goes next; this module only
simulates.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.io import read, write

from apps.common import draw_velocities, require_settings, where_and_when
from apps.dataset import write_dataset

logger = logging.getLogger(__name__)

SETTINGS_READ = (
    "integrator",
    "steps_per_task",
    "timestep_fs",
    "temperature_K",
    "friction",
    "sample_interval",
    "max_force_disagreement",
    "min_distance",
    "max_neighbour_distance",
)
"""The keys of the campaign's generator section that an MD task reads."""


def blow_up_reason(
    atoms: Atoms,
    force_disagreement: float,
    settings: dict[str, Any],
) -> str | None:
    """Say why a walker's frame is unphysical, or None when it is fine.

    A walker has blown up when the ensemble disagrees beyond the hard cap, when two
    atoms come closer than ``min_distance`` (Å), or, for a non-periodic system, when
    an atom has flown farther than ``max_neighbour_distance`` (Å) from all others.
    """
    if not np.isfinite(force_disagreement):
        return "non-finite force disagreement"
    if force_disagreement > settings["max_force_disagreement"]:
        return f"force disagreement {force_disagreement:.3g} eV/Å above the hard cap"
    if len(atoms) < 2:
        return None
    distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    np.fill_diagonal(distances, np.inf)
    if distances.min() < settings["min_distance"]:
        return f"atoms {distances.min():.3g} Å apart"
    if not atoms.pbc.any() and distances.min(axis=1).max() > settings["max_neighbour_distance"]:
        return "an atom flew away from the rest"
    return None


class BatchedDynamics:
    """Langevin (BAOAB) or velocity-Verlet MD of several walkers in lockstep.

    Every step evaluates all walkers in one batched ensemble pass
    (:func:`apps.calculator.predict_structures`), which costs little more than one
    walker's pass (``benchmarks/batched_ensemble.py``). Walkers are ASE ``Atoms``
    whose positions and momenta advance in place; units are ASE's.

    Parameters
    ----------
    model
        The ensemble driving the dynamics.
    walkers
        Structures with momenta.
    settings
        The campaign's generator section as a dict (integrator, timestep, temperature,
        friction).
    rng
        Random numbers for the Langevin thermostat.
    device
        Device for the ensemble passes.
    """

    def __init__(self, model, walkers: list[Atoms], settings: dict[str, Any], rng, device=None):
        self.model, self.device, self.rng = model, device, rng
        self.walkers = walkers
        self.dt = settings["timestep_fs"] * units.fs
        self.kT = units.kB * settings["temperature_K"]
        self.langevin = settings["integrator"] == "langevin"
        self.c1 = float(np.exp(-settings["friction"] / units.fs * self.dt))
        self.results = self._evaluate(range(len(walkers)))

    def _evaluate(self, active) -> dict[int, tuple[np.ndarray, float, float]]:
        """Mean forces, force and energy disagreement of the ``active`` walkers."""
        from apps.calculator import predict_structures

        active = list(active)
        out = predict_structures(
            self.model, [self.walkers[i] for i in active], self.device, batch_size=len(active)
        )
        return {
            i: (
                out["forces"][n],
                float(out["force_disagreement"][n]),
                float(out["energy_disagreement"][n]),
                out["member_energies"][:, n],
                out["member_forces"][n],
            )
            for n, i in enumerate(active)
        }

    def step(self, active: list[int]) -> None:
        """Advance the ``active`` walkers by one step: B A O A, forces, B."""
        half = 0.5 * self.dt
        for i in active:
            atoms = self.walkers[i]
            masses = atoms.get_masses()[:, None]
            momenta = atoms.get_momenta() + half * self.results[i][0]
            positions = atoms.get_positions() + half * momenta / masses
            if self.langevin:
                noise = self.rng.standard_normal(momenta.shape)
                momenta = self.c1 * momenta + np.sqrt((1 - self.c1**2) * masses * self.kT) * noise
            atoms.set_positions(positions + half * momenta / masses)
            atoms.set_momenta(momenta)
        self.results.update(self._evaluate(active))
        for i in active:
            atoms = self.walkers[i]
            atoms.set_momenta(atoms.get_momenta() + half * self.results[i][0])


def _run_md(
    start_paths: list[str],
    ensemble_path: str,
    output_paths: list[str],
    last_frame_paths: list[str],
    settings: dict[str, Any],
    seed: int,
    device: str | None = None,
) -> dict[str, Any]:
    """Advance several walkers together with MD on the ensemble; record candidates.

    The walkers step in lockstep (:class:`BatchedDynamics`); one that blows up stops
    there while the others go on.

    Parameters
    ----------
    start_paths
        One one-frame structure file per walker to start from. Momenta are used
        when present; otherwise velocities are drawn at ``settings["temperature_K"]``.
    ensemble_path
        Stacked ensemble checkpoint to drive the dynamics.
    output_paths
        Per walker, where its sampled frames go (dataset ``.npz`` with
        ``force_disagreement`` eV/Å, ``energy_disagreement`` eV/atom, ``step``, and
        the members' ``member_energies`` [F, K] eV and ``member_forces``
        [F, K, n, 3] eV/Å).
    last_frame_paths
        Per walker, where its last sound frame, with momenta, goes, for its next task.
    settings
        The campaign's validated generator section
        (``pipeline.settings.GeneratorSettings.model_dump()``); this task reads the
        keys in :data:`SETTINGS_READ`.

    Raises
    ------
    ValueError
        When ``settings`` lacks a key the task reads, naming every missing key.

    Returns
    -------
    dict
        ``walkers``: per walker, in order, its frame count, per-frame disagreement,
        whether and why it blew up, and its file paths; the ensemble ``version``
        used; and where and when the task ran.
    """
    import torch

    from apps.model import default_device, load_checkpoint

    t_start = time.time()
    require_settings(settings, SETTINGS_READ, "generator")
    # One thread per task: a site runs tasks side by side in its slots.
    torch.set_num_threads(1)
    model, extra = load_checkpoint(ensemble_path, device=device or default_device())
    model.eval()
    version = int(extra.get("version", -1))
    rng = np.random.default_rng(seed)
    walkers = [read(path) for path in start_paths]
    for atoms in walkers:
        if not atoms.get_momenta().any():
            draw_velocities(atoms, settings["temperature_K"], rng)
    dynamics = BatchedDynamics(model, walkers, settings, rng, device)

    records = [
        {"frames": [], "force": [], "energy": [], "steps": [], "members_e": [], "members_f": []}
        for _ in walkers
    ]
    last_good = [atoms.copy() for atoms in walkers]
    reasons: list[str | None] = [None] * len(walkers)
    active = list(range(len(walkers)))
    interval = settings["sample_interval"]
    for step in range(1, settings["steps_per_task"] + 1):
        dynamics.step(active)
        if step % interval:
            continue
        for i in list(active):
            _, force, energy, member_energies, member_forces = dynamics.results[i]
            reasons[i] = blow_up_reason(walkers[i], force, settings)
            if reasons[i] is not None:
                active.remove(i)
                continue
            frame = walkers[i].copy()
            frame.calc = None
            record = records[i]
            record["frames"].append(frame)
            record["force"].append(force)
            record["energy"].append(energy)
            record["steps"].append(step)
            record["members_e"].append(member_energies)
            record["members_f"].append(member_forces)
            last_good[i] = frame
        if not active:
            break

    results = []
    for i, record in enumerate(records):
        write_dataset(
            output_paths[i],
            record["frames"],
            extra={
                "force_disagreement": np.asarray(record["force"], dtype=float),
                "energy_disagreement": np.asarray(record["energy"], dtype=float),
                "step": np.asarray(record["steps"], dtype=np.int64),
                "ensemble_version": np.full(len(record["frames"]), version, dtype=np.int64),
                # What every member said, for the coordinator's selection measure.
                "member_energies": np.asarray(record["members_e"], dtype=float).reshape(
                    len(record["frames"]), model.n_members
                ),
                "member_forces": np.asarray(record["members_f"], dtype=np.float32).reshape(
                    len(record["frames"]), model.n_members, len(walkers[i]), 3
                ),
            },
        )
        # Written beside, then renamed: a kill mid-write never leaves a torn walker state.
        partial = f"{last_frame_paths[i]}.{os.getpid()}.tmp"
        write(partial, last_good[i], format="extxyz")
        os.replace(partial, last_frame_paths[i])
        results.append(
            {
                "output_path": output_paths[i],
                "last_frame_path": last_frame_paths[i],
                "n_frames": len(record["frames"]),
                "force_disagreement": record["force"],
                "energy_disagreement": record["energy"],
                "blew_up": reasons[i] is not None,
                "reason": reasons[i],
            }
        )
    return {
        "walkers": results,
        "n_frames": sum(r["n_frames"] for r in results),
        "version": version,
        **where_and_when(t_start),
    }
