"""The four places where a researcher's own idea plugs in, as ``typing.Protocol``s.

A class needs no base class to plug in: it only has to have the right methods
(structural typing). The built-ins implement these protocols too, and
``tests/test_strategies.py`` checks that they do.

========== ================================================ ============================
protocol   what it decides                                  where it is named
========== ================================================ ============================
Query      which queued candidates the next oracle batch    ``selection.query``
           takes
Label      energies and forces of a batch of structures     ``oracle.calculator`` (any
           (the oracle)                                     ASE calculator); or the app
Generator  new candidate structures from the ensemble       ``generator.kind``
Metrology  extra numbers per ensemble version, on the       ``metrology.plugins``
           held-out set
========== ================================================ ============================

Selection *measures* are plain functions in a registry; see
:mod:`palflow.pipeline.policies.measures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from palflow.pipeline.policies.selection import Candidate


@dataclass
class QueryContext:
    """What a query may use to choose a batch.

    Attributes
    ----------
    rng
        Random numbers.
    labelled_descriptors
        [L, D] descriptors of the labelled structures.
    descriptors
        Callable mapping a list of structures to their [S, D] descriptors.
    """

    rng: np.random.Generator
    labelled_descriptors: np.ndarray | None = None
    descriptors: Any = None


@runtime_checkable
class Query(Protocol):
    """Choose the next oracle batch from the queue.

    ``select`` gets the queued candidates, highest score first, and returns at most
    ``size`` of them; the coordinator removes those from the queue.
    """

    def select(
        self, candidates: Sequence[Candidate], size: int, context: QueryContext
    ) -> list[Candidate]: ...


@runtime_checkable
class Label(Protocol):
    """Label structures: the oracle app's signature (:func:`palflow.apps.oracle._label_batch`).

    Writes the labelled batch to ``output_path`` and returns a dict with at least
    ``output_path``; failures per structure are recorded in the file, not raised.
    """

    def __call__(
        self,
        input_path: str,
        output_path: str,
        calculator_spec: dict[str, Any],
        scratch_dir: str,
        max_force: float,
        timeout_s: float,
        isolate: bool,
    ) -> dict[str, Any]: ...


@runtime_checkable
class Generator(Protocol):
    """Propose candidates: the signature of a generator (:func:`palflow.apps.generator._run_md`,
    :func:`palflow.apps.generator._rattle`, or a user's function named by ``generator.kind``).

    Advances the walkers that start at ``start_paths`` on the ensemble, writes each
    walker's frames (with the members' predictions) to ``output_paths`` and its last
    sound frame to ``last_frame_paths``, and returns ``{"walkers": [...]}`` with one
    dict per walker (``output_path``, ``last_frame_path``, ``n_frames``,
    ``force_disagreement`` and ``energy_disagreement`` per frame, ``blew_up``,
    ``reason``). :func:`palflow.apps.generator.write_walkers` writes and returns all that.
    ``settings`` is the campaign's generator section, plus ``labelled_path`` (the
    newest training snapshot) once there are labels.
    """

    def __call__(
        self,
        start_paths: list[str],
        ensemble_path: str,
        output_paths: list[str],
        last_frame_paths: list[str],
        settings: dict[str, Any],
        seed: int,
    ) -> dict[str, Any]: ...


@dataclass
class Evaluation:
    """An ensemble version measured on the held-out set, structure by structure.

    Attributes
    ----------
    version, labels
        The ensemble version and the active labels it was trained on.
    force_error
        [S] mean absolute force error of the ensemble mean per structure, eV/Å.
    force_spread
        [S] the ensemble's largest atomic force spread per structure, eV/Å.
    energy_error
        [S] signed energy error per atom, eV/atom.
    extra
        Anything else the evaluation returned.
    """

    version: int
    labels: int
    force_error: np.ndarray
    force_spread: np.ndarray
    energy_error: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Metrology(Protocol):
    """Extra metrics of an ensemble version; their names should not clash with the
    built-in ones (see :func:`palflow.pipeline.policies.metrology.standard_metrics`)."""

    def __call__(self, evaluation: Evaluation) -> dict[str, float]: ...
