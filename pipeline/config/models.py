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

from palflow.apps.contracts import CalculatorSpec
from palflow.apps.models import registry
from palflow.apps.models.backend import ModelError, SpecInputs  # noqa: F401 (ModelError raised from here)
from palflow.apps.oracles.calculators import make_calculator
from palflow.pipeline.config.settings import Campaign

logger = logging.getLogger(__name__)


def check_model(campaign: Campaign, start: Atoms) -> None:
    """Fail before anything runs when the model cannot learn ``start``'s elements.

    Raises
    ------
    ModelError
        Naming the file or the element at fault.
    """
    backend = registry.backend(campaign.model.name)
    missing = [name for name in backend.requirements if not _installed(name)]
    if missing:
        raise ModelError(
            f"model.name = {campaign.model.name!r} needs {', '.join(missing)}, which this "
            f"environment lacks: pip install {' '.join(missing)}"
        )
    part = campaign.training.train_only
    if part != "all" and not backend.trains_parts:
        raise ModelError(
            f"training.train_only = {part!r}: the model backend {campaign.model.name!r} "
            "names no parts of its weights to train alone; use train_only = 'all'"
        )
    backend.check(campaign.model, start)


def _installed(distribution: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True


def resolve_model_spec(
    campaign: Campaign,
    labelled: Sequence[Atoms],
    start: Atoms,
    calculator: CalculatorSpec | None = None,
) -> dict[str, Any]:
    """The spec of every member (``{"name": ..., **architecture}``), fixed now.

    Parameters
    ----------
    labelled
        The labels so far (e.g. MACE's ``e0s = "average"`` fits on them).
    start
        A structure holding every element of the campaign.
    calculator
        The campaign's oracle on the site that runs it (its MPI launcher included);
        default: the campaign's oracle with no site.
    """
    calculator = calculator or CalculatorSpec.of(campaign.oracle)

    def oracle() -> Any:
        return make_calculator(calculator.as_dict())

    name = campaign.model.name
    spec = registry.backend(name).resolve_spec(campaign.model, SpecInputs(labelled, start, oracle))
    return {"name": name, **spec}


def missing_elements(spec: dict[str, Any], structures: Sequence[Atoms]) -> list[str]:
    """Elements of ``structures`` that a model of ``spec`` cannot treat."""
    return registry.backend(spec["name"]).missing_elements(spec, structures)
