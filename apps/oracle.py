"""The oracle apps: label a batch of structures, and oracle-driven MD for the held-out set.

Each task works in its own scratch directory so that file-based calculators (DFT
codes) do not collide; a task with a failed structure leaves it in the run
directory for a post-mortem. A structure that cannot be labelled is an expected
outcome, not a crash: it is recorded with its reason and never reaches the
training data. Building the calculator and checking its numbers is
:mod:`palflow.apps.oracles.calculators`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from palflow.apps.common import draw_velocities, where_and_when
from palflow.apps.data.dataset import read_arrays, read_dataset, write_dataset
from palflow.apps.oracles.calculators import (
    OK,
    Labeller,
    make_calculator,
    release_scratch,
    stress_label,
    task_scratch,
)
from palflow.apps.oracles.isolation import close_labeller, label_isolated


def _label_batch(
    input_path: str,
    output_path: str,
    calculator_spec: dict[str, Any],
    scratch_dir: str,
    *,
    max_force: float,
    timeout_s: float,
    isolate: bool,
    parsl_resource_specification: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Label every structure of ``input_path`` and write them to ``output_path``.

    ``max_force``, ``timeout_s`` and ``isolate`` are the campaign's ``oracle``
    settings, with no defaults here. With ``isolate`` each calculation runs in a
    forked child, so that one that hangs past ``timeout_s`` (0: no limit) or kills
    its process costs only its structure (see :mod:`palflow.apps.oracles.isolation`).

    The output is written atomically, so an existing output file is a complete
    result. ``parsl_resource_specification`` (ranks, nodes) is read by Parsl's
    MPIExecutor, which sets ``$PARSL_MPI_PREFIX`` for the task. Structures that
    failed keep NaN labels and their reason in the ``status`` array; ``"ok"`` marks
    the good ones.

    Returns
    -------
    dict
        ``n_ok``, ``failures`` (list of ``[candidate_id, reason]``), the output path,
        per-structure oracle seconds, and where and when the task ran.
    """
    t_start = time.time()
    structures = read_dataset(input_path)
    ids = read_arrays(input_path).get("candidate_id", np.arange(len(structures)))
    with task_scratch(scratch_dir) as scratch:
        label_one = Labeller(calculator_spec, scratch, max_force)
        if isolate:
            outcomes = label_isolated(structures, label_one, timeout_s or None)
        else:
            outcomes = []
            for atoms in structures:
                t0 = time.perf_counter()
                outcomes.append((*label_one(atoms), time.perf_counter() - t0))
        close_labeller(label_one)  # in the parent: a no-op when the child labelled
        statuses = [status for status, _, _ in outcomes]
        seconds = [elapsed for _, _, elapsed in outcomes]
        labelled = [
            done if done is not None else atoms.copy()
            for (_, done, _), atoms in zip(outcomes, structures, strict=True)
        ]
        write_dataset(
            output_path,
            labelled,
            extra={"candidate_id": np.asarray(ids), "status": np.asarray(statuses, dtype=str)},
        )
        failures = [[int(i), s] for i, s in zip(ids, statuses, strict=True) if s != OK]
        release_scratch(scratch, keep_at=scratch_dir if failures else None)
    return {
        "output_path": output_path,
        "n_ok": len(statuses) - len(failures),
        "failures": failures,
        "oracle_seconds": seconds,
        **where_and_when(t_start),
    }


def _oracle_md(
    start_path: str,
    output_path: str,
    calculator_spec: dict[str, Any],
    scratch_dir: str,
    n_frames: int,
    stride: int,
    temperature_K: float,
    timestep_fs: float,
    seed: int,
    parsl_resource_specification: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run Langevin MD on the oracle itself and keep every ``stride``-th frame.

    Used to make the held-out test set: frames from the oracle's own thermal
    ensemble, labelled by the same oracle as the training data.
    """
    from ase import units
    from ase.io import read
    from ase.md.langevin import Langevin

    t_start = time.time()
    atoms = read(start_path)
    with task_scratch(scratch_dir) as scratch:
        calculator = atoms.calc = make_calculator(calculator_spec, scratch)
        try:
            rng = np.random.default_rng(seed)
            draw_velocities(atoms, temperature_K, rng)
            dynamics = Langevin(
                atoms,
                timestep_fs * units.fs,
                temperature_K=temperature_K,
                friction=0.02,
                fixcm=False,
                rng=rng,
            )
            frames = []
            # The first stride lets the start structure's memory fade before sampling.
            for _ in range(n_frames):
                dynamics.run(stride)
                frame = atoms.copy()
                stress = stress_label(atoms, atoms.calc)
                frame.calc = SinglePointCalculator(
                    frame,
                    energy=atoms.get_potential_energy(),
                    forces=atoms.get_forces(),
                    **({} if stress is None else {"stress": stress}),
                )
                frames.append(frame)
            write_dataset(output_path, frames)
        finally:
            # A DFT code's shell process (on Slurm, its srun step, which holds the
            # cores the next oracle task needs) ends with the task.
            if hasattr(calculator, "close"):
                calculator.close()
        release_scratch(scratch, keep_at=None)
    return {"output_path": output_path, "n_frames": len(frames), **where_and_when(t_start)}
