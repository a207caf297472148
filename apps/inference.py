"""Inference: score candidates and measure test error with the newest ensemble."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from apps.common import where_and_when
from apps.dataset import read_arrays, read_dataset

logger = logging.getLogger(__name__)


def _score_candidates(
    ensemble_path: str, input_path: str, device: str | None = None
) -> dict[str, Any]:
    """Score the structures of ``input_path`` with the ensemble in batched passes.

    Returns
    -------
    dict
        ``candidate_id``, ``force_disagreement`` (eV/Å) and ``energy_disagreement``
        (eV/atom) as lists in input order, the ensemble ``version``, and where and
        when the task ran.
    """
    import torch

    from apps.calculator import predict_structures
    from apps.model import default_device, load_checkpoint

    t_start = time.time()
    torch.set_num_threads(1)
    model, extra = load_checkpoint(ensemble_path, device=device or default_device())
    structures = read_dataset(input_path)
    ids = read_arrays(input_path)["candidate_id"]
    scores = predict_structures(model, structures, device=device or default_device())
    return {
        "candidate_id": [int(i) for i in ids],
        "force_disagreement": np.asarray(scores["force_disagreement"]).tolist(),
        "energy_disagreement": np.asarray(scores["energy_disagreement"]).tolist(),
        "version": int(extra.get("version", -1)),
        **where_and_when(t_start),
    }


def _evaluate_test(ensemble_path: str, test_path: str, device: str | None = None) -> dict[str, Any]:
    """Errors of the ensemble's mean prediction on the held-out set.

    Returns
    -------
    dict
        ``force_mae`` and ``force_rmse`` (eV/Å), ``energy_mae_per_atom`` (eV/atom),
        the ensemble ``version``, and where and when the task ran.
    """
    import torch

    from apps.model import default_device, load_checkpoint
    from apps.training import evaluate_errors

    t_start = time.time()
    torch.set_num_threads(1)
    device = device or default_device()
    model, extra = load_checkpoint(ensemble_path, device=device)
    errors = evaluate_errors(model, read_dataset(test_path), device=device)
    return {
        **{key: float(value) for key, value in errors.items()},
        "version": int(extra.get("version", -1)),
        **where_and_when(t_start),
    }
