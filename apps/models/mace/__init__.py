"""MACE (mace-torch) as a model backend (``model.name = "mace"``).

The settings, the backend class and the spec's resolution live here, light: torch and
mace load only where a spec needs them (a foundation file, the neighbour count) and in
:mod:`palflow.apps.models.mace.ensemble` (the committee) and
:mod:`palflow.apps.models.mace.spec` (the spec, the build lock, foundation files).

A MACE spec fixes, once per campaign and before the first member trains, what every
member must share: the element table, the isolated-atom energies (E0s, by
``model.e0s``) and the mean neighbour count; with ``model.foundation``, the foundation
model's own table, E0s and cutoff. The result goes to ``state.json``, so a resumed
campaign builds the same members.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols
from pydantic import Field

from palflow.apps.models.backend import BackendSettings, ModelBackend, ModelError, SpecInputs
from palflow.apps.models.mace.foundation import missing_foundation
from palflow.apps.models.mace.neighbours import cutoff_problem

logger = logging.getLogger(__name__)


class MACESettings(BackendSettings):
    """``[model]`` of a MACE committee."""

    name: Literal["mace"] = "mace"
    r_max: float = Field(5.0, gt=0)
    """Cutoff radius, Å."""
    num_channels: int = Field(16, ge=1)
    """Channels of MACE's hidden features."""
    max_L: int = Field(1, ge=0, le=3)
    """Largest L of the equivariant hidden features (0: invariant only)."""
    correlation: int = Field(3, ge=1, le=4)
    """Body order of the product basis."""
    num_interactions: int = Field(2, ge=1)
    """Message-passing layers."""
    num_radial_basis: int = Field(8, ge=1)
    """Bessel radial basis functions (MACE's ``num_bessel``)."""
    num_cutoff_basis: int = Field(5, ge=1)
    """Order of the polynomial cutoff envelope (MACE's ``num_polynomial_cutoff``)."""
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of MACE's training and MD (MACE advises float64 for MD)."""
    e0s: Literal["average", "oracle"] | dict[str, float] = "average"
    """Isolated-atom energies: ``average`` (least squares on the first labels),
    ``oracle`` (one oracle call per element on an isolated atom, in the coordinator's
    process), or a table ``{"H": -13.6, ...}`` in eV."""
    foundation: str | None = None
    """A MACE model file every member starts from (fine-tuning), e.g. MACE-MP-0 or
    MACE-OFF, downloaded beforehand; its element table, E0s and cutoff are kept."""

    @property
    def cutoff(self) -> float:
        """``r_max``, Å."""
        return self.r_max


