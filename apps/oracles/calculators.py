"""Oracle calculators: build the one a spec names, and check what it labels.

A calculator is named by import path plus keyword arguments
(:class:`palflow.apps.contracts.CalculatorSpec`), e.g.
``{"calculator": "xtb.ase.calculator:XTB", "kwargs": {"method": "GFN2-xTB"}}``, so
xTB, DFT codes and ASE's own EMT or LJ plug in the same way. This module holds what
the oracle apps (:mod:`palflow.apps.oracle`) and the pre-flight share: building the
calculator (:func:`make_calculator`, with the MPI launch prefix of :func:`mpi_prefix`),
labelling one structure with validated numbers (:func:`label_structure`), the kind of
a failure, and each task's scratch directory on node-local disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator

from palflow.apps.common import import_object
from palflow.apps.contracts import FailureKind
from palflow.apps.errors import OracleError
from palflow.apps.oracles.isolation import close_labeller

logger = logging.getLogger(__name__)

OK = "ok"


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


def close_calculators(path: str, n: int = 3) -> list[str]:
    """Close spellings of a calculator path ``path`` that does not import: the public
    callables of its module named like its attribute (``ase.calculators.emt:ETM`` gives
    ``ase.calculators.emt:EMT``), or, for a bare module name that does not import
    (``emt:EMT``), the same in ASE's calculator module of that name. Empty when
    nothing is close."""
    import difflib
    import importlib
    import sys

    file_name, sep, attribute = path.rpartition(":")
    if sep and file_name.endswith(".py"):
        # import_object loaded the file as palflow_user.<stem>, if it imports at all.
        module = sys.modules.get(f"palflow_user.{Path(file_name).stem}")
        modules = [(file_name, module)] if module is not None else []
        original = file_name
    else:
        module_name, sep, attribute = path.partition(":")
        if not sep:
            module_name, _, attribute = path.rpartition(".")
        if not module_name or not attribute:
            return []
        original, names = module_name, [module_name]
        if "." not in module_name and _find_spec(module_name) is None:
            names.append(f"ase.calculators.{module_name.lower()}")
        modules = []
        for name in names:
            if _find_spec(name) is None:
                continue
            try:
                modules.append((name, importlib.import_module(name)))
            except Exception:  # a module that fails on import offers no names
                continue
    close = []
    for name, module in modules:
        if getattr(module, attribute, None) is not None:
            if name != original:  # ASE's module has it: the module was misnamed
                close.append(f"{name}:{attribute}")
            continue
        public = {
            key.lower(): key
            for key, value in vars(module).items()
            if not key.startswith("_") and callable(value)
        }
        matches = difflib.get_close_matches(attribute.lower(), list(public), n=n, cutoff=0.6)
        close.extend(f"{name}:{public[match]}" for match in matches)
    return close[:n]


def _find_spec(name: str) -> Any:
    """``importlib.util.find_spec``, or None where a parent package is missing."""
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


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


def local_scratch() -> Path:
    """A fresh working directory for one task, on node-local disk.

    It lives under ``$PALFLOW_SCRATCH`` or the system's temporary folder, not in the
    run directory: DFT codes write heavily, and some (NWChem) cut long paths short.
    """
    return Path(tempfile.mkdtemp(prefix="palflow-", dir=os.environ.get("PALFLOW_SCRATCH")))


def release_scratch(scratch: Path, keep_at: str | None) -> None:
    """Remove a task's scratch, or move it to ``keep_at`` for a post-mortem; an empty
    one (a calculator that writes no files) is removed either way."""
    if keep_at is None or all(p.is_dir() for p in scratch.rglob("*")):
        shutil.rmtree(scratch, ignore_errors=True)
        return
    Path(keep_at).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(scratch), keep_at)


@contextmanager
def task_scratch(keep_at: str) -> Iterator[Path]:
    """A task's scratch (:func:`local_scratch`); a task that raises leaves it at
    ``keep_at`` for a post-mortem, unless it is empty."""
    scratch = local_scratch()
    try:
        yield scratch
    except BaseException:
        release_scratch(scratch, keep_at=keep_at)
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


class Labeller:
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
