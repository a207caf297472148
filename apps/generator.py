"""The generators: new candidate structures from the current ensemble.

``generator.kind`` names one; :func:`_generate` (the app) runs it:

- ``"md"`` (:func:`_run_md`): one task advances a group of walkers by a short MD
  segment, all of them in one batched ensemble pass per step (NVT with the Langevin
  integrator, NVE with velocity Verlet, NPT with ``pressure_bar`` set: stochastic cell
  rescaling on top of either), records every ``sample_interval``-th frame with the
  ensemble's disagreement on it, and stops a walker early when it blows up;
- ``"rattle"`` (:func:`_rattle`): random displacements and cell strains around each
  walker's start and around the labelled structures, scored in one batched pass;
- ``"module:function"`` or ``"path/to/file.py:function"``: a user's function with the
  :class:`palflow.pipeline.policies.protocols.Generator` signature (``examples/plugins/``).

The coordinator decides what to label and where each walker goes next; this module
only proposes.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.io import read, write

from palflow.apps.common import draw_velocities, import_object, require_settings, where_and_when
from palflow.apps.data.dataset import write_dataset
from palflow.apps.data.label_log import read_labelled
from palflow.apps.errors import PluginError
from palflow.apps.md.dynamics import BatchedDynamics, Evaluation, evaluations
from palflow.apps.sections import GeneratorSettings

logger = logging.getLogger(__name__)


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
        (:class:`palflow.apps.sections.GeneratorSettings`, dumped), every key of it.

    Raises
    ------
    ValueError
        Naming every key of :class:`~palflow.apps.sections.GeneratorSettings` that
        ``settings`` lacks.

    Returns
    -------
    dict
        ``walkers``: per walker, in order, its frame count, per-frame disagreement,
        whether and why it blew up, and its file paths; the ensemble ``version``
        used; and where and when the task ran.
    """
    import torch

    from palflow.apps.models.core import default_device, load_checkpoint

    t_start = time.time()
    require_settings(settings, GeneratorSettings.model_fields, "generator")
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

    records = [new_record() for _ in walkers]
    last_good = [atoms.copy() for atoms in walkers]
    reasons: list[str | None] = [None] * len(walkers)
    active = list(range(len(walkers)))
    interval = settings["sample_interval"]
    for step in range(1, settings["steps_per_task"] + 1):
        dynamics.step(active)
        if step % interval:
            continue
        for i in list(active):
            evaluation = dynamics.results[i]
            reasons[i] = blow_up_reason(walkers[i], evaluation.force_disagreement, settings)
            if reasons[i] is not None:
                active.remove(i)
                continue
            frame = walkers[i].copy()
            frame.calc = None
            add_frame(records[i], frame, evaluation, step)
            last_good[i] = frame
        if not active:
            break

    results = write_walkers(
        records, last_good, reasons, output_paths, last_frame_paths, version, model.n_members
    )
    return {
        "walkers": results,
        "n_frames": sum(r["n_frames"] for r in results),
        "version": version,
        **where_and_when(t_start),
    }


def new_record() -> dict[str, list]:
    """One walker's frames and what the potential said on each, for :func:`write_walkers`."""
    return {key: [] for key in ("frames", "force", "energy", "steps", "members_e", "members_f",
                                "members_s")}  # fmt: skip


