"""A generator plug-in: stretch and compress bonds of each walker's structure.

MD at a modest temperature rarely visits broken or compressed bonds; a potential
meant for reactive events needs them. This generator proposes such structures
directly. Name it in a campaign:

    [generator]
    kind = "examples/plugins/bond_stretch.py:generate"

A generator is any function with the signature of
:class:`palflow.pipeline.policies.protocols.Generator`. This one shows the three steps every
generator takes, with palflow's helpers:

1. load the ensemble (:func:`palflow.apps.models.core.load_checkpoint`);
2. make candidate frames and let the ensemble score them in one batched pass
   (:func:`palflow.apps.models.calculator.predict_structures`);
3. write each walker's frames and last frame and return what the coordinator reads
   (:func:`palflow.apps.generator.write_walkers`).

Settings come from the campaign's ``[generator]`` section: ``steps_per_task //
sample_interval`` frames per walker, each with one bond (a pair closer than 1.8 Å)
scaled by a factor drawn uniformly from 0.8 to 1.6, plus ``rattle_stdev`` Å of noise
on every atom.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase.io import read

BOND_LENGTH = 1.8
"""Pairs closer than this (Å) count as bonds."""
SCALES = (0.8, 1.6)
"""The range a bond's length is scaled by."""


def stretched(atoms, rng: np.random.Generator, stdev: float):
    """A copy of ``atoms`` with one random bond scaled (the second atom moves)."""
    frame = atoms.copy()
    distances = frame.get_all_distances(mic=bool(frame.pbc.any()))
    i, j = np.nonzero(np.triu(distances < BOND_LENGTH, k=1))
    if len(i):
        pick = rng.integers(len(i))
        a, b = int(i[pick]), int(j[pick])
        frame.set_distance(a, b, distances[a, b] * rng.uniform(*SCALES), fix=0)
    frame.positions += rng.normal(0.0, stdev, frame.positions.shape)
    return frame


def generate(
    start_paths: list[str],
    ensemble_path: str,
    output_paths: list[str],
    last_frame_paths: list[str],
    settings: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    from palflow.apps.generator import add_frame, evaluations, new_record, write_walkers
    from palflow.apps.models.calculator import predict_structures
    from palflow.apps.models.core import load_checkpoint

    model, extra = load_checkpoint(ensemble_path)
    rng = np.random.default_rng(seed)
    n_frames = max(settings["steps_per_task"] // settings["sample_interval"], 1)
    starts = [read(path) for path in start_paths]
    frames = [stretched(s, rng, settings["rattle_stdev"]) for s in starts for _ in range(n_frames)]
    out = predict_structures(model, frames)

    records = [new_record() for _ in starts]
    for n, (frame, evaluation) in enumerate(zip(frames, evaluations(out), strict=True)):
        add_frame(records[n // n_frames], frame, evaluation, step=n)
    results = write_walkers(
        records,
        last_good=starts,  # walkers do not move: every task stretches the start again
        reasons=[None] * len(starts),
        output_paths=output_paths,
        last_frame_paths=last_frame_paths,
        version=int(extra.get("version", -1)),
        n_members=model.n_members,
    )
    return {"walkers": results, "n_frames": len(frames)}
