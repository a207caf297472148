"""The generators: new candidate structures from the current ensemble.

``generator.kind`` names one; :func:`_generate` (the app) runs it:

- ``"md"`` (:func:`_run_md`): one task advances a group of walkers by a short MD
  segment, all of them in one batched ensemble pass per step (NVT with the Langevin
  integrator, NVE with velocity Verlet, NPT with ``pressure_bar`` set: stochastic cell
  rescaling on top of either), records every ``sample_interval``-th frame with the
  ensemble's disagreement on it, and stops a walker early when it blows up;
- ``"biased_md"``, ``"metadynamics"`` and ``"replica_exchange"``: the same MD, with
  what :class:`palflow.apps.md.explorer.Exploration` adds (an uncertainty bias, hills
  on collective variables, exchanges along a temperature ladder);
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
from ase.io import read

from palflow.apps.common import draw_velocities, import_object, require_settings, where_and_when
from palflow.apps.data.label_log import read_labelled
from palflow.apps.errors import PluginError
from palflow.apps.md.dynamics import BatchedDynamics, evaluations
from palflow.apps.md.explorer import Exploration
from palflow.apps.md.walkers import (  # noqa: F401 (plug-ins import these from here)
    add_frame,
    blow_up_reason,
    new_record,
    write_walkers,
)
from palflow.apps.sections import GeneratorSettings

logger = logging.getLogger(__name__)


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
    exploration = Exploration(settings, walkers, rng)
    for atoms, temperature_K in zip(walkers, exploration.temperatures_K(), strict=True):
        if not atoms.get_momenta().any():
            draw_velocities(atoms, temperature_K, rng)
    dynamics = BatchedDynamics(model, walkers, settings, rng, device, bias=exploration.bias)

    records = [new_record() for _ in walkers]
    last_good = [atoms.copy() for atoms in walkers]
    reasons: list[str | None] = [None] * len(walkers)
    resets: list[str | None] = [None] * len(walkers)
    active = list(range(len(walkers)))
    interval = settings["sample_interval"]
    for step in range(1, settings["steps_per_task"] + 1):
        exploration.before_step(dynamics)
        dynamics.step(active)
        exploration.after_step(dynamics, active)
        if step % interval == 0:
            for i in list(active):
                evaluation = dynamics.results[i]
                reasons[i] = blow_up_reason(walkers[i], evaluation.force_disagreement, settings)
                if reasons[i] is not None:
                    active.remove(i)
                    continue
                frame = walkers[i].copy()
                frame.calc = None
                extras = exploration.frame_extras(i, dynamics)
                add_frame(records[i], frame, evaluation, step, extras)
                last_good[i] = frame
                resets[i] = exploration.stop_reason(evaluation.force_disagreement)
                if resets[i] is not None:
                    active.remove(i)
        if not active:
            break
        # A walker that has blown up since its last check exchanges with no one.
        exploration.exchange_now(
            dynamics,
            active,
            step,
            sound=lambda i: (
                blow_up_reason(walkers[i], dynamics.results[i].force_disagreement, settings) is None
            ),
        )

    results = write_walkers(
        records, last_good, reasons, output_paths, last_frame_paths, version, model.n_members
    )
    for result, reset in zip(results, resets, strict=True):
        if reset is not None:  # frames kept; the coordinator resets the walker
            result.update(reset=True, reason=reset)
    return {
        "walkers": results,
        "n_frames": sum(r["n_frames"] for r in results),
        "version": version,
        **exploration.finish(output_paths),
        **where_and_when(t_start),
    }


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
GENERATORS = {
    "md": _run_md,
    "biased_md": _run_md,
    "metadynamics": _run_md,
    "replica_exchange": _run_md,
    "rattle": _rattle,
}
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
