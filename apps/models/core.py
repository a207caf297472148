"""What every ensemble potential shares: the protocol, checkpoints, construction.

The models themselves are backends (:mod:`palflow.apps.models.backend`), found by name
through :mod:`palflow.apps.models.registry`: palflow's compact SchNet
(:mod:`palflow.apps.models.schnet`), MACE (:mod:`palflow.apps.models.mace`), or one
named by import path. A checkpoint records its backend's name, its spec, its ensemble
size and its weights, and loads with ``torch.load(..., weights_only=True)``.

Units: positions and cutoff in Å, energies in eV, forces in eV/Å.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import torch

from palflow.apps.data.dataset import atomic_write_bytes
from palflow.apps.models import registry
from palflow.apps.models.graph import (  # noqa: F401 (also re-exported: the batches that models take)
    AtomsBatch,
    StructureGraph,
    build_batch,
    collate,
    strain,
    stress_from_strain,
    structure_graph,
)
from palflow.apps.models.protocol import (  # noqa: F401 (re-exported)
    PotentialEnsemble,
    common_spec,
    default_device,
    from_state_dict,
)

logger = logging.getLogger(__name__)


def new_ensemble(
    name: str, spec: dict[str, Any], n_members: int = 1, seed: int = 0, device=None
) -> PotentialEnsemble:
    """A freshly initialised ensemble of the backend ``name`` (see
    :meth:`palflow.apps.models.backend.ModelBackend.new_ensemble`)."""
    return registry.backend(name).new_ensemble(spec, n_members, seed=seed, device=device)


def save_checkpoint(
    path: str | os.PathLike, model: PotentialEnsemble, extra: dict | None = None
) -> None:
    """Write ``model`` and ``extra`` to ``path`` atomically.

    Parameters
    ----------
    path
        Destination file.
    model
        An ensemble of a model backend.
    extra
        Plain Python values and tensors (e.g. an optimiser ``state_dict``); must be
        loadable with ``torch.load(..., weights_only=True)``.
    """
    payload = {
        "model": registry.name_of(model),
        "spec": model.spec.to_dict(),
        "n_members": model.n_members,
        "state_dict": {k: v.detach() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, lambda handle: handle.write(buffer.getvalue()))


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[PotentialEnsemble, dict]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Returns
    -------
    model, extra
        The model on ``device`` in eval mode and the ``extra`` dictionary (tensors in it
        are also mapped to ``device``).
    """
    payload = torch.load(path, map_location=device, weights_only=True)
    model = registry.backend(payload["model"]).load(
        payload["spec"], int(payload["n_members"]), payload["state_dict"]
    )
    return model.eval(), payload.get("extra", {})