def add_frame(record: dict[str, list], frame: Atoms, evaluation: Evaluation, step: int) -> None:
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
    ``energy`` disagreements, ``steps``, and the members' energies (``members_e``),
    forces (``members_f``) and stresses (``members_s``, None without a cell), frame by
    frame.
    """
    results = []
    for i, record in enumerate(records):
        n_frames = len(record["frames"])
        stresses = {}
        if n_frames and all(s is not None for s in record["members_s"]):
            stresses["member_stress"] = np.asarray(record["members_s"], dtype=float).reshape(
                n_frames, n_members, 3, 3
            )
        write_dataset(
            output_paths[i],
            record["frames"],
            extra={
                **stresses,
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


# ------------------------------------------------------------------------ rattle
RATTLE_LABELS = 256
"""The newest labels of the snapshot that rattling starts from (not all of them: a
task reads the same few however many labels the campaign holds)."""


def _newest_labels(source: str | dict[str, Any] | None) -> list[Atoms]:
    """The newest :data:`RATTLE_LABELS` labels of a training snapshot (a selection of
    the label log, or a dataset file); none without one."""
    if isinstance(source, dict):
        source = {**source, "start": max(source["start"], source["stop"] - RATTLE_LABELS)}
    elif not source or not os.path.exists(source):
        return []
    return read_labelled(source)[-RATTLE_LABELS:]


def _rattle(
    start_paths: list[str],
    ensemble_path: str,
    output_paths: list[str],
    last_frame_paths: list[str],
    settings: dict[str, Any],
    seed: int,
    device: str | None = None,
) -> dict[str, Any]:
    """Random displacements and cell strains around each walker's start and around the
    labelled structures, scored by the ensemble in one batched pass.

    Each walker makes ``steps_per_task // sample_interval`` frames. Each frame starts
    from the walker's start structure or, with ``settings["labelled_path"]`` (the
    newest training snapshot, which the coordinator passes: its newest
    :data:`RATTLE_LABELS` labels are read) and even odds, from a labelled structure of
    the same atoms; every atom moves by N(0, ``rattle_stdev``²)
    Å in each direction, and a periodic cell takes a random symmetric strain with
    components up to ``rattle_strain``. A frame that :func:`blow_up_reason` rejects is
    dropped. The walker's start stays its start: rattling does not drift.

    Parameters and return value are those of :func:`_run_md`.
    """
    import torch

    from palflow.apps.models.calculator import predict_structures
    from palflow.apps.models.core import default_device, load_checkpoint

    t_start = time.time()
    require_settings(settings, GeneratorSettings.model_fields, "generator")
    torch.set_num_threads(1)
    model, extra = load_checkpoint(ensemble_path, device=device or default_device())
    model.eval()
    version = int(extra.get("version", -1))
    rng = np.random.default_rng(seed)
    labelled = []
    labelled = [a for a in _newest_labels(settings.get("labelled_path")) if a.calc is not None]
    n_frames = max(settings["steps_per_task"] // settings["sample_interval"], 1)

    starts = [read(path) for path in start_paths]
    frames: list[Atoms] = []
    owner: list[int] = []
    for walker, start in enumerate(starts):
        same = [a for a in labelled if list(a.numbers) == list(start.numbers)]
        for _ in range(n_frames):
            base = same[rng.integers(len(same))] if same and rng.random() < 0.5 else start
            frames.append(rattled(base, settings, rng))
            owner.append(walker)
    out = predict_structures(model, frames, device, batch_size=64)

    records = [new_record() for _ in starts]
    reasons: list[str | None] = [None] * len(starts)
    for n, (frame, walker, evaluation) in enumerate(
        zip(frames, owner, evaluations(out), strict=True)
    ):
        if blow_up_reason(frame, evaluation.force_disagreement, settings) is not None:
            continue
        add_frame(records[walker], frame, evaluation, step=n)
    for record in records:  # all frames of a walker carry stress, or none does
        if any(s is None for s in record["members_s"]):
            record["members_s"] = [None] * len(record["members_s"])
    results = write_walkers(
        records, starts, reasons, output_paths, last_frame_paths, version, model.n_members
    )
    return {
        "walkers": results,
        "n_frames": sum(r["n_frames"] for r in results),
        "version": version,
        **where_and_when(t_start),
    }


def rattled(base: Atoms, settings: dict[str, Any], rng: np.random.Generator) -> Atoms:
    """A copy of ``base`` with random displacements and, when periodic, a random
    symmetric cell strain (atoms follow the cell)."""
    frame = base.copy()
    frame.calc = None
    if frame.pbc.all() and settings["rattle_strain"] > 0:
        strain = rng.uniform(-1, 1, (3, 3)) * settings["rattle_strain"]
        strain = 0.5 * (strain + strain.T)
        frame.set_cell(frame.cell[:] @ (np.eye(3) + strain), scale_atoms=True)
    frame.positions += rng.normal(0.0, settings["rattle_stdev"], frame.positions.shape)
    frame.set_momenta(np.zeros((len(frame), 3)))
    return frame


# ------------------------------------------------------------------- the app
GENERATORS = {"md": _run_md, "rattle": _rattle}
"""The built-in generators by ``generator.kind``."""


def resolve_generator(kind: str):
    """The generator function ``kind`` names: a built-in, or a user's
    ``module:function`` or ``path/to/file.py:function``.

    Raises
    ------
    PluginError
        When it is unknown, does not import or is not callable.
    """
    if kind in GENERATORS:
        return GENERATORS[kind]
    if ":" not in kind:
        raise PluginError(
            f"unknown generator {kind!r}: built in are {', '.join(GENERATORS)}, or give "
            "'module:function' or 'path/to/file.py:function'"
        )

    function = import_object(kind)
    if not callable(function):
        raise PluginError(f"generator {kind!r} is not callable")
    return function


def _generate(
    generator: str,
    start_paths: list[str],
    ensemble_path: str,
    output_paths: list[str],
    last_frame_paths: list[str],
    settings: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """The generator app: run the generator ``generator`` names (``generator.kind``)
    with the arguments of :class:`palflow.pipeline.policies.protocols.Generator`."""
    function = resolve_generator(generator)
    return function(start_paths, ensemble_path, output_paths, last_frame_paths, settings, seed)
