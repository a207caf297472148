"""A fine-tuned member's architecture without its foundation file.

A member fine-tuned from ``model.foundation`` is built by loading that file (a pickled
MACE model), and a checkpoint holds only its weights and spec, whose ``foundation``
names the run's copy (``models/foundation.model``). Without more, the checkpoint would
not load once that file is gone: a run directory moved to another disk, or an
exported ``ensemble.pt`` taken to another machine. So the spec also keeps the
foundation's architecture, the keyword arguments of ``mace.modules.ScaleShiftMACE``
as JSON (:func:`describe`, from mace's own ``extract_config_mace_model``), from which
:func:`rebuild` builds the same modules for a checkpoint's weights to fill. A fresh
member still needs the file: its weights are the foundation's.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import numpy as np
import torch


def describe(model: torch.nn.Module) -> str | None:
    """``model``'s architecture as JSON for :func:`rebuild`, or None when it has parts
    that JSON cannot name (cuequivariance, embeddings of extra inputs, another class
    than ``ScaleShiftMACE``): then only its file builds it."""
    if type(model).__name__ != "ScaleShiftMACE":
        return None
    from mace.tools.scripts_utils import extract_config_mace_model

    config = extract_config_mace_model(model)
    try:
        return json.dumps({key: _encode(value) for key, value in config.items()})
    except TypeError:
        return None


def rebuild(description: str, dtype: torch.dtype) -> torch.nn.Module:
    """A ``ScaleShiftMACE`` of the architecture :func:`describe` gave, in ``dtype``;
    its weights are MACE's initial ones until a checkpoint's fill them."""
    from mace import modules

    config = {key: _decode(value) for key, value in json.loads(description).items()}
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return modules.ScaleShiftMACE(**config).to(dtype)
    finally:
        torch.set_default_dtype(before)


def _encode(value: Any) -> Any:
    from e3nn import o3

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, o3.Irreps):
        return {"irreps": str(value)}
    if isinstance(value, (np.ndarray, torch.Tensor, np.generic)):
        return {"array": np.asarray(value.tolist()).tolist()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, type) or callable(value):
        module, name = getattr(value, "__module__", ""), getattr(value, "__qualname__", "")
        if module.startswith(("mace.", "torch.")) and "<" not in name:
            return {"object": f"{module}:{name}"}
    raise TypeError(f"cannot describe {type(value).__name__}")


def _decode(value: Any) -> Any:
    from e3nn import o3

    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "irreps" in value:
        return o3.Irreps(value["irreps"])
    if "array" in value:
        return np.asarray(value["array"])
    module, name = value["object"].split(":")
    found: Any = importlib.import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    return found
