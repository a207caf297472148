"""Campaign settings of the members: what each one is (``[model]``) and how it
trains (``[training]``), and the base every section shares.

``[model]`` belongs to the model backend that ``model.name`` names
(:mod:`palflow.apps.models.registry`): its settings class validates the section.

:mod:`palflow.pipeline.config.settings` re-exports all of it; see there for the campaign as a whole.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import SerializeAsAny, ValidationError, WrapValidator
from pydantic_core import InitErrorDetails, PydanticCustomError

from palflow.apps.models import registry
from palflow.apps.models.backend import BackendSettings, ModelError
from palflow.apps.sections import Section as _Section  # noqa: F401 (the sections' base)
from palflow.apps.sections import TrainingSettings  # noqa: F401 (re-exported)


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
