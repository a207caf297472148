"""What a model backend is: the one extension point for the ensemble potentials.

A backend is one class, :class:`ModelBackend`, in one module (or one subpackage) that
owns everything about its model: the campaign's ``[model]`` settings
(:class:`BackendSettings`), fixing the spec of every member once per campaign,
building, saving and loading ensembles, and exporting members to the model's own file
format. palflow asks for a backend by ``model.name`` through
:mod:`palflow.apps.models.registry`: a built-in name (``"schnet"``, ``"mace"``) or an
import path, ``"mypkg.mymodel:MyBackend"`` or ``"path/to/file.py:MyBackend"``.

This module imports neither torch nor any model code, so that the coordinator can read
a backend's settings and resolve its spec without them; a backend imports its heavy
code inside :meth:`ModelBackend.ensemble_class` (and the methods that need it).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field

from palflow.apps.errors import InputError

logger = logging.getLogger(__name__)


class ModelError(InputError):
    """The model settings cannot describe this campaign (an unknown backend, an element
    without an E0, a foundation file that is not a model, ...)."""


class BackendSettings(BaseModel):
    """The campaign's ``[model]`` section common to every backend; each backend
    subclasses it with its own keys, so that a key of another backend is an error.

    Unknown keys are errors and no float may be infinite or NaN, as in every section.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    name: str
    """The backend: ``"schnet"``, ``"mace"``, ``"sevennet"``, or an import path
    ``"module:Backend"``."""
    n_members: int = Field(4, ge=2)
    """Members of the committee (ensemble size K)."""
    # A subclass also gives ``cutoff``, the model's neighbour cutoff in Å (a field or a
    # property): the coordinator's structure descriptors use the same.


@dataclass(frozen=True)
class SpecInputs:
    """What a backend may fix its members' spec from (:meth:`ModelBackend.resolve_spec`).

    One object rather than one argument each, so that a backend needing more later
    does not change every backend's signature.
    """

    labelled: Sequence[Atoms]
    """The labels so far (energies eV, forces eV/Å), e.g. to fit E0s on."""
    start: Atoms
    """A structure holding every element of the campaign."""
    oracle: Callable[[], Any]
    """Called with no argument, returns the campaign's oracle as an ASE calculator (e.g.
    for isolated-atom energies); call it only when needed."""


