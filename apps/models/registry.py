"""The model backends by name: built-ins, and any backend named by import path.

A backend is imported only when it is first asked for, and only its light module
(settings and backend class); its torch code loads with
:meth:`~palflow.apps.models.backend.ModelBackend.ensemble_class`. ``model.name`` and
the ``model`` field of a checkpoint are such names.
"""

from __future__ import annotations

import logging
from typing import Any

from palflow.apps.common import import_object
from palflow.apps.models.backend import ModelBackend, ModelError

logger = logging.getLogger(__name__)

BUILTIN: dict[str, str] = {
    "schnet": "palflow.apps.models.schnet:SchNetBackend",
    "mace": "palflow.apps.models.mace:MACEBackend",
    "sevennet": "palflow.apps.models.sevennet:SevenNetBackend",
}
"""The built-in backends, by ``model.name``; the first is the default."""

DEFAULT = next(iter(BUILTIN))

_LOADED: dict[str, type[ModelBackend]] = {}
_NAMES: dict[type, str] = {}
"""Ensemble class -> the name its backend was loaded by (what checkpoints record)."""


def backend(name: str) -> type[ModelBackend]:
    """The backend class ``name`` stands for (imported on first use).

    Raises
    ------
    ModelError
        For a name that is neither built in nor an importable ``ModelBackend``.
    """
    if name in _LOADED:
        return _LOADED[name]
    if name in BUILTIN:
        path = BUILTIN[name]
    elif ":" in name:
        path = name
    else:
        raise ModelError(
            f"unknown model.name {name!r}: choose one of {sorted(BUILTIN)}, or name a "
            "backend by import path, 'package.module:Backend' or 'path/to/file.py:Backend'"
        )
    try:
        found = import_object(path)
    except ImportError as error:
        raise ModelError(f"model.name {name!r} does not import: {error}") from None
    if not (isinstance(found, type) and issubclass(found, ModelBackend)):
        raise ModelError(
            f"model.name {name!r} is a {type(found).__name__}, not a subclass of "
            "palflow.apps.models.backend.ModelBackend"
        )
    _LOADED[name] = found
    return found


def ensemble_class(name: str) -> type:
    """The ensemble class of backend ``name`` (this imports its torch code)."""
    cls = backend(name).ensemble_class()
    _NAMES.setdefault(cls, name)
    return cls


def name_of(model: Any) -> str:
    """The name of ``model``'s backend, as checkpoints record it.

    Raises
    ------
    KeyError
        When no backend loaded so far (nor a built-in) builds ``type(model)``.
    """
    cls = type(model)
    if cls not in _NAMES:
        # Backends named by import path first (only the campaign's own is ever loaded),
        # then the built-ins, in order, for an ensemble built without the registry.
        plugins = [name for name in _LOADED if name not in BUILTIN]
        for name in [*plugins, *BUILTIN]:
            if ensemble_class(name) is cls:
                break
    if cls not in _NAMES:
        raise KeyError(f"{cls.__name__} is the ensemble of no model backend")
    return _NAMES[cls]
