"""Informativeness measures: how much a structure is worth labelling, by name.

A measure maps an ensemble's predictions on S structures to S scores, higher
meaning more worth labelling. Measures are plain functions kept in a registry, so
a campaign picks one by name (``selection.measure``) and a user adds one with a
decorator::

    from palflow.pipeline.policies.measures import register_measure

    @register_measure("force_spread_squared")
    def force_spread_squared(prediction, context):
        return max_force_spread(prediction, context) ** 2

A campaign may also name a measure by import path (``"mypackage.module:function"``
or ``"path/to/file.py:function"``); it is imported, and registered, on first use.

Every measure sees an :class:`EnsemblePrediction` (what the K members said) and a
:class:`MeasureContext` (random numbers, the labelled set's descriptors, options).
The coordinator evaluates them, so the generator and inference apps stay
independent of the choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy.spatial.distance import cdist

from palflow.apps.common import import_object
from palflow.apps.errors import PluginError, SettingsError
from palflow.apps.models.disagreement import (
    atom_force_spread,
    ensemble_disagreement,
    stress_disagreement,
)

__all__ = [
    "MEASURES",
    "EnsemblePrediction",
    "Measure",
    "MeasureContext",
    "get_measure",
    "measure_options",
    "register_measure",
]


@dataclass
class EnsemblePrediction:
    """What the members of an ensemble predict for S structures.

    Attributes
    ----------
    member_energies
        [K, S] total energies, eV.
    member_forces
        [K, N, 3] forces, eV/Å, the atoms of all structures concatenated.
    structure_index
        [N] structure of each atom.
    n_atoms
        [S] atoms per structure.
    descriptors
        [S, D] a structural descriptor per structure (see :func:`descriptor`), for
        the diversity measures; None when nobody asked for it.
    member_stress
        [K, S, 3, 3] stresses, eV/Å³ (NaN for a structure without a cell); None when
        no structure has a cell.
    """

    member_energies: np.ndarray
    member_forces: np.ndarray
    structure_index: np.ndarray
    n_atoms: np.ndarray
    descriptors: np.ndarray | None = None
    member_stress: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EnsemblePrediction | None:
        """The members' predictions stored beside structures, or None when the file
        holds none.

        Generator files hold ``member_energies`` [F, K] and ``member_forces``
        [F, K, n, 3] (and ``member_stress`` [F, K, 3, 3] with a cell); scoring files
        ``member_energies`` [K, S], ``member_forces`` [K, N, 3], ``n_atoms`` [S] (and
        ``member_stress`` [K, S, 3, 3]).
        """
        if "member_forces" not in arrays:
            return None
        energies, forces = arrays["member_energies"], arrays["member_forces"]
        stress = arrays.get("member_stress")
        if forces.ndim == 3:
            n_atoms = arrays["n_atoms"].astype(np.int64)
        else:
            n_frames, n_members, n, _ = forces.shape
            energies = energies.T
            forces = forces.transpose(1, 0, 2, 3).reshape(n_members, n_frames * n, 3)
            n_atoms = np.full(n_frames, n, dtype=np.int64)
            stress = None if stress is None else stress.transpose(1, 0, 2, 3)
        return cls(
            member_energies=np.asarray(energies, dtype=float),
            member_forces=np.asarray(forces, dtype=float),
            structure_index=np.repeat(np.arange(len(n_atoms)), n_atoms),
            n_atoms=n_atoms,
            member_stress=None if stress is None else np.asarray(stress, dtype=float),
        )

    @property
    def n_structures(self) -> int:
        return len(self.n_atoms)

    @property
    def n_members(self) -> int:
        return self.member_energies.shape[0]

    def per_structure_max(self, per_atom: np.ndarray) -> np.ndarray:
        """[S] largest per-atom value of each structure."""
        out = np.full(self.n_structures, -np.inf)
        np.maximum.at(out, self.structure_index, per_atom)
        return out

    def atom_force_spread(self) -> np.ndarray:
        """[N] root-mean-square deviation of the members' force vectors from their mean."""
        return atom_force_spread(self.member_forces)

    def spreads(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[S] energy spread per atom, largest and mean atomic force spread: the
        calculator's own :func:`~palflow.apps.models.calculator.ensemble_disagreement`."""
        return ensemble_disagreement(
            self.member_energies, self.member_forces, self.structure_index, self.n_atoms
        )


@dataclass
class MeasureContext:
    """What a measure may use besides the predictions.

    Attributes
    ----------
    rng
        Random numbers (random and Thompson-style measures).
    labelled_descriptors
        [L, D] descriptors of the labelled structures (diversity measures).
    options
        ``selection.measure_options`` of the campaign, e.g. ``{"kappa": 2.0}``.
    """

    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    labelled_descriptors: np.ndarray | None = None
    options: dict[str, Any] = field(default_factory=dict)


class Measure(Protocol):
    """Scores S structures, higher meaning more worth labelling."""

    def __call__(self, prediction: EnsemblePrediction, context: MeasureContext) -> np.ndarray: ...


MEASURES: dict[str, Measure] = {}
"""Every registered measure by name."""

NEEDS_DESCRIPTORS: set[str] = set()
"""Names of the measures that read ``prediction.descriptors``."""

OPTIONS: dict[str, dict[str, Any]] = {}
"""The options each registered measure reads, with their defaults."""


def register_measure(
    name: str, *, descriptors: bool = False, options: dict[str, Any] | None = None
) -> Callable[[Measure], Measure]:
    """Decorator: register a measure under ``name`` (set ``descriptors`` when it
    reads ``prediction.descriptors``; ``options`` names the keys of
    ``selection.measure_options`` it reads, with their defaults, else its own
    ``options`` attribute does; without either it takes any).

    Raises
    ------
    ValueError
        When another measure already has the name.
    """

    def register(function: Measure) -> Measure:
        if name in MEASURES and MEASURES[name] is not function:
            raise ValueError(f"a measure named {name!r} is already registered")
        MEASURES[name] = function
        declared = options if options is not None else getattr(function, "options", None)
        if isinstance(declared, dict):
            OPTIONS[name] = dict(declared)
        if descriptors:
            NEEDS_DESCRIPTORS.add(name)
        return function

    return register


def get_measure(name: str) -> Measure:
    """The measure registered as ``name``, or imported from a ``module:function`` path.

    Raises
    ------
    PluginError
        Naming the registered measures, when ``name`` is neither.
    """
    if name in MEASURES:
        return MEASURES[name]
    if ":" in name:
        return register_measure(name)(import_object(name))
    raise PluginError(
        f"unknown measure {name!r}: registered are {', '.join(sorted(MEASURES))}, "
        "or give 'module:function'"
    )


# ------------------------------------------------------------------- ensemble spread
def measure_options(name: str, given: dict[str, Any]) -> None:
    """Check ``selection.measure_options`` against what measure ``name`` reads.

    Raises
    ------
    SettingsError
        Naming a key the measure does not read, or a value unlike its default.
    """
    get_measure(name)
    schema = OPTIONS.get(name, {} if name in BUILT_IN else None)
    if schema is None:
        return  # a plug-in that declares no options reads what it likes
    for key, value in given.items():
        if key not in schema:
            known = ", ".join(sorted(schema)) or "none"
            raise SettingsError(
                f"selection.measure_options: {key!r} is not an option of measure {name!r} "
                f"(its options: {known}): check the spelling, or drop it"
            )
        default = schema[key]
        number = isinstance(default, int | float) and not isinstance(default, bool)
        if number and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise SettingsError(
                f"selection.measure_options.{key} = {value!r} should be a number, like its "
                f"default {default!r}"
            )


@register_measure("energy_spread")
def energy_spread(prediction: EnsemblePrediction, context: MeasureContext) -> np.ndarray:
    """Standard deviation over members of the energy per atom, eV/atom."""
    return prediction.spreads()[0]


@register_measure("max_force_spread")
def max_force_spread(prediction: EnsemblePrediction, context: MeasureContext) -> np.ndarray:
    """Largest atomic force spread (DP-GEN's model deviation), eV/Å."""
    return prediction.spreads()[1]


@register_measure("stress_spread")
def stress_spread(prediction: EnsemblePrediction, context: MeasureContext) -> np.ndarray:
    """Largest standard deviation over members of a stress component, GPa (0 for a
    structure without a cell, or when no structure has one): for campaigns on
    periodic cells that need the stress, e.g. for constant-pressure MD."""
    from ase import units

    if prediction.member_stress is None:
        return np.zeros(prediction.n_structures)
    spread = stress_disagreement(prediction.member_stress) / units.GPa
    return np.nan_to_num(spread, nan=0.0)


@register_measure("mean_force_spread")
def mean_force_spread(prediction: EnsemblePrediction, context: MeasureContext) -> np.ndarray:
    """Atomic force spread averaged over the structure's atoms, eV/Å."""
    return prediction.spreads()[2]


@register_measure("relative_force_spread", options={"epsilon": 1.0})
def relative_force_spread(prediction: EnsemblePrediction, context: MeasureContext) -> np.ndarray:
    """Largest ratio of an atom's force spread to its mean force magnitude plus
    ``epsilon`` (option, default 1 eV/Å), so that small forces are not drowned out."""
    epsilon = float(context.options.get("epsilon", 1.0))
    magnitude = np.linalg.norm(prediction.member_forces.mean(axis=0), axis=-1)
    return prediction.per_structure_max(prediction.atom_force_spread() / (magnitude + epsilon))


@register_measure("ucb", options={"kappa": 2.0})
def upper_confidence_bound(prediction: EnsemblePrediction, context: MeasureContext) -> np.ndarray:
    """UCB-style: the largest mean atomic force magnitude plus ``kappa`` (option,
    default 2) times the largest atomic force spread, eV/Å. Favours high-force,
    uncertain regions, where a potential's errors cost most in MD."""
    kappa = float(context.options.get("kappa", 2.0))
    magnitude = np.linalg.norm(prediction.member_forces.mean(axis=0), axis=-1)
    return prediction.per_structure_max(magnitude) + kappa * max_force_spread(prediction, context)


@register_measure("thompson")
def thompson(prediction: EnsemblePrediction, context: MeasureContext) -> np.ndarray:
    """Thompson-style: per structure, one member drawn at random; its largest atomic
    force deviation from the ensemble mean, eV/Å."""
    draw = context.rng.integers(prediction.n_members, size=prediction.n_structures)
    member = draw[prediction.structure_index]  # [N]
    forces = prediction.member_forces
    chosen = forces[member, np.arange(forces.shape[1])]
    deviation = np.linalg.norm(chosen - forces.mean(axis=0), axis=-1)
    return prediction.per_structure_max(deviation)


@register_measure("random")
def random(prediction: EnsemblePrediction, context: MeasureContext) -> np.ndarray:
    """A uniform draw in [0, 1): the baseline that ignores the ensemble."""
    return context.rng.uniform(size=prediction.n_structures)


# ------------------------------------------------------------------------ diversity
@register_measure("labelled_distance", descriptors=True)
def labelled_distance(prediction: EnsemblePrediction, context: MeasureContext) -> np.ndarray:
    """Descriptor distance to the nearest labelled structure, relative to the typical
    nearest-neighbour distance within the labelled set (1 = as far as labelled
    structures are from each other). Uncovered regions first, whatever the ensemble
    says."""
    if prediction.descriptors is None:
        raise ValueError("labelled_distance needs descriptors")
    labelled = context.labelled_descriptors
    if labelled is None or len(labelled) == 0:
        return np.full(prediction.n_structures, np.inf)
    nearest = cdist(prediction.descriptors, labelled).min(axis=1)
    if len(labelled) < 2:
        return nearest
    within = cdist(labelled, labelled)
    np.fill_diagonal(within, np.inf)
    scale = float(np.median(within.min(axis=1)))
    return nearest / scale if scale > 0 else nearest


BUILT_IN = frozenset(MEASURES)
"""palflow's own measures: they read no option but those they declare."""


def descriptor(structures, cutoff: float = 5.0, n_bins: int = 32, width: float = 0.2) -> np.ndarray:
    """[S, n_bins] a smooth radial distribution per structure: pair distances up to
    ``cutoff`` (Å) smeared by Gaussians of ``width`` (Å), per atom. Invariant to
    rotation, translation and atom order; periodic cells use their images (vesin).
    """
    from vesin import NeighborList

    centres = np.linspace(0.5, cutoff, n_bins)
    rows = []
    for atoms in structures:
        calculator = NeighborList(cutoff=cutoff, full_list=False)
        box = atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3))
        (distances,) = calculator.compute(
            points=atoms.positions, box=box, periodic=bool(atoms.pbc.any()), quantities="d"
        )
        smeared = np.exp(-(((distances[:, None] - centres[None, :]) / width) ** 2)).sum(0)
        rows.append(smeared / max(len(atoms), 1))
    return np.asarray(rows).reshape(len(rows), n_bins)
