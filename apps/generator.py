"""The generator: molecular dynamics driven by the current ensemble.

One task advances one walker by a short MD segment, records every
``sample_interval``-th frame with the ensemble's disagreement on it, and stops early
when the walker blows up. The coordinator decides what to label and where the
walker goes next; this module only simulates.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.io import read, write

from apps.common import draw_velocities, where_and_when
from apps.dataset import write_dataset

logger = logging.getLogger(__name__)


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


def _run_md(
    start_path: str,
    ensemble_path: str,
    output_path: str,
    last_frame_path: str,
    settings: dict[str, Any],
    seed: int,
    device: str | None = None,
) -> dict[str, Any]:
    """Advance one walker with MD on the ensemble and record candidate frames.

    Parameters
    ----------
    start_path
        One-frame structure file to start from. Momenta are used when present;
        otherwise velocities are drawn at ``settings["temperature_K"]``.
    ensemble_path
        Stacked ensemble checkpoint to drive the dynamics.
    output_path
        Where the sampled frames go (dataset ``.npz`` with ``force_disagreement``
        eV/Å, ``energy_disagreement`` eV/atom and ``step`` arrays).
    last_frame_path
        Where the last sound frame, with momenta, goes, for the walker's next task.
    settings
        The campaign's generator section as a dict.

    Returns
    -------
    dict
        Frame count, per-frame disagreement, whether and why the walker blew up,
        the ensemble version used, and where and when the task ran.
    """
    import torch
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    from apps.calculator import EnsembleCalculator

    t_start = time.time()
    torch.set_num_threads(settings.get("torch_threads", 1))
    calculator = EnsembleCalculator.from_checkpoint(ensemble_path, device=device)
    atoms = read(start_path)
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    temperature = settings["temperature_K"]
    if not atoms.get_momenta().any():
        draw_velocities(atoms, temperature, rng)
    timestep = settings["timestep_fs"] * units.fs
    if settings["integrator"] == "langevin":
        dynamics = Langevin(
            atoms,
            timestep,
            temperature_K=temperature,
            friction=settings["friction"] / units.fs,
            fixcm=False,
            rng=rng,
        )
    else:
        dynamics = VelocityVerlet(atoms, timestep)

    frames, force_spread, energy_spread, steps = [], [], [], []
    last_good = atoms.copy()
    reason = None
    interval = settings["sample_interval"]
    for step in range(interval, settings["steps_per_task"] + 1, interval):
        dynamics.run(interval)
        atoms.get_potential_energy()
        force = float(calculator.results["force_disagreement"])
        reason = blow_up_reason(atoms, force, settings)
        if reason is not None:
            break
        frame = atoms.copy()
        frame.calc = None
        frames.append(frame)
        force_spread.append(force)
        energy_spread.append(float(calculator.results["energy_disagreement"]))
        steps.append(step)
        last_good = atoms.copy()

    write_dataset(
        output_path,
        frames,
        extra={
            "force_disagreement": np.asarray(force_spread, dtype=float),
            "energy_disagreement": np.asarray(energy_spread, dtype=float),
            "step": np.asarray(steps, dtype=np.int64),
        },
    )
    last_good.calc = None
    # Written beside, then renamed: a kill mid-write never leaves a torn walker state.
    partial = f"{last_frame_path}.{os.getpid()}.tmp"
    write(partial, last_good, format="extxyz")
    os.replace(partial, last_frame_path)
    return {
        "output_path": output_path,
        "last_frame_path": last_frame_path,
        "n_frames": len(frames),
        "force_disagreement": force_spread,
        "energy_disagreement": energy_spread,
        "blew_up": reason is not None,
        "reason": reason,
        "version": int(calculator.checkpoint_extra.get("version", -1)),
        **where_and_when(t_start),
    }
