"""The contracts between palflow's pieces, each defined once.

* the four **module labels**: the executor labels a site must define and every
  app is bound to, and which module runs each kind of task;
* the **failure kinds** of an oracle calculation, and which of them are worth
  another attempt;
* the **calculator spec** of the oracle (:class:`CalculatorSpec`), built from the
  campaign's oracle settings in one place;
* the **request** each app takes: one small frozen dataclass per app, whose fields
  are the app's keyword arguments (``tests/test_contracts.py`` holds them to the
  apps' signatures).

This module imports neither torch nor Parsl: the coordinator, the site loader, the
report and the apps all read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

MODULES = ("oracle", "generator", "train", "infer")
"""Executor labels: the only link between apps and site configs."""

MODULE_OF_KIND = {
    "reference": "oracle",
    "label": "oracle",
    "generate": "generator",
    "train": "train",
    "score": "infer",
    "evaluate": "infer",
}
"""Which module runs each kind of task."""


class FailureKind(StrEnum):
    """Why a structure was not labelled; a failure is recorded as ``"kind: message"``."""

    ERROR = "error"
    """The calculator raised."""
    TIMEOUT = "timeout"
    """The calculation ran past ``oracle.timeout_s``."""
    CRASH = "crash"
    """The calculation's process died."""
    TASK_LOST = "task-lost"
    """The whole oracle task failed (a lost worker, a killed job)."""
    NON_FINITE = "non-finite"
    """NaN or infinite energy or forces."""
    ABSURD_FORCE = "absurd-force"
    """A force component above ``oracle.max_force``."""
    BAD_SHAPE = "bad-shape"
    """Forces of the wrong shape."""
    SCF = "scf"
    """The self-consistent field did not converge."""

    @property
    def transient(self) -> bool:
        """Whether another attempt on the same structure may succeed."""
        return self in _TRANSIENT

    def reason(self, message: str) -> str:
        """The recorded failure: ``"kind: message"``, at most 500 characters."""
        return f"{self.value}: {message}"[:500]

    @classmethod
    def of(cls, reason: str) -> FailureKind:
        """The kind of a recorded failure ``"kind: message"`` (``error`` if unknown)."""
        head = reason.split(":", 1)[0].strip()
        try:
            return cls(head)
        except ValueError:
            return cls.ERROR


_TRANSIENT = frozenset(
    {FailureKind.ERROR, FailureKind.TIMEOUT, FailureKind.CRASH, FailureKind.TASK_LOST}
)


def failure_counts(reasons: Any) -> dict[str, int]:
    """Recorded failures counted by kind, e.g. ``{"timeout": 2, "scf": 1}``."""
    counts: dict[str, int] = {}
    for reason in reasons:
        kind = FailureKind.of(reason).value
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# --------------------------------------------------------------------- the oracle
@dataclass(frozen=True)
class CalculatorSpec:
    """The oracle's calculator: an import path, its keyword arguments, and how an MPI
    code is launched (:func:`palflow.apps.oracles.calculators.make_calculator`).

    The apps take it as the plain dict of :meth:`as_dict`, which pickles and reads
    back in a worker with nothing of palflow's but the apps.
    """

    calculator: str
    """``module:Class`` (or ``path/to/file.py:Class``) of an ASE calculator."""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Its keyword arguments; ``{mpi_prefix}`` in a string is the launch prefix."""
    mpi_ranks: int = 1
    mpi_nodes: int = 1
    mpi_command: str = "parsl"
    """The site's launch prefix template (:func:`palflow.apps.oracles.calculators.mpi_prefix`)."""

    @classmethod
    def of(cls, oracle: Any, mpi_command: str = "parsl") -> CalculatorSpec:
        """The spec of a campaign's validated ``[oracle]`` settings, on a site whose
        launch prefix template is ``mpi_command``."""
        return cls(
            calculator=oracle.calculator,
            kwargs=dict(oracle.kwargs),
            mpi_ranks=oracle.mpi_ranks,
            mpi_nodes=oracle.mpi_nodes,
            mpi_command=mpi_command,
        )

    def as_dict(self) -> dict[str, Any]:
        """The plain dict the apps take (``calculator_spec``)."""
        return {
            "calculator": self.calculator,
            "kwargs": dict(self.kwargs),
            "mpi_ranks": self.mpi_ranks,
            "mpi_nodes": self.mpi_nodes,
            "mpi_command": self.mpi_command,
        }


# --------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    """What one task is asked to do; :meth:`kwargs` are the app's keyword arguments."""

    app: ClassVar[str]
    """The app in :mod:`apps` that takes this request."""

    def kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class LabelRequest(Request):
    """Label the structures of ``input_path`` (:func:`palflow.apps.oracle._label_batch`)."""

    app: ClassVar[str] = "label_batch"
    input_path: str
    output_path: str
    calculator_spec: dict[str, Any]
    scratch_dir: str
    max_force: float
    timeout_s: float
    isolate: bool


@dataclass(frozen=True)
class ReferenceRequest(Request):
    """Oracle-driven MD for the held-out set (:func:`palflow.apps.oracle._oracle_md`)."""

    app: ClassVar[str] = "oracle_md"
    start_path: str
    output_path: str
    calculator_spec: dict[str, Any]
    scratch_dir: str
    n_frames: int
    stride: int
    temperature_K: float
    timestep_fs: float
    seed: int


@dataclass(frozen=True)
class MDRequest(Request):
    """One segment of a group of walkers, by the generator ``generator.kind`` names
    (:func:`palflow.apps.generator._generate`; MD by default)."""

    app: ClassVar[str] = "generate"
    generator: str
    start_paths: list[str]
    ensemble_path: str
    output_paths: list[str]
    last_frame_paths: list[str]
    settings: dict[str, Any]
    seed: int


@dataclass(frozen=True)
class TrainRequest(Request):
    """A few epochs of one member (:func:`palflow.apps.training._train_member`)."""

    app: ClassVar[str] = "train_member"
    member: int
    dataset_path: str | dict[str, Any]
    """A dataset file, or a selection of the label log's rows (the coordinator's)."""
    checkpoint_in: str | None
    checkpoint_out: str
    spec: dict[str, Any]
    settings: dict[str, Any]
    seed: int
    n_epochs: int
    validation_path: str | dict[str, Any] | None


@dataclass(frozen=True)
class ScoreRequest(Request):
    """Re-score the oracle queue (:func:`palflow.apps.inference._score_candidates`)."""

    app: ClassVar[str] = "score_candidates"
    ensemble_path: str
    input_path: str
    output_path: str


@dataclass(frozen=True)
class EvaluateRequest(Request):
    """The held-out errors of one version, and its errors on the validation labels
    (:func:`palflow.apps.inference._evaluate_test`); an empty ``test_path`` for a
    campaign without a held-out set."""

    app: ClassVar[str] = "evaluate_test"
    ensemble_path: str
    test_path: str
    validation_path: str | dict[str, Any] | None = None


REQUESTS = (LabelRequest, ReferenceRequest, MDRequest, TrainRequest, ScoreRequest, EvaluateRequest)
