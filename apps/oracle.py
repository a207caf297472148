"""The oracle: label structures with energy and forces from any ASE calculator.

A calculator is named by import path plus keyword arguments, e.g.
``{"calculator": "xtb.ase.calculator:XTB", "kwargs": {"method": "GFN2-xTB"}}``, so
xTB, DFT codes and ASE's own EMT or LJ plug in the same way. Each task works in its
own scratch directory so that file-based calculators (DFT codes) do not collide; a
task with a failed structure leaves it in the run directory for a post-mortem.

A structure that cannot be labelled is an expected outcome, not a crash: it is
recorded with its reason and never reaches the training data.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from palflow.apps.common import draw_velocities, import_object, where_and_when
from palflow.apps.contracts import FailureKind
from palflow.apps.data.dataset import read_arrays, read_dataset, write_dataset
from palflow.apps.oracles.isolation import close_labeller, label_isolated

logger = logging.getLogger(__name__)

OK = "ok"


class OracleError(RuntimeError):
    """An oracle could not label a structure."""


class BadLabel(OracleError):
    """The oracle returned numbers that must not be trained on (NaN, inf, absurd)."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def failure_kind(error: BaseException) -> FailureKind:
    """The kind of a failed calculation (see :class:`palflow.apps.contracts.FailureKind`)."""
    from ase.calculators.calculator import SCFError

    if isinstance(error, BadLabel):
        return error.kind
    name = type(error).__name__.lower()
    if isinstance(error, SCFError) or "scf" in name or "converge" in name:
        return FailureKind.SCF
    return FailureKind.ERROR


def make_calculator(spec: dict[str, Any], directory: str | Path | None = None) -> Calculator:
    """Build the ASE calculator that ``spec`` names.

    Parameters
    ----------
    spec
        ``{"calculator": "module:Class", "kwargs": {...}}``.
    directory
        Scratch directory for calculators that write files; ignored by those that
        do not accept one.
    """
    factory = import_object(spec["calculator"])
    prefix = mpi_prefix(spec)
    kwargs = {key: _fill(value, prefix) for key, value in spec.get("kwargs", {}).items()}
    if directory is not None:
        try:
            return factory(directory=str(directory), **kwargs)
        except TypeError:
            pass  # calculators without a ``directory`` argument work in memory
    return factory(**kwargs)


def mpi_prefix(spec: dict[str, Any]) -> str:
    """The launch prefix that ``{mpi_prefix}`` in calculator kwargs stands for.

    ``spec["mpi_command"]`` comes from the site. ``"parsl"`` takes the prefix that an
    MPIExecutor composes for each task from its resource specification
    (``$PARSL_MPI_PREFIX``), or ``mpiexec -n {ranks}`` on other executors. Any other
    value is a template with ``{ranks}``, ``{nodes}`` and ``{hosts}``, for launchers
    Parsl does not compose (Parsl's mpiexec flags are MPICH's, not Open MPI's).
    """
    command = spec.get("mpi_command", "parsl")
    ranks = int(os.environ.get("PARSL_NUM_RANKS", spec.get("mpi_ranks", 1)))
    if command == "parsl":
        if os.environ.get("PARSL_MPI_PREFIX"):
            return os.environ["PARSL_MPI_PREFIX"]
        command = "mpiexec -n {ranks}"
    return command.format(
        ranks=ranks,
        nodes=os.environ.get("PARSL_NUM_NODES", spec.get("mpi_nodes", 1)),
        hosts=os.environ.get("PARSL_MPI_NODELIST", "localhost"),
    )


def _fill(value: Any, prefix: str) -> Any:
    """Replace ``{mpi_prefix}`` in strings, also inside nested dicts and lists."""
    if isinstance(value, str):
        return value.replace("{mpi_prefix}", prefix)
    if isinstance(value, dict):
        return {key: _fill(item, prefix) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, prefix) for item in value]
    return value


def _local_scratch() -> Path:
    """A fresh working directory for one task, on node-local disk.

    It lives under ``$PALFLOW_SCRATCH`` or the system's temporary folder, not in the
    run directory: DFT codes write heavily, and some (NWChem) cut long paths short.
    """
    return Path(tempfile.mkdtemp(prefix="palflow-", dir=os.environ.get("PALFLOW_SCRATCH")))