class ModelBackend(ABC):
    """A model family behind palflow's committee: subclass it, in one module.

    Like ASE's ``Calculator``, a backend is a few class attributes and a few methods;
    all methods are class methods, as a backend holds no state. Implement
    :meth:`ensemble_class` and :meth:`resolve_spec`, and set :attr:`settings`; the
    other methods have defaults that fit an ensemble class such as
    :class:`palflow.apps.models.schnet.network.SchNetEnsemble`.

    The ensemble class (a ``torch.nn.Module``) follows
    :class:`palflow.apps.models.core.PotentialEnsemble`:

    - ``__init__(spec, n_members, device=None, seed=0)``; ``device="meta"`` may build
      an empty shell that :meth:`load` fills;
    - ``spec_class``: a class attribute, the spec's type, with ``from_dict(dict)`` and,
      on the instance, ``spec.to_dict()`` (plain JSON values) and ``spec.cutoff`` (Å);
    - ``forward(batch, compute_forces=True, compute_stress=False)`` on a
      :class:`palflow.apps.models.graph.AtomsBatch` of N atoms in S structures,
      returning ``{"energy": [K, S] eV, "forces": [K, N, 3] eV/Å}`` and, with
      ``compute_stress``, ``"stress": [K, S, 3, 3]`` eV/Å³ (ASE's sign, NaN for a
      structure without a cell); forces keep their graph in training mode;
    - ``n_members`` (K), ``member(k)`` (a K=1 copy) and the class method
      ``stack(members)`` (members concatenated in order);
    - ``fit_energy_reference(structures)``: per-element energy offsets (eV) from the
      labels (``atoms.calc.results``), before a fresh member trains.

    Attributes
    ----------
    settings
        The pydantic settings class of ``[model]`` (a :class:`BackendSettings`
        subclass; a built-in's ``name`` is a ``Literal`` of its registry name).
    requirements
        Distribution names the model needs installed (``"mace-torch"``); the
        pre-flight refuses a campaign whose environment lacks one, naming it.
    trains_parts
        Whether the ensemble class has ``trainable_parameters(part)`` for
        ``training.train_only``; the pre-flight refuses that setting otherwise.
    committee
        Whether its members disagree where they do not know (a committee of
        independently trained members). A backend whose members are copies of one
        model sets it False, and the pre-flight refuses ``generator.kind =
        "biased_md"``, which follows their disagreement.
    """

    settings: ClassVar[type[BackendSettings]]
    requirements: ClassVar[tuple[str, ...]] = ()
    trains_parts: ClassVar[bool] = False
    committee: ClassVar[bool] = True

    # ------------------------------------------------------------- in the coordinator
    @classmethod
    def check(cls, settings: BackendSettings, start: Atoms) -> None:
        """Fail before anything runs when the model cannot learn the elements of
        ``start`` (one structure holding every element of the campaign): raise
        :class:`ModelError` naming the file or the element at fault. Default: any
        element will do."""
        return None

    @classmethod
    @abstractmethod
    def resolve_spec(cls, settings: BackendSettings, given: SpecInputs) -> dict[str, Any]:
        """The spec of every member, fixed once per campaign before the first trains.

        Parameters
        ----------
        settings
            The campaign's ``[model]`` section.
        given
            What the campaign knows by then: its labels, a start structure, its oracle.

        Returns
        -------
        dict
            Plain JSON values (written to ``state.json``, passed to training tasks),
            which ``ensemble_class().spec_class.from_dict`` takes. A key
            ``"foundation"`` names a model file that workers read from the run's copy.
        """

    @classmethod
    def starts_from_foundation(cls, spec: dict[str, Any]) -> bool:
        """Whether members start from a pretrained model (default: the spec names a
        ``foundation`` file). Such a campaign publishes the untrained members as
        version 0, which drives the first walkers and records the zero-shot error."""
        return bool(spec.get("foundation"))

    @classmethod
    def missing_elements(cls, spec: dict[str, Any], structures: Sequence[Atoms]) -> list[str]:
        """Chemical symbols of ``structures`` that a model of ``spec`` cannot treat
        (default: none, for a model that embeds any element)."""
        return []

    @classmethod
    def preload(cls) -> None:
        """Import the model's code now (default: :meth:`ensemble_class`). The
        coordinator calls it in its main thread before any task thread runs: on a
        thread-pool site tasks run in its process, and an oracle's forked child would
        inherit an import lock that a task thread held."""
        cls.ensemble_class()

    # --------------------------------------------------------------- in the workers
    @classmethod
    @abstractmethod
    def ensemble_class(cls) -> type:
        """The ensemble class (``torch.nn.Module``); import torch and the model here."""

    @classmethod
    def new_ensemble(
        cls, spec: dict[str, Any], n_members: int = 1, seed: int = 0, device: Any = None
    ) -> Any:
        """A freshly initialised ensemble of ``n_members`` with ``spec``; the initial
        weights depend on ``seed`` alone."""
        import torch

        ensemble = cls.ensemble_class()
        torch.manual_seed(seed)
        model = ensemble(ensemble.spec_class.from_dict(spec), n_members, seed=seed)
        return model.to(device) if device is not None else model

    @classmethod
    def new_member(
        cls, spec: dict[str, Any], structures: Sequence[Atoms], seed: int, device: Any = None
    ) -> Any:
        """One fresh member (K=1) that a training task starts from, its energy
        reference fitted to the labelled ``structures``."""
        model = cls.new_ensemble(spec, 1, seed=seed, device=device)
        model.fit_energy_reference(structures)
        return model

    @classmethod
    def load(cls, spec: dict[str, Any], n_members: int, state: dict[str, Any]) -> Any:
        """An ensemble from a checkpoint's spec, size and ``state_dict`` (its tensors
        already on the target device); without drawing random numbers."""
        ensemble = cls.ensemble_class()
        return from_state_dict(ensemble, ensemble.spec_class.from_dict(spec), n_members, state)

    @classmethod
    def export(cls, model: Any, stem: str | os.PathLike) -> list[str]:
        """Write each member of ``model`` in the model's own file format, as
        ``{stem}.member{k}.<suffix>``; return the paths (default: none)."""
        return []


def from_state_dict(cls, spec, n_members: int, state: dict, training: bool = False):
    """Build a model from ``state`` without drawing random numbers for a throw-away init."""
    model = cls(spec, n_members, device="meta")
    # assign=True adopts the tensors' device and dtype instead of copying into meta.
    model.load_state_dict(state, assign=True)
    return model.train(training)
