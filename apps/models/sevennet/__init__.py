"""SevenNet (sevenn) as a model backend (``model.name = "sevennet"``): a committee
fine-tuned from a universal potential.

By default every member starts from **SevenNet-0** (``SevenNet_0__11Jul2024``: 0.84 M
parameters, 5 layers, trained on MPtrj with PBE), whose weights ship inside the
``sevenn`` wheel: nothing is downloaded. ``model.foundation`` names another model of
the wheel, or a SevenNet checkpoint file (for example a member that a palflow run
exported, ``models/ensemble.vNNNNN.memberK.pth``); ``model.from_scratch`` keeps only
its architecture.

palflow pins ``sevenn`` 0.10: later versions need ``e3nn >= 0.5``, with which
mace-torch 0.3 breaks; 0.10.4 runs on MACE's e3nn 0.4.4 (see ``pyproject.toml``).

The settings, the backend class and the checks live here, light: torch and sevenn
load in :mod:`palflow.apps.models.sevennet.ensemble`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

from ase import Atoms
from ase.data import chemical_symbols
from pydantic import Field

from palflow.apps.models.backend import BackendSettings, ModelBackend, ModelError, SpecInputs

logger = logging.getLogger(__name__)

PACKAGE_MODELS = {
    "7net-0": 5.0,
    "sevennet-0": 5.0,
    "7net-0_11jul2024": 5.0,
    "sevennet-0_11jul2024": 5.0,
    "7net-0_22may2024": 5.0,
    "sevennet-0_22may2024": 5.0,
    "7net-l3i5": 5.0,
    "sevennet-l3i5": 5.0,
}
"""The models the ``sevenn`` wheel ships, by the names it knows, with their cutoffs (Å)."""


class SevenNetSettings(BackendSettings):
    """``[model]`` of a SevenNet committee."""

    name: Literal["sevennet"] = "sevennet"
    foundation: str = "7net-0"
    """A model of the ``sevenn`` wheel by name (``7net-0``, the default; ``7net-l3i5``;
    ``7net-0_22May2024``), or the path of a SevenNet checkpoint file."""
    from_scratch: bool = False
    """Keep only the foundation's architecture (and its per-element energy shift and
    scale); draw fresh weights. For comparison with fine-tuning."""
    readout_noise: float = Field(0.1, ge=0, le=1)
    """Each member's readout weights start multiplied by ``1 + readout_noise *
    N(0, 1)`` (its own seed), so that members disagree from the first version."""

    @property
    def package_model(self) -> str | None:
        """The wheel's model ``foundation`` names, or None for a file."""
        return self.foundation if self.foundation.lower() in PACKAGE_MODELS else None

    @property
    def cutoff(self) -> float:
        """The foundation's cutoff, Å."""
        if self.package_model:
            return PACKAGE_MODELS[self.foundation.lower()]
        from palflow.apps.models.sevennet.ensemble import read_checkpoint

        return float(read_checkpoint(self.foundation)["config"]["cutoff"])


class SevenNetBackend(ModelBackend):
    """K SevenNet members evaluated on one shared graph
    (:class:`palflow.apps.models.sevennet.ensemble.SevenNetEnsemble`); each exports as
    a SevenNet checkpoint."""

    settings = SevenNetSettings
    requirements = ("sevenn", "torch", "vesin")
    trains_parts = True

    @classmethod
    def check(cls, settings: SevenNetSettings, start: Atoms) -> None:
        """The foundation exists and is a SevenNet checkpoint that knows every element
        of ``start``."""
        missing = [chemical_symbols[z] for z in _elements(start) if z not in _table(settings)]
        if missing:
            raise ModelError(
                f"the campaign's element(s) {', '.join(missing)} are not in the SevenNet "
                f"foundation {settings.foundation!r}: choose a model that knows them"
            )

    @classmethod
    def resolve_spec(cls, settings: SevenNetSettings, given: SpecInputs) -> dict[str, Any]:
        """The foundation and how members start from it; a checkpoint file is copied
        into the run (the key ``foundation``)."""
        spec = {
            "cutoff": settings.cutoff,
            "from_scratch": settings.from_scratch,
            "readout_noise": settings.readout_noise,
        }
        if settings.package_model:
            spec["package_model"] = settings.package_model
        else:
            spec["foundation"] = os.path.abspath(settings.foundation)
        return spec

    @classmethod
    def starts_from_foundation(cls, spec: dict[str, Any]) -> bool:
        """Unless from scratch: SevenNet-0 is pretrained."""
        return not spec.get("from_scratch")

    @classmethod
    def missing_elements(cls, spec: dict[str, Any], structures: Sequence[Atoms]) -> list[str]:
        """Elements of ``structures`` that the foundation does not know."""
        from palflow.apps.models.sevennet.ensemble import SevenNetSpec, read_checkpoint

        table = read_checkpoint(SevenNetSpec.from_dict(spec).checkpoint)["config"]["_type_map"]
        present = {int(z) for atoms in structures for z in atoms.numbers}
        return [chemical_symbols[z] for z in sorted(present - set(table))]

    @classmethod
    def ensemble_class(cls) -> type:
        from palflow.apps.models.sevennet.ensemble import SevenNetEnsemble

        return SevenNetEnsemble

    @classmethod
    def load(cls, spec: dict[str, Any], n_members: int, state: dict[str, Any]) -> Any:
        """An ensemble from a checkpoint's spec, size and weights: members are built
        from the foundation (no random draw leaks out), then take ``state``."""
        import torch

        ensemble = cls.ensemble_class()
        with torch.random.fork_rng(devices=[]):
            model = ensemble(ensemble.spec_class.from_dict(spec), n_members)
        device = next(iter(state.values())).device
        model.load_state_dict(state)
        return model.to(device).eval()

    @classmethod
    def export(cls, model: Any, stem: str | os.PathLike) -> list[str]:
        """Each member as a SevenNet checkpoint ``{stem}.member{k}.pth``."""
        return model.export(str(stem))


def _elements(start: Atoms) -> list[int]:
    return sorted({int(z) for z in start.numbers})


def _table(settings: SevenNetSettings) -> set[int]:
    """The foundation's element table; one line naming what is wrong otherwise."""
    name = settings.foundation
    if not settings.package_model and not os.path.isfile(name):
        known = ", ".join(n for n in PACKAGE_MODELS if n.startswith("7net"))
        raise ModelError(
            f"model.foundation {name!r} is neither a model of the sevenn package ({known}) "
            "nor a SevenNet checkpoint file; palflow downloads nothing"
        )
    from palflow.apps.models.sevennet.ensemble import SevenNetSpec, read_checkpoint

    spec = SevenNetSpec(0.0, package_model=settings.package_model)
    try:
        config = read_checkpoint(spec.checkpoint if settings.package_model else name)["config"]
        return {int(z) for z in config["_type_map"]}
    except Exception as error:  # a pickle of anything, or no pickle at all
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(
            f"model.foundation {name!r} is not a SevenNet checkpoint: {reason}"
        ) from None