class MACEBackend(ModelBackend):
    """K MACE members evaluated on one shared graph
    (:class:`palflow.apps.models.mace.ensemble.MACEEnsemble`); each exports as a
    standard MACE model file."""

    settings = MACESettings
    requirements = ("mace-torch", "torch", "vesin")
    trains_parts = True

    @classmethod
    def check(cls, settings: MACESettings, start: Atoms) -> None:
        """Refuse, in one line, a foundation file palflow cannot fine-tune or that lacks
        an element of ``start``, an ``e0s`` table that does, and a cutoff that gives
        the periodic ``start`` an absurd neighbour count
        (:mod:`palflow.apps.models.mace.neighbours`)."""
        elements = sorted(set(int(z) for z in start.numbers))
        r_max = settings.r_max
        if settings.foundation:
            if not os.path.isfile(settings.foundation):  # before torch and mace load
                raise ModelError(missing_foundation(settings.foundation))
            from palflow.apps.models.mace.spec import foundation_elements

            try:
                table, _, r_max, _ = foundation_elements(settings.foundation)
            except ValueError as error:
                raise ModelError(str(error)) from None
            _require(elements, table, f"the foundation model {settings.foundation!r}")
        elif isinstance(settings.e0s, dict):
            unknown = sorted(s for s in settings.e0s if s not in atomic_numbers)
            if unknown:
                raise ModelError(f"model.e0s names unknown elements {unknown}")
            _require(elements, [atomic_numbers[s] for s in settings.e0s], "model.e0s")
        problem = cutoff_problem(start, r_max, settings.foundation)
        if problem:
            raise ModelError(problem)

    @classmethod
    def resolve_spec(cls, settings: MACESettings, given: SpecInputs) -> dict[str, Any]:
        """The element table, E0s (eV) and mean neighbour count of every member, or a
        foundation model's table, architecture and cutoff (see the module)."""
        from palflow.apps.models.mace.spec import foundation_spec, mean_neighbours

        labelled, start, oracle = given.labelled, given.start, given.oracle
        spec = settings.model_dump(exclude={"name", "n_members", "e0s"})
        elements = sorted({int(z) for atoms in [start, *labelled] for z in atoms.numbers})
        if settings.foundation:
            # The foundation's table and architecture stay (the campaign's r_max, channels,
            # correlation, ... are not used); the E0s of the campaign's own elements are
            # re-fitted to its oracle as model.e0s says (a foundation trained on another
            # level of theory is offset by eV per atom), the others kept.
            foundation = foundation_spec(settings.foundation)
            table = foundation["atomic_numbers"]
            _require(elements, table, f"the foundation model {settings.foundation!r}")
            own = dict(zip(elements, _e0s(settings, labelled, elements, oracle), strict=True))
            e0s = [own.get(z, e0) for z, e0 in zip(table, foundation["e0s"], strict=True)]
            spec.update(foundation, e0s=e0s, foundation=os.path.abspath(settings.foundation))
            return spec
        if isinstance(settings.e0s, dict):
            table = sorted(atomic_numbers[s] for s in settings.e0s)
            _require(elements, table, "model.e0s")
        else:
            table = elements
        spec.update(
            atomic_numbers=table,
            e0s=_e0s(settings, labelled, table, oracle),
            avg_num_neighbors=mean_neighbours(list(labelled)[:200] or [start], settings.r_max),
        )
        return spec

    @classmethod
    def missing_elements(cls, spec: dict[str, Any], structures: Sequence[Atoms]) -> list[str]:
        """Elements of ``structures`` that the spec's element table lacks."""
        table = set(spec["atomic_numbers"])
        present = {int(z) for atoms in structures for z in atoms.numbers}
        return [chemical_symbols[z] for z in sorted(present - table)]

    @classmethod
    def ensemble_class(cls) -> type:
        from palflow.apps.models.mace.ensemble import MACEEnsemble

        return MACEEnsemble

    @classmethod
    def export(cls, model: Any, stem: str | os.PathLike) -> list[str]:
        """Each member as a standard MACE model file ``{stem}.member{k}.model``."""
        return model.export(str(stem))


def _require(elements: Sequence[int], table: Sequence[int], where: str) -> None:
    missing = [chemical_symbols[z] for z in elements if z not in set(table)]
    if missing:
        fix = (
            "choose a foundation model that knows them (MACE-MP-0 knows Z = 1 to 89), or "
            "drop model.foundation"
            if where.startswith("the foundation")
            else "give every element an E0, or choose a model that knows them"
        )
        names = ", ".join(missing)
        raise ModelError(f"the campaign's element(s) {names} are not in {where}: {fix}")


def _e0s(
    settings: MACESettings,
    labelled: Sequence[Atoms],
    elements: list[int],
    oracle: Callable[[], Any],
) -> list[float]:
    """The isolated-atom energies of ``elements`` as ``model.e0s`` says, eV."""
    if isinstance(settings.e0s, dict):
        _require(elements, [atomic_numbers[s] for s in settings.e0s], "model.e0s")
        return [float(settings.e0s[chemical_symbols[z]]) for z in elements]
    if settings.e0s == "oracle":
        return oracle_e0s(elements, oracle())
    return fit_e0s(labelled, elements)


def fit_e0s(structures: Sequence[Atoms], atomic_numbers: Sequence[int]) -> list[float]:
    """Isolated-atom energies by least squares on labelled structures (``"average"``).

    Minimum-norm least squares of ``E_s ≈ sum_Z count_sZ * E0_Z``: a campaign of one
    composition gets the energy per atom spread evenly over its elements.
    """
    energies, counts = [], []
    for atoms in structures:
        results = getattr(atoms.calc, "results", None) or {}
        if "energy" in results:
            energies.append(float(results["energy"]))
            counts.append([int((atoms.numbers == z).sum()) for z in atomic_numbers])
    if not energies:
        raise ValueError("model.e0s = 'average' needs labelled structures")
    coefficients, *_ = np.linalg.lstsq(np.asarray(counts, float), np.asarray(energies), rcond=None)
    return [float(c) for c in coefficients]


def oracle_e0s(atomic_numbers: Sequence[int], calculator: Any) -> list[float]:
    """Isolated-atom energies by one oracle call per element (``"oracle"``)."""
    energies = []
    for z in atomic_numbers:
        atom = Atoms(numbers=[z], positions=[[0.0, 0.0, 0.0]])
        atom.calc = calculator
        energies.append(float(atom.get_potential_energy()))
    return energies
