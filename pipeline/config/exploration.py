"""The pre-flight of the generators' MD: constant pressure (:func:`check_ensemble`),
and the exploring generators (``biased_md``, ``metadynamics``,
``replica_exchange``): what their settings need of the systems and of the model,
which the settings alone cannot tell (:mod:`palflow.apps.sections` checks the rest:
a hill's height, the bias factor, the ladder's order).

Each check raises an :class:`~palflow.apps.errors.InputError` whose one line names
the problem and its fix, before anything is created.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ase import Atoms
from pydantic import ValidationError

from palflow.apps.errors import SettingsError, StructureError
from palflow.apps.md.colvars import largest_index
from palflow.apps.models import registry
from palflow.apps.sections import GeneratorSettings

MD_KINDS = ("md", "biased_md", "metadynamics", "replica_exchange")
"""The generators that run palflow's MD (and so may run at constant pressure)."""


def check_ensemble(campaign, starts: Mapping[str, Sequence[Atoms]]) -> None:
    """Constant pressure only for MD, and on start structures with a cell periodic in
    all directions. ``starts`` maps each system's name to its start structures."""
    for system in campaign.all_systems():
        settings = campaign.generator_for(system)
        pressure, kind = settings["pressure_bar"], settings["kind"]
        if pressure is None:
            continue
        where = f"system {system.name!r}: " if campaign.systems else ""
        if kind not in MD_KINDS:
            raise SettingsError(
                f"{where}a pressure is for MD, not for the generator {kind!r}: drop it, or "
                "use the 'md' generator"
            )
        if any(not a.pbc.all() or a.cell.volume < 1e-6 for a in starts[system.name]):
            raise StructureError(
                f"{where}pressure_bar = {pressure:g} asks for constant pressure, but the start "
                f"structure {system.structure!r} has no cell periodic in all three directions: "
                "give a periodic structure, or drop the pressure"
            )


def check_exploration(campaign, starts: Mapping[str, Sequence[Atoms]]) -> None:
    """Every system's exploring generator against its start structures and the model.

    ``starts`` maps each system's name to its start structures.
    """
    for system in campaign.all_systems():
        settings = campaign.generator_for(system)
        where = f"system {system.name!r}: " if campaign.systems else ""
        kind = settings["kind"]
        try:  # a system's own generator, checked as [generator] is
            GeneratorSettings.model_validate(settings)
        except ValidationError as error:
            message = error.errors()[0]["msg"].removeprefix("Value error, ")
            raise SettingsError(f"{where}{message}") from None
        if kind == "metadynamics":
            _check_variables(settings["collective_variables"], starts[system.name], where)
        elif kind == "biased_md":
            _check_committee(campaign, where)
        elif kind == "replica_exchange":
            ladder = settings["temperature_ladder_K"]
            walkers = system.n_walkers or campaign.generator.n_walkers
            if walkers % len(ladder):
                raise SettingsError(
                    f"{where}{walkers} walkers do not fill ladders of {len(ladder)} "
                    f"(generator.temperature_ladder_K): give n_walkers = {len(ladder)} or a "
                    "multiple of it"
                )
            if system.temperatures_K:
                raise SettingsError(
                    f"{where}temperatures_K and replica exchange both set the walkers' "
                    "temperatures: drop temperatures_K (the ladder sets them)"
                )


def _check_variables(variables: list[dict], starts: Sequence[Atoms], where: str) -> None:
    largest = largest_index(variables)
    smallest = min(len(atoms) for atoms in starts)
    if largest >= smallest:
        named = next(cv for cv in variables if largest in cv["atoms"] + cv.get("to_atoms", []))
        raise SettingsError(
            f"{where}generator.collective_variables: the {named['kind']} on atoms "
            f"{named['atoms'] + named.get('to_atoms', [])} names atom {largest}, but the "
            f"start structure has {smallest} atoms (indices 0 to {smallest - 1})"
        )


def _check_committee(campaign, where: str) -> None:
    backend = registry.backend(campaign.model.name)
    if not getattr(backend, "committee", True) or campaign.model.n_members < 2:
        raise SettingsError(
            f'{where}generator.kind = "biased_md" biases towards the committee\'s '
            f"disagreement, but model {campaign.model.name!r} gives no committee "
            f"(n_members = {campaign.model.n_members}): use 'md' or 'metadynamics', or a "
            "model with at least two members"
        )
