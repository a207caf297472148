"""The model each member is built with: the campaign's ``[model]`` made concrete.

SchNet's spec is its settings. A MACE spec also fixes, once per campaign and before
the first member trains, what every member must share: the element table, the
isolated-atom energies (E0s, by ``model.e0s``) and the mean neighbour count; with
``model.foundation``, the foundation model's own table, E0s and cutoff. The result
goes to ``state.json``, so a resumed campaign builds the same members.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols
from palflow.pipeline.config.settings import MACE_KEYS, SCHNET_KEYS, Campaign


class ModelError(ValueError):
    """The model settings cannot describe this campaign (an element without E0, ...)."""


def check_model(campaign: Campaign, start: Atoms) -> None:
    """Fail before anything runs when the model cannot learn ``start``'s elements.

    Raises
    ------
    ModelError
        Naming the file or the element at fault.
    """
    model = campaign.model
    if model.name != "mace":
        return
    elements = sorted(set(int(z) for z in start.numbers))
    if model.foundation:
        from palflow.apps.models.mace import foundation_elements

        try:
            table, *_ = foundation_elements(model.foundation)
        except ValueError as error:
            raise ModelError(str(error)) from None
        _require(elements, table, f"the foundation model {model.foundation!r}")
    elif isinstance(model.e0s, dict):
        unknown = sorted(s for s in model.e0s if s not in atomic_numbers)
        if unknown:
            raise ModelError(f"model.e0s names unknown elements {unknown}")
        _require(elements, [atomic_numbers[s] for s in model.e0s], "model.e0s")


def _require(elements: Sequence[int], table: Sequence[int], where: str) -> None:
    missing = [chemical_symbols[z] for z in elements if z not in set(table)]
    if missing:
        raise ModelError(
            f"the campaign's element(s) {', '.join(missing)} are not in {where}: "
            "give every element an E0, or choose a model that knows them"
        )


def resolve_model_spec(
    campaign: Campaign, labelled: Sequence[Atoms], start: Atoms
) -> dict[str, Any]:
    """The spec of every member (``{"name": ..., **architecture}``), fixed now.

    Parameters
    ----------
    labelled
        The labels so far (``e0s = "average"`` fits on them).
    start
        The start structure: its elements make the element table.
    """
    model = campaign.model
    if model.name == "schnet":
        return {"name": "schnet", **model.model_dump(include=set(SCHNET_KEYS))}
    from palflow.apps.models.mace import foundation_elements, mean_neighbours

    spec = model.model_dump(include=set(MACE_KEYS) - {"e0s"})
    elements = sorted({int(z) for atoms in [start, *labelled] for z in atoms.numbers})
    if model.foundation:
        # The foundation's table and architecture stay; the E0s of the campaign's own
        # elements are re-fitted to its oracle as model.e0s says (a foundation trained
        # on another level of theory is offset by eV per atom), the others kept.
        table, e0s, r_max, architecture = foundation_elements(model.foundation)
        _require(elements, table, f"the foundation model {model.foundation!r}")
        own = dict(zip(elements, _e0s(campaign, labelled, elements), strict=True))
        e0s = [own.get(z, e0) for z, e0 in zip(table, e0s, strict=True)]
        path = os.path.abspath(model.foundation)
        spec.update(architecture, r_max=r_max, atomic_numbers=table, e0s=e0s, foundation=path)
        return {"name": "mace", **spec}
    if isinstance(model.e0s, dict):
        table = sorted(atomic_numbers[s] for s in model.e0s)
        _require(elements, table, "model.e0s")
    else:
        table = elements
    e0s = _e0s(campaign, labelled, table)
    spec.update(
        atomic_numbers=table,
        e0s=e0s,
        avg_num_neighbors=mean_neighbours(list(labelled)[:200] or [start], model.r_max),
    )
    return {"name": "mace", **spec}


def _e0s(campaign: Campaign, labelled: Sequence[Atoms], elements: list[int]) -> list[float]:
    """The isolated-atom energies of ``elements`` as ``model.e0s`` says, eV."""
    from palflow.apps.models.mace import fit_e0s, oracle_e0s

    setting = campaign.model.e0s
    if isinstance(setting, dict):
        _require(elements, [atomic_numbers[s] for s in setting], "model.e0s")
        return [float(setting[chemical_symbols[z]]) for z in elements]
    if setting == "oracle":
        from palflow.apps.oracle import make_calculator

        oracle = {"calculator": campaign.oracle.calculator, "kwargs": dict(campaign.oracle.kwargs)}
        return oracle_e0s(elements, make_calculator(oracle))
    return fit_e0s(labelled, elements)


def missing_elements(spec: dict[str, Any], structures: Sequence[Atoms]) -> list[str]:
    """Elements of ``structures`` that a MACE spec has no E0 for."""
    if spec.get("name") != "mace":
        return []
    table = set(spec["atomic_numbers"])
    present = {int(z) for atoms in structures for z in atoms.numbers}
    return [chemical_symbols[z] for z in sorted(present - table)]