def _release_scratch(scratch: Path, keep_at: str | None) -> None:
    """Remove a task's scratch, or move it to ``keep_at`` for a post-mortem; an empty
    one (a calculator that writes no files) is removed either way."""
    if keep_at is None or all(p.is_dir() for p in scratch.rglob("*")):
        shutil.rmtree(scratch, ignore_errors=True)
        return
    Path(keep_at).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(scratch), keep_at)


@contextmanager
def _task_scratch(keep_at: str) -> Iterator[Path]:
    """A task's scratch (:func:`_local_scratch`); a task that raises leaves it at
    ``keep_at`` for a post-mortem, unless it is empty."""
    scratch = _local_scratch()
    try:
        yield scratch
    except BaseException:
        _release_scratch(scratch, keep_at=keep_at)
        raise


def label_structure(atoms: Atoms, calculator: Calculator, max_force: float) -> Atoms:
    """Return a copy of ``atoms`` holding validated energy (eV) and forces (eV/Å), and
    the stress (eV/Å³) of a cell periodic in all three directions when the
    calculator gives one (:func:`stress_label`).

    Raises
    ------
    BadLabel
        When the energy or forces are not finite, or a force exceeds ``max_force``.
    """
    work = atoms.copy()
    work.calc = calculator
    energy = float(work.get_potential_energy())
    forces = np.array(work.get_forces(), dtype=float)
    if forces.shape != (len(work), 3):
        raise BadLabel(
            FailureKind.BAD_SHAPE, f"forces have shape {forces.shape}, expected {(len(work), 3)}"
        )
    if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
        raise BadLabel(FailureKind.NON_FINITE, "energy or forces are not finite")
    largest = float(np.abs(forces).max(initial=0.0))
    if largest > max_force:
        raise BadLabel(
            FailureKind.ABSURD_FORCE,
            f"force component {largest:.3g} eV/Å exceeds max_force {max_force:g}",
        )
    labelled = atoms.copy()
    stress = stress_label(work, calculator)
    extra = {} if stress is None else {"stress": stress}
    labelled.calc = SinglePointCalculator(labelled, energy=energy, forces=forces, **extra)
    return labelled


def stress_label(atoms: Atoms, calculator: Calculator) -> np.ndarray | None:
    """The stress (Voigt, eV/Å³) of ``atoms`` already evaluated by ``calculator``, or
    None: for a cell not periodic in all directions, a calculator that does not
    implement stress, or an all-zero stress, which xtb-python returns for periodic
    GFN1-xTB in place of one (tblite's ``TBLite`` gives the real one).

    Raises
    ------
    BadLabel
        When the stress is not finite.
    """
    if not atoms.pbc.all() or "stress" not in getattr(calculator, "implemented_properties", ()):
        return None
    stress = np.asarray(atoms.get_stress(voigt=True), dtype=float)
    if not np.all(np.isfinite(stress)):
        raise BadLabel(FailureKind.NON_FINITE, "stress is not finite")
    if not stress.any():
        logger.debug("the calculator returned an all-zero stress: not stored")
        return None
    return stress


class _Labeller:
    """Labels one structure at a time with one calculator, built at the first structure
    and kept for the next ones (a DFT code's shell process serves the whole task); a
    calculator that failed is dropped and built again. :meth:`close` ends it."""

    def __init__(self, spec: dict[str, Any], scratch: Path, max_force: float) -> None:
        self.spec, self.scratch, self.max_force = spec, scratch, max_force
        self.calculator: Calculator | None = None

    def __call__(self, atoms: Atoms) -> tuple[str, Atoms | None]:
        try:
            self.calculator = self.calculator or make_calculator(self.spec, self.scratch)
            return OK, label_structure(atoms, self.calculator, self.max_force)
        except Exception as error:  # any calculator failure is a recorded outcome
            close_labeller(self)  # a failed calculator may hold broken state
            logger.warning("oracle failed on a structure: %s", error)
            return failure_kind(error).reason(f"{type(error).__name__}: {error}"), None

    def close(self) -> None:
        calculator, self.calculator = self.calculator, None
        if calculator is not None and hasattr(calculator, "close"):
            calculator.close()


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
    with _task_scratch(scratch_dir) as scratch:
        label_one = _Labeller(calculator_spec, scratch, max_force)
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
        _release_scratch(scratch, keep_at=scratch_dir if failures else None)
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
    with _task_scratch(scratch_dir) as scratch:
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
        _release_scratch(scratch, keep_at=None)
    return {"output_path": output_path, "n_frames": len(frames), **where_and_when(t_start)}
