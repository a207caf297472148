"""The MD check of a finished potential: does the ensemble hold up in production MD?

Force error does not predict MD stability (Fu et al., "Forces are not enough",
TMLR 2023): a potential with a good test error can still collapse or drift in a long
run. :func:`_validate_md` (the app, on the generator executor) runs walkers of one
system with the ensemble's mean forces, NVE (velocity Verlet) or NVT (Langevin),
for a set time, and reports:

- the time to failure, and why: a non-finite energy or force, the ensemble's force
  spread above the upper trust level, or two atoms closer than ``min_distance`` (Å);
- for NVE, the drift of the total energy (a least-squares slope, meV/atom/ps) and its
  largest deviation from the start;
- the share of recorded frames whose spread lies above the lower and the upper
  trust levels;
- the recorded frames themselves (extxyz, spread in ``info``), and the frames just
  before each failure, which an oracle can label to fix the failure on a rerun.

:mod:`palflow.pipeline.engine.validation` decides what to run and judges the results.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import read, write

from palflow.apps.common import draw_velocities, where_and_when
from palflow.apps.md.dynamics import BatchedDynamics

logger = logging.getLogger(__name__)

KEPT_BEFORE_FAILURE = 5
"""Recorded frames kept from just before a failure, for the oracle."""


def failure_of(atoms: Atoms, energy: float, forces: np.ndarray, spread: float,
               settings: dict[str, Any]) -> str | None:  # fmt: skip
    """Why the frame ``atoms`` fails the check, or None: a non-finite energy or force,
    a spread above ``settings["max_spread"]`` (eV/Å; 0: no limit), or two atoms
    closer than ``settings["min_distance"]`` (Å)."""
    if not np.isfinite(energy) or not np.isfinite(forces).all():
        return "non-finite energy or forces"
    if not np.isfinite(spread) or (settings["max_spread"] and spread > settings["max_spread"]):
        return f"force spread {spread:.3g} eV/Å above the upper trust level"
    if len(atoms) > 1:
        distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
        np.fill_diagonal(distances, np.inf)
        if distances.min() < settings["min_distance"]:
            return f"atoms {distances.min():.3g} Å apart (limit {settings['min_distance']:g} Å)"
    return None


def energy_drift(times_ps: np.ndarray, energy_per_atom: np.ndarray) -> tuple[float, float]:
    """The slope of the total energy per atom against time (meV/atom/ps, least
    squares) and its largest deviation from the first value (meV/atom)."""
    if len(times_ps) < 2:
        return 0.0, 0.0
    slope = float(np.polyfit(times_ps, energy_per_atom, 1)[0]) * 1000
    deviation = float(np.abs(energy_per_atom - energy_per_atom[0]).max()) * 1000
    return slope, deviation


def _validate_md(
    ensemble_path: str,
    start_paths: list[str],
    ensemble: str,
    settings: dict[str, Any],
    frames_path: str,
    failures_path: str,
    seed: int,
    device: str | None = None,
) -> dict[str, Any]:
    """Run one walker per start structure with the ensemble, and check each.

    Parameters
    ----------
    ensemble_path
        The ensemble checkpoint.
    start_paths
        One start structure per walker (one system).
    ensemble
        ``"nve"`` (velocity Verlet, momenta drawn once at the temperature) or ``"nvt"``
        (Langevin).
    settings
        ``duration_ps``, ``timestep_fs``, ``temperature_K``, ``friction``,
        ``record_interval`` (steps), ``min_distance`` (Å), ``max_spread`` (eV/Å, the
        upper trust level; 0: none) and ``lower_spread`` (eV/Å, the lower trust level;
        None: no share above it).
    frames_path, failures_path
        Where the recorded frames, and the frames just before each failure, go (extxyz).
    seed
        Random numbers of the momenta and the thermostat.

    Returns
    -------
    dict
        ``runs``: per walker, ``steps``, ``simulated_ps``, ``time_to_failure_ps`` (None
        when it ran the whole duration), ``failure`` (why, or None), ``frames``
        (recorded), ``share_above_lower`` and ``share_above_upper`` (of the frames
        checked every ``record_interval`` steps, the failing one included), and for NVE
        ``drift_meV_per_atom_ps`` and ``max_deviation_meV_per_atom``; the ensemble
        ``version``; the paths; and where and when the task ran.
    """
    import torch

    from palflow.apps.models.core import default_device, load_checkpoint

    t_start = time.time()
    torch.set_num_threads(1)
    device = device or default_device()
    model, extra = load_checkpoint(ensemble_path, device=device)
    rng = np.random.default_rng(seed)
    walkers = [read(path) for path in start_paths]
    for atoms in walkers:
        draw_velocities(atoms, settings["temperature_K"], rng)
    md_settings = {
        "timestep_fs": settings["timestep_fs"],
        "temperature_K": settings["temperature_K"],
        "integrator": "langevin" if ensemble == "nvt" else "verlet",
        "friction": settings["friction"],
    }
    dynamics = BatchedDynamics(model, walkers, md_settings, rng, device)
    n_steps = int(round(settings["duration_ps"] * 1000 / settings["timestep_fs"]))
    interval = settings["record_interval"]
    dt_ps = settings["timestep_fs"] / 1000
    runs = [
        {"steps": 0, "failure": None, "time_ps": [], "energy": [], "frames": [], "checked": []}
        for _ in walkers
    ]
    recorded: list[Atoms] = []
    before_failure: list[Atoms] = []

    def check(i: int, step: int) -> bool:
        atoms, evaluation, run = walkers[i], dynamics.results[i], runs[i]
        potential = float(np.mean(evaluation.member_energies))
        run["failure"] = failure_of(
            atoms, potential, evaluation.forces, evaluation.force_disagreement, settings
        )
        if step % interval == 0 or run["failure"]:  # the failing frame counts too
            run["checked"].append(evaluation.force_disagreement)
        if run["failure"] is None and step % interval == 0:
            frame = atoms.copy()
            frame.info.update(
                walker=i, step=step, ensemble=ensemble, force_spread=evaluation.force_disagreement
            )
            run["frames"].append(frame)
            run["time_ps"].append(step * dt_ps)
            run["energy"].append((potential + atoms.get_kinetic_energy()) / len(atoms))
        run["steps"] = step
        return run["failure"] is None

    active = [i for i in range(len(walkers)) if check(i, 0)]
    tenth = max(n_steps // 10, 1)
    for step in range(1, n_steps + 1):
        if not active:
            break
        dynamics.step(active)
        active = [i for i in active if check(i, step)]
        if step % tenth == 0:  # progress, in this process's log (a worker's, on a site)
            logger.info(
                "%s: %.1f of %.1f ps, %d of %d walkers running, %.0f s",
                ensemble.upper(), step * dt_ps, n_steps * dt_ps, len(active), len(walkers),
                time.time() - t_start,
            )  # fmt: skip
    results = []
    for i, run in enumerate(runs):
        recorded.extend(run["frames"])
        if run["failure"]:
            before_failure.extend(run["frames"][-KEPT_BEFORE_FAILURE:])
        # Every checked frame's spread: the recorded ones, and the one that failed.
        spread = np.nan_to_num(np.asarray(run["checked"], dtype=float), nan=np.inf)
        lower, upper = settings["lower_spread"], settings["max_spread"]
        result: dict[str, Any] = {
            "start_path": start_paths[i],
            "steps": run["steps"],
            "simulated_ps": run["steps"] * dt_ps,
            "time_to_failure_ps": run["steps"] * dt_ps if run["failure"] else None,
            "failure": run["failure"],
            "frames": len(run["frames"]),
            "share_above_lower": float(np.mean(spread > lower)) if len(spread) and lower else None,
            "share_above_upper": float(np.mean(spread > upper)) if len(spread) and upper else None,
        }
        if ensemble == "nve":
            drift, deviation = energy_drift(np.asarray(run["time_ps"]), np.asarray(run["energy"]))
            result.update(drift_meV_per_atom_ps=drift, max_deviation_meV_per_atom=deviation)
        results.append(result)
    write(frames_path, recorded or [], format="extxyz")
    write(failures_path, before_failure or [], format="extxyz")
    return {
        "runs": results,
        "ensemble": ensemble,
        "version": int(extra.get("version", -1)),
        "frames_path": frames_path,
        "failures_path": failures_path,
        **where_and_when(t_start),
    }
