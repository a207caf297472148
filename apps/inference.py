"""Inference: score candidates and measure test error with the newest ensemble."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from palflow.apps.common import where_and_when
from palflow.apps.data.dataset import read_arrays, read_dataset
from palflow.apps.data.label_log import read_labelled

logger = logging.getLogger(__name__)


def _score_candidates(
    ensemble_path: str,
    input_path: str,
    device: str | None = None,
    output_path: str | None = None,
) -> dict[str, Any]:
    """Score the structures of ``input_path`` with the ensemble in batched passes.

    With ``output_path``, the members' predictions go there too (``member_energies``
    [K, S] eV, ``member_forces`` [K, N, 3] eV/Å, ``n_atoms`` [S], and
    ``member_stress`` [K, S, 3, 3] eV/Å³ when some structure has a cell), for the
    coordinator's selection measure.

    Returns
    -------
    dict
        ``candidate_id``, ``force_disagreement`` (eV/Å) and ``energy_disagreement``
        (eV/atom) as lists in input order, the ensemble ``version``, ``output_path``,
        and where and when the task ran.
    """
    import torch

    from palflow.apps.models.calculator import predict_structures
    from palflow.apps.models.core import default_device, load_checkpoint

    t_start = time.time()
    torch.set_num_threads(1)
    model, extra = load_checkpoint(ensemble_path, device=device or default_device())
    structures = read_dataset(input_path)
    ids = read_arrays(input_path)["candidate_id"]
    scores = predict_structures(model, structures, device=device or default_device())
    if output_path:
        members = scores["member_forces"]
        arrays = {
            "member_energies": scores["member_energies"],
            "member_forces": (
                np.concatenate(members, axis=1) if members else np.zeros((model.n_members, 0, 3))
            ).astype(np.float32),
            "n_atoms": np.array([len(a) for a in structures], dtype=np.int64),
        }
        if "member_stress" in scores:
            arrays["member_stress"] = scores["member_stress"]
        partial = f"{output_path}.tmp.npz"
        np.savez(partial, **arrays)
        os.replace(partial, output_path)
    return {
        "candidate_id": [int(i) for i in ids],
        "force_disagreement": np.asarray(scores["force_disagreement"]).tolist(),
        "energy_disagreement": np.asarray(scores["energy_disagreement"]).tolist(),
        "version": int(extra.get("version", -1)),
        "output_path": output_path,
        **where_and_when(t_start),
    }


def _evaluate_test(
    ensemble_path: str,
    test_path: str = "",
    device: str | None = None,
    validation_path: str | None = None,
) -> dict[str, Any]:
    """Errors of the ensemble's mean prediction on the held-out set, and its spread;
    and the same on the validation labels, for calibration.

    Returns
    -------
    dict
        For the held-out set ``test_path`` (absent when it is empty): ``force_mae``
        and ``force_rmse`` (eV/Å, over force components), ``energy_mae_per_atom`` and
        ``energy_rmse_per_atom`` (eV/atom); per structure, as lists:
        ``structure_force_error`` (mean absolute force error, eV/Å),
        ``structure_force_spread`` (largest atomic force spread, eV/Å) and
        ``structure_energy_error`` (signed, eV/atom); ``stress_mae`` (eV/Å³, over the
        stress components of the held-out structures with a stress label; None when
        none has one). ``validation``: the same keys for ``validation_path``, or None.
        Then the ensemble ``version``, and where and when the task ran.
    """
    import torch

    from palflow.apps.models.core import default_device, load_checkpoint

    t_start = time.time()
    torch.set_num_threads(1)
    device = device or default_device()
    model, extra = load_checkpoint(ensemble_path, device=device)
    result = _errors(model, read_dataset(test_path), device) if test_path else {}
    validation_set = read_labelled(validation_path)
    validation = _errors(model, validation_set, device) if validation_set else None
    return {
        **result,
        "validation": validation,
        "version": int(extra.get("version", -1)),
        **where_and_when(t_start),
    }


def _errors(model, structures: list, device: str) -> dict[str, Any]:
    """The errors of ``model``'s mean prediction on labelled ``structures`` (the keys
    of :func:`_evaluate_test`)."""
    from palflow.apps.models.calculator import predict_structures

    predicted = predict_structures(model, structures, device=device)
    force_abs, force_sq, energy_error = [], [], []
    for index, atoms in enumerate(structures):
        error = predicted["forces"][index] - atoms.get_forces()
        force_abs.append(np.abs(error).mean())
        force_sq.append((error**2).mean())
        energy_error.append(
            (predicted["energy"][index] - atoms.get_potential_energy()) / len(atoms)
        )
    stress_errors = [
        np.abs(predicted["stress"][index] - atoms.get_stress(voigt=False))
        for index, atoms in enumerate(structures)
        if "stress" in predicted and "stress" in atoms.calc.results
    ]
    weights = np.array([len(atoms) for atoms in structures], dtype=float)
    force_abs, force_sq = np.array(force_abs), np.array(force_sq)
    energy_error = np.array(energy_error)
    return {
        "force_mae": float(np.average(force_abs, weights=weights)),
        "force_rmse": float(np.sqrt(np.average(force_sq, weights=weights))),
        "energy_mae_per_atom": float(np.abs(energy_error).mean()),
        "energy_rmse_per_atom": float(np.sqrt((energy_error**2).mean())),
        "stress_mae": float(np.mean(stress_errors)) if stress_errors else None,
        "structure_force_error": force_abs.tolist(),
        "structure_force_spread": np.asarray(predicted["force_disagreement"]).tolist(),
        "structure_energy_error": energy_error.tolist(),
    }
