"""Training of one ensemble member per task, and helpers around member checkpoints.

A training task is a pure function of its arguments (:func:`_train_member`): it reads
the dataset from disk, continues from the member's previous checkpoint when given one,
and writes a new checkpoint atomically. Members train independently, each on its own
bootstrap resample, and are stacked into one ensemble checkpoint for inference. What
a member publishes (an average of its weights, when a validation gate lets it) is
:mod:`palflow.apps.publication`'s.
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
from palflow.apps.data.dataset import structure_key
from palflow.apps.data.label_log import read_labelled
from palflow.apps.fine_tuning import optimizer_for, replay_for
from palflow.apps.models import registry
from palflow.apps.models.calculator import evaluate_errors  # noqa: F401 (re-exported)
from palflow.apps.models.core import (
    PotentialEnsemble,
    StructureGraph,
    collate,
    default_device,
    load_checkpoint,
    save_checkpoint,
    structure_graph,
)
from palflow.apps.publication import (
    RateOnPlateau,
    WeightAverage,
    clone_state,
    finite_or_none,
    finite_state,
    judge,
    recentre,
)
from palflow.apps.sections import TrainingSettings

logger = logging.getLogger(__name__)

EVENT_KEYS = (
    "published", "gate", "n_validation", "learning_rate", "ema_lag_tasks", "epochs_this_task"
)  # fmt: skip
"""What a training task's line in ``events.jsonl`` adds: the gate's verdict, the rate,
how far the published average trails the raw weights, in tasks, and the epochs it ran
(bounded by ``min_task_s`` too, so a slower machine runs fewer)."""


def learning_rate(settings: dict, steps: int, scale: float = 1.0) -> float:
    """Learning rate after ``steps`` optimiser steps: halves its distance to the floor
    every half-life, times ``scale`` (the plateau cuts of
    :class:`palflow.apps.publication.RateOnPlateau`), never below the floor.

    Counting steps rather than epochs keeps the schedule the same however large the
    dataset grows while the member trains.
    """
    start, floor = settings["learning_rate"], settings["learning_rate_min"]
    half_life = settings["learning_rate_half_life_steps"]
    scheduled = start if half_life <= 0 else floor + (start - floor) * 0.5 ** (steps / half_life)
    return max(floor, scheduled * scale)


def _name(source: str | dict) -> str:
    """A dataset's name in a message: its path, or the label log's rows."""
    if isinstance(source, dict):
        return f"rows {source['start']}-{source['stop']} of the label log {source['store']}"
    return str(source)


def _is_labelled(atoms: Atoms) -> bool:
    results = getattr(atoms.calc, "results", None) or {}
    return "energy" in results and "forces" in results


def bootstrap_multiplicity(seed: int, keys: Sequence[int]) -> np.ndarray:
    """Poisson(1) bootstrap multiplicity of each structure for one member.

    Each multiplicity depends only on ``(seed, key)``, where the key is the structure's
    :func:`~palflow.apps.data.dataset.structure_key`, so a member's resample of a label
    stays the same as the dataset grows, as a rolling window slides and in a warm
    start: a label it trained on never becomes one of its validation frames.
    """
    return np.array(
        [np.random.default_rng([seed, int(key)]).poisson(1.0) for key in keys], dtype=np.int64
    )


def _graphs(structures: Sequence[Atoms], cutoff: float) -> list[StructureGraph]:
    nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
    return [structure_graph(atoms, cutoff, True, nl) for atoms in structures]


def _penalty(settings: dict):
    """The mean penalty of an error tensor: its mean square, or with ``loss = "huber"``
    the mean Huber penalty (twice torch's, so that it is the square up to
    ``huber_delta`` and grows linearly beyond: a few wild labels do not dominate)."""
    if settings["loss"] == "mse":
        return lambda error: error.pow(2).mean()
    delta = settings["huber_delta"]
    return lambda error: (
        2.0 * torch.nn.functional.huber_loss(error, torch.zeros_like(error), delta=delta)
    )


def _loss(model: PotentialEnsemble, batch, settings: dict, n_replay: int = 0) -> torch.Tensor:
    """``energy_weight`` * the mean penalty (:func:`_penalty`) of the per-atom energy
    errors (eV/atom) + ``force_weight`` * that of the force errors (eV/Å) +
    ``stress_weight`` * that of the virial errors per atom (eV/atom, the stress error
    times the volume over the atom count, so that it weighs like the energy term), over
    the structures with a stress label. The batch's last ``n_replay`` structures are
    replay frames (:mod:`palflow.apps.fine_tuning`): no energy term."""
    energy_weight, force_weight = settings["energy_weight"], settings["force_weight"]
    stress_weight = settings["stress_weight"]
    square = _penalty(settings)
    with_stress = stress_weight > 0 and batch.stress is not None
    out = model(batch, compute_forces=True, compute_stress=with_stress)
    n_atoms = batch.n_atoms.to(out["energy"].dtype)
    energy_error = (out["energy"] - batch.energy.to(out["energy"].dtype)) / n_atoms
    energy_error = energy_error[:, : batch.n_structures - n_replay]
    loss = energy_weight * square(energy_error)
    if force_weight > 0 and batch.forces.numel() > 0:
        force_error = out["forces"] - batch.forces.to(out["forces"].dtype)
        loss = loss + force_weight * square(force_error)
    if with_stress:
        labelled = torch.isfinite(batch.stress).all(dim=(-1, -2))
        if labelled.any():
            per_atom = (batch.volume / batch.n_atoms).to(out["stress"].dtype)[labelled]
            error = out["stress"][:, labelled] - batch.stress[labelled].to(out["stress"].dtype)
            virial_error = error * per_atom[None, :, None, None]
            loss = loss + stress_weight * square(virial_error)
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
        Training set: a file written by :func:`palflow.apps.data.dataset.write_dataset`,
        or a selection of the label log's rows
        (:meth:`palflow.apps.data.label_log.LabelLog.selection`), as the coordinator
        gives; unlabelled structures are skipped. The member trains on all of it: the
        coordinator's snapshot already holds only the labels to train on
        (``rolling_window``).
    checkpoint_in
        Previous checkpoint of this member to continue from (its raw weights, average
        and optimiser), or ``None`` to start from a fresh model seeded with ``seed``.
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
        Optional held-out labels (a file or a selection); with the labels this
        member's bootstrap left out, they are its validation frames, on which the
        gate judges its new state.
    device
        Torch device; default CUDA when available.

    Raises
    ------
    ValueError
        Naming every key of :class:`~palflow.apps.sections.TrainingSettings` that
        ``settings`` lacks; or for a ``train_only`` the model cannot freeze, or replay
        frames it cannot use (:mod:`palflow.apps.fine_tuning`).

    Returns
    -------
    dict
        ``member``, ``checkpoint``, ``epochs`` and ``steps`` (totals so far),
        ``learning_rate``, ``n_train``, ``n_replay`` (replay frames,
        :mod:`palflow.apps.fine_tuning`), ``train_loss`` (mean over the last epoch),
        ``published`` and ``gate`` (the validation gate's verdict,
        :mod:`palflow.apps.publication`), ``n_validation`` (the member's validation
        frames), ``val_force_mae`` (eV/Å) and ``val_energy_mae`` (eV/atom) of the state
        the checkpoint publishes (None where the gate did not measure),
        ``ema_lag_tasks`` (how far the average trails the raw weights, in tasks),
        ``t_start``, ``t_end``, ``host``, ``device``, and ``event``: the keys of
        :data:`EVENT_KEYS`, for ``events.jsonl``.

    The checkpoint's weights are the member's published state; its ``extra`` holds the
    raw weights (``raw``) that training continues from, the average (``average``),
    the optimiser state (of the parameters ``train_only`` names), the plateau's state
    (``plateau``) and, with foundation replay, the pseudo-labelled frames (``replay``).
    """
    t_start = time.time()
    require_settings(settings, TrainingSettings.model_fields, "training")
    device = device or default_device()
    # One thread per task: a site runs tasks side by side in its slots.
    torch.set_num_threads(1)

    # A selection of the label log is read through this process's cache: a member
    # that continues reads only the labels appended since its last task here.
    structures = [a for a in read_labelled(dataset_path, cache=True) if _is_labelled(a)]
    if not structures:
        raise ValueError(f"{_name(dataset_path)} holds no labelled structures")
    indices = np.arange(len(structures))

    if checkpoint_in is None:
        backend = registry.backend(spec.get("name", registry.DEFAULT))
        model = backend.new_member(spec, structures, seed, device)
        extra, published = {}, None
    else:
        # The checkpoint's weights are the published ones; training goes on from the raw.
        model, extra = load_checkpoint(checkpoint_in, device=device)
        if model.n_members != 1:
            raise ValueError(f"{checkpoint_in} holds {model.n_members} members, expected 1")
        published = clone_state(model.state_dict())
        if "raw" in extra:
            model.load_state_dict(extra["raw"])
    # Only the parameters train_only names (apps/fine_tuning.py), the rest frozen.
    optimizer = optimizer_for(model, settings, extra)
    epochs_done = int(extra.get("epochs", 0))
    steps_done = int(extra.get("steps", 0))
    plateau = RateOnPlateau(extra.get("plateau"))

    if settings["bootstrap"]:
        multiplicity = bootstrap_multiplicity(seed, [structure_key(a) for a in structures])
        train_indices = np.repeat(indices, multiplicity)
        if train_indices.size == 0:  # tiny datasets can draw an empty resample
            train_indices, multiplicity = indices, np.ones_like(indices)
    else:
        train_indices, multiplicity = indices, np.ones_like(indices)
    unique = np.unique(train_indices)
    unique_graphs = _graphs([structures[j] for j in unique], model.spec.cutoff)
    graphs = dict(zip(unique, unique_graphs, strict=True))
    trained_on = [structures[j] for j in unique]
    replay = replay_for(
        model, settings, extra, checkpoint_in is None, trained_on, seed, epochs_done, device
    )
    # A batch: batch_size frames, of which replay.per_batch are replay frames.
    per_step = replay.own_per_batch
    planned_steps = n_epochs * math.ceil(len(train_indices) / per_step)
    average = WeightAverage(
        model.state_dict(), settings["average_decay"], extra.get("average"), planned_steps
    )

    model.train()
    train_loss = math.nan
    # At least n_epochs, and at least min_task_s seconds: while the dataset is small an
    # epoch takes milliseconds, and a task that short would spend its time on overhead.
    min_seconds = float(settings["min_task_s"])
    epochs_this_task = steps_this_task = 0
    while epochs_this_task < n_epochs or time.time() - t_start < min_seconds:
        epochs_this_task += 1
        order = np.random.default_rng([seed, epochs_done]).permutation(train_indices)
        total, count = 0.0, 0
        for start in range(0, len(order), per_step):
            chosen = order[start : start + per_step]
            replayed = replay.draw(len(chosen))
            batch = collate([graphs[j] for j in chosen] + replayed, device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(settings, steps_done, plateau.scale)
            steps_done += 1
            steps_this_task += 1
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(model, batch, settings, len(replayed))
            loss.backward()
            optimizer.step()
            average.update(model.state_dict())
            total += float(loss.detach()) * len(chosen)
            count += len(chosen)
        train_loss = total / max(count, 1)
        epochs_done += 1
        logger.debug("member %d epoch %d loss %.5g", member, epochs_done, train_loss)
    model.eval()

    # The raw and the averaged state, each with its energy offset on its own training
    # labels removed; then the gate: the averaged state against the published one, on
    # this member's validation frames (the held-out labels and those its resample left out).
    if not finite_state(model.state_dict()) and published is not None:
        # Diverged: go on from the published state, with a fresh optimiser and average.
        logger.warning("member %d: non-finite weights; restarting from its published state", member)
        model.load_state_dict(published)
        optimizer = optimizer_for(model, settings, {})
        average = WeightAverage(published, settings["average_decay"], None, planned_steps)
    recentre(model, trained_on)
    raw = clone_state(model.state_dict())
    model.load_state_dict(average.state)
    recentre(model, trained_on)
    average.state = clone_state(model.state_dict())
    held_out = read_labelled(validation_path, cache=True)  # the same rows: no new read
    validation = [a for a in held_out if _is_labelled(a)]
    validation += [structures[j] for j in indices[multiplicity == 0]]
    verdict = judge(model, average.state, published, validation, settings)
    plateau.observe(verdict, settings)
    if not verdict.publish:
        model.load_state_dict(published)
        logger.info("member %d: new state held back (error ratio %.3g)", member, verdict.ratio)
    shown = verdict.new if verdict.publish else verdict.old
    save_checkpoint(
        checkpoint_out,
        model,
        {
            "optimizer": optimizer.state_dict(),
            "epochs": epochs_done,
            "steps": steps_done,
            "member": member,
            "raw": raw,
            "average": average.to_dict(),
            "plateau": plateau.to_dict(),
            "train_only": settings["train_only"],  # the part the optimiser's state is of
            **({"replay": replay.stored} if replay.stored is not None else {}),
        },
    )
    result = {
        "member": member,
        "checkpoint": str(checkpoint_out),
        "epochs": epochs_done,
        "epochs_this_task": epochs_this_task,
        "steps": steps_done,
        "learning_rate": learning_rate(settings, steps_done, plateau.scale),
        "n_train": int(len(train_indices)),
        "n_replay": len(replay.graphs),
        "train_loss": float(train_loss),
        "published": verdict.publish,
        "gate": verdict.gate,
        "n_validation": verdict.n_validation,
        "val_force_mae": finite_or_none(shown["force_mae"]) if shown else None,
        "val_energy_mae": finite_or_none(shown["energy_mae_per_atom"]) if shown else None,
        "ema_lag_tasks": average.lag_steps / max(steps_this_task, 1),
        "device": str(device),
        **where_and_when(t_start),
    }
    result["event"] = {key: result[key] for key in EVENT_KEYS}
    return result


def stack_member_checkpoints(paths: Sequence[str], out_path: str, extra: dict) -> None:
    """Stack K member checkpoints (in order) into one ensemble checkpoint at ``out_path``.

    The members' optimiser states are dropped; ``extra`` is stored instead.
    """
    members = [load_checkpoint(path, device="cpu")[0] for path in paths]
    ensemble = type(members[0]).stack(members)
    save_checkpoint(out_path, ensemble, extra)
    # e.g. MACE: each member also as its code's own model file
    registry.backend(registry.name_of(ensemble)).export(ensemble, str(out_path).removesuffix(".pt"))
