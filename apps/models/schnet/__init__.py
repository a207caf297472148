"""palflow's compact SchNet as a model backend (``model.name = "schnet"``, the default).

The settings and the backend class live here, light (no torch); the network is
:mod:`palflow.apps.models.schnet.network`. The spec is the settings' architecture
keys: SchNet embeds any element and fits its energy reference per member.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field

from palflow.apps.models.backend import BackendSettings, ModelBackend, SpecInputs

logger = logging.getLogger(__name__)


class SchNetSettings(BackendSettings):
    """``[model]`` of palflow's compact SchNet."""

    name: Literal["schnet"] = "schnet"
    """``schnet`` (palflow's compact SchNet), ``mace`` (mace-torch), ``sevennet``
    (sevenn, from SevenNet-0), or a backend's import path."""
    cutoff: float = Field(5.0, gt=0)
    """Neighbour cutoff, Å."""
    n_features: int = Field(32, ge=4)
    """Width of SchNet's atom-wise feature vectors."""
    n_interactions: int = Field(2, ge=1)
    """SchNet's continuous-filter interaction blocks."""
    n_rbf: int = Field(16, ge=2)
    """Gaussian radial basis functions between 0 and ``cutoff``."""


class SchNetBackend(ModelBackend):
    """K SchNet members with a shared leading ensemble dimension, trained in one pass
    (:class:`palflow.apps.models.schnet.network.SchNetEnsemble`)."""

    settings = SchNetSettings
    requirements = ("torch", "vesin")
    trains_parts = True

    @classmethod
    def resolve_spec(cls, settings: SchNetSettings, given: SpecInputs) -> dict[str, Any]:
        """The architecture keys of ``settings``: nothing depends on the labels."""
        return settings.model_dump(exclude={"name", "n_members"})

    @classmethod
    def ensemble_class(cls) -> type:
        from palflow.apps.models.schnet.network import SchNetEnsemble

        return SchNetEnsemble
