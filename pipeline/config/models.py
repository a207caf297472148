"""The model each member is built with: the campaign's ``[model]`` made concrete.

The backend that ``model.name`` names (:mod:`palflow.apps.models.registry`) does the
work: it checks the campaign's elements before anything runs, and fixes the spec of
every member once per campaign, before the first member trains (a MACE spec: the
element table, the isolated-atom energies and the mean neighbour count). The result
goes to ``state.json``, so a resumed campaign builds the same members. Nothing here
imports a model's torch code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ase import Atoms

from palflow.apps.models import registry
from palflow.apps.models.backend import ModelError, SpecInputs  # noqa: F401 (ModelError raised from here)
from palflow.pipeline.config.settings import Campaign

logger = logging.getLogger(__name__)


def check_model(campaign: Campaign, start: Atoms) -> None:
    """Fail before anything runs when the model cannot learn ``start``'s elements.

    Raises
    ------
    ModelError
        Naming the file or the element at fault.
    """
    registry.backend(campaign.model.name).check(campaign.model, start)


def resolve_model_spec(
    campaign: Campaign, labelled: Sequence[Atoms], start: Atoms
) -> dict[str, Any]:
    """The spec of every member (``{"name": ..., **architecture}``), fixed now.

    Parameters
    ----------
    labelled
        The labels so far (e.g. MACE's ``e0s = "average"`` fits on them).
    start
        A structure holding every element of the campaign.
    """

    def oracle() -> Any:
        from palflow.apps.contracts import CalculatorSpec
        from palflow.apps.oracles.calculators import make_calculator

        return make_calculator(CalculatorSpec.of(campaign.oracle).as_dict())

    name = campaign.model.name
    spec = registry.backend(name).resolve_spec(campaign.model, SpecInputs(labelled, start, oracle))
    return {"name": name, **spec}


def missing_elements(spec: dict[str, Any], structures: Sequence[Atoms]) -> list[str]:
    """Elements of ``structures`` that a model of ``spec`` cannot treat."""
    return registry.backend(spec["name"]).missing_elements(spec, structures)
