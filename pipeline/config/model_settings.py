"""Campaign settings of the members: what each one is (``[model]``) and how it
trains (``[training]``), and the base every section shares.

``[model]`` belongs to the model backend that ``model.name`` names
(:mod:`palflow.apps.models.registry`): its settings class validates the section.

:mod:`palflow.pipeline.config.settings` re-exports all of it; see there for the campaign as a whole.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, WrapValidator
from pydantic_core import InitErrorDetails, PydanticCustomError

from palflow.apps.models import registry
from palflow.apps.models.backend import BackendSettings, ModelError


class _Section(BaseModel):
    """A campaign section: unknown keys are errors, and no float may be infinite or
    NaN (give a large number for "no limit"; a setting whose 0 means "none" says so)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _backend_settings(value: Any, handler: Any) -> BackendSettings:
    """Validate ``[model]`` with the settings class of the backend it names."""
    if isinstance(value, BackendSettings):
        return value
    if not isinstance(value, dict):
        return handler(value)  # pydantic's own error for a non-table
    name = value.get("name", registry.DEFAULT)
    if not isinstance(name, str):
        raise ValueError(f"model.name must be a string, got {name!r}")
    try:
        settings = registry.backend(name).settings
    except ModelError as error:  # reported at model.name
        detail = InitErrorDetails(
            type=PydanticCustomError("model_backend", str(error)), loc=("name",), input=name
        )
        raise ValidationError.from_exception_data("model", [detail]) from None
    others = {
        key
        for other in registry.BUILTIN
        if other != name
        for key in registry.backend(other).settings.model_fields
    }
    wrong = sorted(key for key in value if key not in settings.model_fields and key in others)
    if wrong:
        raise ValueError(
            f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not a setting of "
            f"model.name = {name!r}: drop it or change the model's name"
        )
    return settings.model_validate({**value, "name": name})


ModelSettings = Annotated[SerializeAsAny[BackendSettings], WrapValidator(_backend_settings)]
"""The ``[model]`` section: the settings class of the backend ``model.name`` names
(default ``schnet``), each one's own keys, so that a key of another backend is an
error; ``campaign.model`` is that class's instance."""

DEFAULT_MODEL: BackendSettings = registry.backend(registry.DEFAULT).settings()
"""``[model]`` when a campaign gives none."""


class TrainingSettings(_Section):
    epochs_per_task: int = Field(8, ge=1)
    """Epochs one training task runs for one member before new data is taken in."""
    min_task_s: float = Field(2.0, ge=0)
    """A task also runs until this many seconds have passed (s), so that tasks on a
    small dataset are not all overhead and ensemble versions come at a steady pace."""
    learning_rate: float = Field(3e-3, gt=0, le=1)
    """Initial Adam learning rate."""
    learning_rate_min: float = Field(3e-4, gt=0, le=1)
    """The rate decays towards this floor (at most ``learning_rate``)..."""
    learning_rate_half_life_steps: int = Field(1500, ge=0)
    """...halving its distance to it every this many optimiser steps (0: constant)."""
    batch_size: int = Field(16, ge=1)
    force_weight: float = Field(10.0, ge=0)
    stress_weight: float = Field(1.0, ge=0)
    """Weight of the stress term, on the virial per atom (eV/atom) so that it weighs
    like the energy term; it applies to the labels with a stress (periodic cells whose
    oracle gives one), and 0 ignores stress."""
    bootstrap: bool = True
    """Each member trains on its own bootstrap resample of the labels."""
    rolling_window: int = Field(0, ge=0)
    """Train on the newest N labels only (0 keeps all); for cheap oracles."""
    validation_fraction: float = Field(0.1, ge=0, lt=1)
