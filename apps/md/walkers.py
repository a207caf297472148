"""A generator task's walkers, frame by frame: when a walker has blown up
(:func:`blow_up_reason`), and the frames it recorded with what the potential said on
each (:func:`new_record`, :func:`add_frame`), written for the coordinator
(:func:`write_walkers`).

Every built-in generator (:mod:`palflow.apps.generator`) and a user's
(``examples/plugins/bond_stretch.py``) write their walkers with these; they are
importable from :mod:`palflow.apps.generator` too.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.io import write

from palflow.apps.data.dataset import write_dataset
from palflow.apps.md.dynamics import Evaluation


def blow_up_reason(
    atoms: Atoms,
    force_disagreement: float,
    settings: dict[str, Any],
) -> str | None:
    """Say why a walker's frame is unphysical, or None when it is fine.

    A walker has blown up when the ensemble disagrees beyond the hard cap, when two
    atoms come closer than ``min_distance`` (Å) or than ``min_distance_factor`` times
    the sum of their covalent radii (where an oracle's forces are absurd), or, for a
    non-periodic system, when an atom has flown farther than ``max_neighbour_distance``
    (Å) from all others.
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
    radii = covalent_radii[atoms.numbers]
    bonded = settings["min_distance_factor"] * (radii[:, None] + radii[None, :])
    closest = np.unravel_index(np.argmin(distances - bonded), distances.shape)
    if settings["min_distance_factor"] > 0 and distances[closest] < bonded[closest]:
        return (
            f"atoms {distances[closest]:.3g} Å apart, under {settings['min_distance_factor']:g} "
            "of their covalent radii's sum"
        )
    if not atoms.pbc.any() and distances.min(axis=1).max() > settings["max_neighbour_distance"]:
        return "an atom flew away from the rest"
    return None


def new_record() -> dict[str, list]:
    """One walker's frames and what the potential said on each, for :func:`write_walkers`."""
    return {key: [] for key in ("frames", "force", "energy", "steps", "members_e", "members_f",
                                "members_s", "extras")}  # fmt: skip


def add_frame(
    record: dict[str, list],
    frame: Atoms,
    evaluation: Evaluation,
    step: int,
    extras: dict[str, Any] | None = None,
) -> None:
    """Add one frame, what the potential said on it, and ``extras`` (per-frame values
    of an exploring generator: the same keys on every frame of a walker)."""
    record["extras"].append(extras or {})
    record["frames"].append(frame)
    record["force"].append(evaluation.force_disagreement)
    record["energy"].append(evaluation.energy_disagreement)
    record["steps"].append(step)
    record["members_e"].append(evaluation.member_energies)
    record["members_f"].append(evaluation.member_forces)
    record["members_s"].append(evaluation.member_stress)


def write_walkers(
    records: list[dict[str, list]],
    last_good: list[Atoms],
    reasons: list[str | None],
    output_paths: list[str],
    last_frame_paths: list[str],
    version: int,
    n_members: int,
) -> list[dict[str, Any]]:
    """Write each walker's frames and last sound frame; return the per-walker results.

    ``records[i]`` (:func:`new_record`) holds the walker's ``frames``, ``force`` and
    ``energy`` disagreements, ``steps``, the members' energies (``members_e``),
    forces (``members_f``) and stresses (``members_s``, None without a cell), and the
    ``extras`` of :func:`add_frame`, frame by frame.
    """
    results = []
    for i, record in enumerate(records):
        n_frames = len(record["frames"])
        stresses = {}
        if n_frames and all(s is not None for s in record["members_s"]):
            stresses["member_stress"] = np.asarray(record["members_s"], dtype=float).reshape(
                n_frames, n_members, 3, 3
            )
        extras = record["extras"]
        explored = {k: np.asarray([e[k] for e in extras]) for k in (extras[0] if extras else {})}
        write_dataset(
            output_paths[i],
            record["frames"],
            extra={
                **stresses,
                **explored,
                "force_disagreement": np.asarray(record["force"], dtype=float),
                "energy_disagreement": np.asarray(record["energy"], dtype=float),
                "step": np.asarray(record["steps"], dtype=np.int64),
                "ensemble_version": np.full(len(record["frames"]), version, dtype=np.int64),
                # What every member said, for the coordinator's selection measure.
                "member_energies": np.asarray(record["members_e"], dtype=float).reshape(
                    len(record["frames"]), n_members
                ),
                "member_forces": np.asarray(record["members_f"], dtype=np.float32).reshape(
                    len(record["frames"]), n_members, len(last_good[i]), 3
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
    return results
