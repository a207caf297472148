"""Training of one ensemble member per task, and helpers around member checkpoints.

A training task is a pure function of its arguments (:func:`_train_member`): it reads
the dataset from disk, continues from the member's previous checkpoint when given one,
and writes a new checkpoint atomically. Members train independently, each on its own
bootstrap resample, and are stacked into one ensemble checkpoint for inference.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import vesin
from ase import Atoms

from palflow.apps.common import require_settings, where_and_when
from palflow.apps.data.dataset import read_dataset
from palflow.apps.models import registry
from palflow.apps.models.calculator import predict_batches
from palflow.apps.models.core import (
    PotentialEnsemble,
    StructureGraph,
    collate,
    default_device,
    load_checkpoint,
    save_checkpoint,
    structure_graph,
)
from palflow.apps.sections import TrainingSettings

logger = logging.getLogger(__name__)


def learning_rate(settings: dict, steps: int) -> float:
    """Learning rate after ``steps`` optimiser steps: halves every half-life, down to a floor.

    Counting steps rather than epochs keeps the schedule the same however large the
    dataset grows while the member trains.
    """
    start, floor = settings["learning_rate"], settings["learning_rate_min"]
    half_life = settings["learning_rate_half_life_steps"]
    if half_life <= 0:
        return start
    return floor + (start - floor) * 0.5 ** (steps / half_life)


def _is_labelled(atoms: Atoms) -> bool:
    results = getattr(atoms.calc, "results", None) or {}
    return "energy" in results and "forces" in results


def bootstrap_multiplicity(seed: int, indices: Sequence[int]) -> np.ndarray:
    """Poisson(1) bootstrap multiplicity of each structure index for one member.

    Each multiplicity depends only on ``(seed, index)``, so a member's resample of the
    old structures stays the same as the dataset grows.
    """
    return np.array(
        [np.random.default_rng([seed, int(j)]).poisson(1.0) for j in indices], dtype=np.int64
    )


def _graphs(structures: Sequence[Atoms], cutoff: float) -> list[StructureGraph]:
    nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
    return [structure_graph(atoms, cutoff, True, nl) for atoms in structures]


def _loss(
    model: PotentialEnsemble, batch, force_weight: float, stress_weight: float = 0.0
) -> torch.Tensor:
    """Mean sq. per-atom energy error ((eV/atom)^2) + ``force_weight`` * mean sq. force
    error ((eV/Å)^2) + ``stress_weight`` * mean sq. virial error per atom ((eV/atom)^2,
    the stress error times the volume over the atom count, so that it weighs like the
    energy term), over the structures with a stress label."""
    with_stress = stress_weight > 0 and batch.stress is not None
    out = model(batch, compute_forces=True, compute_stress=with_stress)
    n_atoms = batch.n_atoms.to(out["energy"].dtype)
    energy_error = (out["energy"] - batch.energy.to(out["energy"].dtype)) / n_atoms
    loss = energy_error.pow(2).mean()
    if force_weight > 0 and batch.forces.numel() > 0:
        force_error = out["forces"] - batch.forces.to(out["forces"].dtype)
        loss = loss + force_weight * force_error.pow(2).mean()
    if with_stress:
        labelled = torch.isfinite(batch.stress).all(dim=(-1, -2))
        if labelled.any():
            per_atom = (batch.volume / batch.n_atoms).to(out["stress"].dtype)[labelled]
            error = out["stress"][:, labelled] - batch.stress[labelled].to(out["stress"].dtype)
            virial_error = error * per_atom[None, :, None, None]
            loss = loss + stress_weight * virial_error.pow(2).mean()
    return loss


def _train_member(
    member: int,
    dataset_path: str,
    checkpoint_in: str | None,
    checkpoint_out: str,
    spec: dict,
    settings: dict,
    seed: int,
    n_epochs: int,
    validation_path: str | None = None,
    device: str | None = None,
) -> dict:
    """Train one ensemble member for ``n_epochs`` epochs and write its checkpoint.

    Parameters
    ----------
    member
        Member index (recorded in the checkpoint and result).
    dataset_path
        Training set written by :func:`palflow.apps.data.dataset.write_dataset`; unlabelled
        structures are skipped. The member trains on all of it: the coordinator's
        snapshot already holds only the labels to train on (``rolling_window``).
    checkpoint_in
        Previous checkpoint of this member to continue from (model and optimiser), or
        ``None`` to start from a fresh model seeded with ``seed``.
    checkpoint_out
        Where to write the updated K=1 checkpoint (atomically).
    spec
        The member's spec with its backend's ``name`` (default: the default backend's)
        (:func:`palflow.pipeline.config.models.resolve_model_spec`); ignored when
        continuing (the checkpoint's own spec is used).
    settings
        The campaign's validated training section
        (:class:`palflow.apps.sections.TrainingSettings`, dumped), every key of it.
    seed
        Member seed: fixes the initial weights, the bootstrap resample and the shuffles.
    n_epochs
        Epochs to run in this call.
    validation_path
        Optional dataset for the returned validation errors.
    device
        Torch device; default CUDA when available.

    Raises
    ------
    ValueError
        Naming every key of :class:`~palflow.apps.sections.TrainingSettings` that
        ``settings`` lacks.

    Returns
    -------
    dict
        ``member``, ``checkpoint``, ``epochs`` (total so far), ``n_train``,
        ``train_loss`` (mean over the last epoch), ``val_force_mae`` (eV/Å),
        ``val_energy_mae`` (eV/atom), ``t_start``, ``t_end``, ``host``, ``device``.
    """
    t_start = time.time()
    require_settings(settings, TrainingSettings.model_fields, "training")
    device = device or default_device()
    # One thread per task: a site runs tasks side by side in its slots.
    torch.set_num_threads(1)

    structures = [atoms for atoms in read_dataset(dataset_path) if _is_labelled(atoms)]
    if not structures:
        raise ValueError(f"{dataset_path} holds no labelled structures")
    indices = np.arange(len(structures))

    if checkpoint_in is None:
        backend = registry.backend(spec.get("name", registry.DEFAULT))
        model = backend.new_member(spec, structures, seed, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings["learning_rate"])
        epochs_done = steps_done = 0
    else:
        model, extra = load_checkpoint(checkpoint_in, device=device)
        if model.n_members != 1:
            raise ValueError(f"{checkpoint_in} holds {model.n_members} members, expected 1")
        optimizer = torch.optim.Adam(model.parameters(), lr=settings["learning_rate"])
        if "optimizer" in extra:
            optimizer.load_state_dict(extra["optimizer"])
        epochs_done = int(extra.get("epochs", 0))
        steps_done = int(extra.get("steps", 0))

    if settings["bootstrap"]:
        train_indices = np.repeat(indices, bootstrap_multiplicity(seed, indices))
        if train_indices.size == 0:  # tiny datasets can draw an empty resample
            train_indices = indices
    else:
        train_indices = indices
    unique = np.unique(train_indices)
    unique_graphs = _graphs([structures[j] for j in unique], model.spec.cutoff)
    graphs = dict(zip(unique, unique_graphs, strict=True))
    batch_size = int(settings["batch_size"])
    force_weight = float(settings["force_weight"])
    stress_weight = float(settings["stress_weight"])

    model.train()
    train_loss = math.nan
    # At least n_epochs, and at least min_task_s seconds: while the dataset is small an
    # epoch takes milliseconds, and a task that short would spend its time on overhead.
    min_seconds = float(settings["min_task_s"])
    epochs_this_task = 0
    while epochs_this_task < n_epochs or time.time() - t_start < min_seconds:
        epochs_this_task += 1
        order = np.random.default_rng([seed, epochs_done]).permutation(train_indices)
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = collate([graphs[j] for j in chosen], device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(settings, steps_done)
            steps_done += 1
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(model, batch, force_weight, stress_weight)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(chosen)
            count += len(chosen)
        train_loss = total / max(count, 1)
        epochs_done += 1
        logger.debug("member %d epoch %d loss %.5g", member, epochs_done, train_loss)
    model.eval()

    save_checkpoint(
        checkpoint_out,
        model,
        {
            "optimizer": optimizer.state_dict(),
            "epochs": epochs_done,
            "steps": steps_done,
            "member": member,
        },
    )
    val_force_mae = val_energy_mae = None
    if validation_path is not None:
        validation = [a for a in read_dataset(validation_path) if _is_labelled(a)]
        if validation:
            errors = evaluate_errors(model, validation, device)
            val_force_mae = errors["force_mae"]
            val_energy_mae = errors["energy_mae_per_atom"]
    return {
        "member": member,
        "checkpoint": str(checkpoint_out),
        "epochs": epochs_done,
        "steps": steps_done,
        "learning_rate": learning_rate(settings, steps_done),
        "n_train": int(len(train_indices)),
        "train_loss": float(train_loss),
        "val_force_mae": val_force_mae,
        "val_energy_mae": val_energy_mae,
        "device": str(device),
        **where_and_when(t_start),
    }


def stack_member_checkpoints(paths: Sequence[str], out_path: str, extra: dict) -> None:
    """Stack K member checkpoints (in order) into one ensemble checkpoint at ``out_path``.

    The members' optimiser states are dropped; ``extra`` is stored instead.
    """
    members = [load_checkpoint(path, device="cpu")[0] for path in paths]
    ensemble = type(members[0]).stack(members)
    save_checkpoint(out_path, ensemble, extra)
    # e.g. MACE: each member also as its code's own model file
    registry.backend(registry.name_of(ensemble)).export(ensemble, str(out_path).removesuffix(".pt"))


def evaluate_errors(
    model: PotentialEnsemble,
    structures: Sequence[Atoms],
    device: str | torch.device | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Errors of the ensemble mean prediction against labelled ``structures`` (energy in
    eV, forces in eV/Å); ``model``, ``device`` and ``batch_size`` as for
    :func:`palflow.apps.models.calculator.predict_structures`.

    Returns
    -------
    dict
        ``energy_mae_per_atom`` (eV/atom), ``force_mae`` and ``force_rmse`` (eV/Å, over
        force components), and ``stress_mae`` (eV/Å³, over the stress components of
        the structures with a stress label; NaN when none has one).
    """
    energy_abs, force_abs, force_sq, n_components = 0.0, 0.0, 0.0, 0
    stress_abs, n_stress = 0.0, 0
    batches = predict_batches(
        model, structures, device, batch_size, with_targets=True, compute_stress=None
    )
    for batch, out in batches:
        energy, forces, stress = out["energy"], out["forces"], out.get("stress")
        per_atom = (energy.mean(0).double() - batch.energy) / batch.n_atoms
        energy_abs += float(per_atom.abs().sum())
        error = (forces.mean(0) - batch.forces).double()
        force_abs += float(error.abs().sum())
        force_sq += float(error.pow(2).sum())
        n_components += error.numel()
        if stress is not None:
            labelled = torch.isfinite(batch.stress).all(dim=(-1, -2))
            error = (stress.mean(0)[labelled] - batch.stress[labelled]).double()
            stress_abs += float(error.abs().sum())
            n_stress += error.numel()
    n_structures = max(len(structures), 1)
    n_components = max(n_components, 1)
    return {
        "energy_mae_per_atom": energy_abs / n_structures,
        "force_mae": force_abs / n_components,
        "force_rmse": math.sqrt(force_sq / n_components),
        "stress_mae": stress_abs / n_stress if n_stress else math.nan,
    }
