"""Fine-tuning a pretrained member without forgetting what it knew: freezing and replay.

A member that starts from a foundation model (``model.foundation``) or from an earlier
run's member (``initial.ensemble``) knows more than the campaign's labels show, and
training every weight on a few dozen labels of one narrow domain pulls all of it
towards that domain. Two groups of ``[training]`` settings
(:class:`palflow.apps.sections.TrainingSettings`) hold it back; a training task
(:func:`palflow.apps.training._train_member`) calls this module for both:

- ``train_only``: the optimiser gets only a part of the parameters, the ones the
  model's ``trainable_parameters(part)`` names (the readout; or the last
  message-passing layer and the readout), and the others have ``requires_grad`` off.
  Forces still train: they are derivatives with respect to the positions, not the
  weights.
- ``replay_fraction``: a share of every batch is replay frames: labelled frames of
  the domain to keep, from ``replay_file`` (e.g. a subset of the foundation's own
  training data), or, with ``replay_source = "foundation"``, pseudo-labels: the
  member's own predictions, as it stands before its first training step, on rattled
  copies of its first task's training frames. They are computed once, at the first
  task that asks for them, and kept in the checkpoint's ``extra`` (``replay``), so
  every later task reuses the same frames and labels.

The loss on a replay frame is the force term, and the stress term where the frame has
a stress, never the energy: a user's pretraining data (e.g. PBE) has another energy
reference than the campaign's oracle (e.g. EMT), an offset of up to eV per atom that
no force or stress sees, and a pseudo-label's energy is the foundation's before the
member's energy refit. Replay frames never enter a member's validation frames, its
publication gate or its energy recentring: those stay the campaign's own labels.

Units: Å, eV, eV/Å, eV/Å³.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import vesin
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

from palflow.apps.data.dataset import full_stress
from palflow.apps.models import registry
from palflow.apps.models.calculator import predict_structures
from palflow.apps.models.core import StructureGraph, structure_graph

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ freezing
def _backend_name(model) -> str:
    try:
        return registry.name_of(model)
    except KeyError:
        return type(model).__name__


def trainable_parameters(model, part: str) -> list[torch.nn.Parameter]:
    """The parameters of ``model`` that ``training.train_only = part`` trains, in the
    model's order; every other parameter gets ``requires_grad`` off (all of them on for
    ``"all"``).

    Raises
    ------
    ValueError
        When ``part`` is not ``"all"`` and the model's class has no
        ``trainable_parameters(part)``, or names no parameter.
    """
    parameters = list(model.parameters())
    if part == "all":
        chosen = parameters
    else:
        name = _backend_name(model)
        method = getattr(model, "trainable_parameters", None)
        if method is None:
            raise ValueError(
                f"training.train_only = {part!r}: the {name!r} model backend "
                f"({type(model).__name__}) cannot train a part of its weights (it has no "
                "trainable_parameters method); use train_only = 'all', or another model"
            )
        chosen = list(method(part))
        if not chosen:
            raise ValueError(f"training.train_only = {part!r}: the {name!r} model has no such part")
    keep = {id(parameter) for parameter in chosen}
    for parameter in parameters:
        parameter.requires_grad_(id(parameter) in keep)
    return [parameter for parameter in parameters if id(parameter) in keep]


def optimizer_for(model, settings: dict, extra: dict) -> torch.optim.Adam:
    """Adam over the parameters ``train_only`` trains (:func:`trainable_parameters`),
    with the checkpoint's optimiser state when that was saved for the same part.

    A checkpoint saved with another ``train_only`` (a warm start from a run that
    trained another part; checkpoints from before the setting count as ``"all"``)
    holds Adam moments of other parameter groups: they are dropped, with a warning,
    and the member goes on with fresh moments (its learning-rate schedule goes on).
    """
    part = settings["train_only"]
    optimizer = torch.optim.Adam(trainable_parameters(model, part), lr=settings["learning_rate"])
    saved = extra.get("optimizer")
    if saved is not None:
        before = extra.get("train_only", "all")
        if before == part:
            optimizer.load_state_dict(saved)
        else:
            logger.warning(
                "the checkpoint's optimiser trained train_only = %r, this task trains %r: "
                "Adam starts afresh",
                before,
                part,
            )
    return optimizer


# ------------------------------------------------------------------ replay frames
_FILES: dict[tuple[str, int, int], list[Atoms]] = {}
"""The replay file last read by this process, by path, size and mtime."""
_FILES_LOCK = threading.Lock()


def read_replay_file(path: str) -> list[Atoms]:
    """Every frame of ``replay_file``, each with forces (eV/Å); read once per process
    (a thread-pool site's tasks share it) until the file changes.

    Raises
    ------
    ValueError
        When the file is missing, does not parse, is empty, or a frame has no forces.
    """
    try:
        stat = os.stat(path)
    except OSError as error:
        raise ValueError(
            f"training.replay_file {path!r} cannot be read: {error.strerror}"
        ) from None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _FILES_LOCK:
        if key not in _FILES:
            try:
                frames = read(path, index=":")
            except Exception as error:
                raise ValueError(f"training.replay_file {path!r} does not parse: {error}") from None
            lacking = [i for i, a in enumerate(frames) if "forces" not in _results(a)]
            if not frames or lacking:
                where = f"frame {lacking[0]} of {len(frames)} has" if lacking else "it holds"
                raise ValueError(
                    f"training.replay_file {path!r}: {where} no forces; every replay frame "
                    "needs forces (eV/Å), which are what replay trains on"
                )
            _FILES.clear()
            _FILES[key] = frames
        return _FILES[key]


def _results(atoms: Atoms) -> dict:
    return getattr(atoms.calc, "results", None) or {}


def pseudo_labels(
    model, frames: Sequence[Atoms], size: int, rattle: float, seed: int, device
) -> list[Atoms]:
    """``size`` copies of ``frames`` (in turn), each atom displaced by a Gaussian of
    ``rattle`` Å per component (seeded by ``seed`` and the copy's index), labelled by
    ``model`` as it is now: its forces (eV/Å), its energy (eV, which replay does not
    train on) and, on cells periodic in all three directions, its stress (eV/Å³)."""
    copies = []
    for index in range(size):
        atoms = frames[index % len(frames)].copy()  # the oracle's labels stay behind
        noise = np.random.default_rng([seed, index]).normal(0.0, rattle, atoms.positions.shape)
        atoms.positions += noise
        copies.append(atoms)
    predicted = predict_structures(model, copies, device, batch_size=16)
    stresses = predicted.get("stress")
    for index, atoms in enumerate(copies):
        stress = stresses[index] if stresses is not None and atoms.pbc.all() else None
        atoms.calc = SinglePointCalculator(
            atoms,
            energy=float(predicted["energy"][index]),
            forces=np.asarray(predicted["forces"][index], dtype=float),
            stress=stress if stress is not None and np.isfinite(stress).all() else None,
        )
    return copies


def frames_to_extra(frames: Sequence[Atoms]) -> dict[str, torch.Tensor]:
    """Labelled frames as tensors that ``torch.load(weights_only=True)`` reads (the
    checkpoint's ``extra``)."""
    stress = [full_stress(_results(a).get("stress")) for a in frames]
    return {
        "n_atoms": torch.tensor([len(a) for a in frames]),
        "numbers": torch.as_tensor(np.concatenate([a.numbers for a in frames])),
        "positions": torch.as_tensor(np.concatenate([a.positions for a in frames])),
        "cell": torch.as_tensor(np.array([a.cell[:] for a in frames])),
        "pbc": torch.as_tensor(np.array([a.pbc for a in frames])),
        "energy": torch.tensor([float(_results(a)["energy"]) for a in frames]),
        "forces": torch.as_tensor(np.concatenate([_results(a)["forces"] for a in frames])),
        "stress": torch.as_tensor(np.array(stress)),
    }


def frames_from_extra(data: dict[str, torch.Tensor]) -> list[Atoms]:
    """The frames :func:`frames_to_extra` stored, with their labels."""
    arrays = {key: value.cpu().numpy() for key, value in data.items()}
    ends = np.cumsum(arrays["n_atoms"])
    frames = []
    for index, (stop, n) in enumerate(zip(ends, arrays["n_atoms"], strict=True)):
        atoms = Atoms(
            numbers=arrays["numbers"][stop - n : stop],
            positions=arrays["positions"][stop - n : stop],
            cell=arrays["cell"][index],
            pbc=arrays["pbc"][index],
        )
        stress = arrays["stress"][index]
        atoms.calc = SinglePointCalculator(
            atoms,
            energy=float(arrays["energy"][index]),
            forces=arrays["forces"][stop - n : stop],
            stress=stress if np.isfinite(stress).all() else None,
        )
        frames.append(atoms)
    return frames


def replay_graphs(frames: Sequence[Atoms], cutoff: float) -> list[StructureGraph]:
    """Graphs of replay frames with their forces and stress; their energy is a
    placeholder 0 (replay frames have no energy term), so a frame without an energy
    joins a batch all the same."""
    nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
    graphs = []
    for atoms in frames:
        graph = structure_graph(atoms, cutoff, False, nl)
        results = _results(atoms)
        graph.energy = 0.0
        graph.forces = np.asarray(results["forces"], dtype=np.float64).reshape(len(atoms), 3)
        if results.get("stress") is not None:
            graph.stress = full_stress(results["stress"])
        graphs.append(graph)
    return graphs


@dataclass
class Replay:
    """The replay frames of one training task, and how many go into each batch.

    A full batch holds ``own_per_batch`` of the campaign's labels and ``per_batch``
    replay frames (``batch_size`` in all); an epoch's shorter last batch takes replay
    frames in the same proportion, at least one. Replay frames are drawn in turn from
    shuffles of the whole set, so every frame comes before any comes twice.
    """

    graphs: list[StructureGraph]
    per_batch: int
    own_per_batch: int
    rng: np.random.Generator
    stored: dict[str, torch.Tensor] | None = None
    """Pseudo-labels for the checkpoint's ``extra["replay"]`` (None: nothing to keep)."""
    _queue: list[int] = field(default_factory=list)

    def draw(self, n_own: int) -> list[StructureGraph]:
        """The replay frames that join a batch of ``n_own`` campaign labels."""
        if not self.graphs or n_own == 0:
            return []
        if n_own >= self.own_per_batch:
            wanted = self.per_batch
        else:
            wanted = max(1, round(n_own * self.per_batch / self.own_per_batch))
        chosen = []
        while len(chosen) < wanted:
            if not self._queue:
                self._queue = [int(i) for i in self.rng.permutation(len(self.graphs))]
            chosen.append(self.graphs[self._queue.pop()])
        return chosen


def replay_for(
    model,
    settings: dict,
    extra: dict,
    fresh: bool,
    trained_on: Sequence[Atoms],
    seed: int,
    epochs_done: int,
    device,
) -> Replay:
    """The replay frames of a training task, as ``settings`` asks (none at
    ``replay_fraction = 0``).

    Parameters
    ----------
    model
        The member, before this task's first step.
    extra
        Its checkpoint's ``extra`` (empty for a fresh member): its pseudo-labels, when
        an earlier task made them.
    fresh
        Whether the member was just built (no checkpoint): with ``replay_source =
        "foundation"`` its predictions are labels only where its spec starts it from a
        foundation model.
    trained_on
        This task's training frames, which pseudo-labels rattle.

    Raises
    ------
    ValueError
        For a replay file that cannot be used, pseudo-labels asked of a member that
        starts from random weights, or replay frames with elements the model lacks.
    """
    batch_size, fraction = int(settings["batch_size"]), float(settings["replay_fraction"])
    per_batch = min(batch_size - 1, max(1, round(fraction * batch_size))) if fraction > 0 else 0
    rng = np.random.default_rng([seed, epochs_done, 1])
    if per_batch == 0:
        return Replay([], 0, batch_size, rng)
    stored = None
    if settings["replay_source"] == "file":
        frames = read_replay_file(settings["replay_file"])
    elif "replay" in extra:
        frames = frames_from_extra(extra["replay"])
        stored = extra["replay"]
    else:
        # A spec's foundation (MACE's, SevenNet's) is what a fresh member starts from,
        # unless the spec keeps only its architecture (SevenNet's from_scratch).
        pretrained = getattr(model.spec, "foundation", None) and not getattr(
            model.spec, "from_scratch", False
        )
        if fresh and not pretrained:
            raise ValueError(
                "training.replay_source = 'foundation' labels replay frames with the member "
                f"as it starts, and this {_backend_name(model)!r} member starts from random "
                "weights: give model.foundation (or initial.ensemble, to start from an "
                "earlier run's members), or replay_source = 'file'"
            )
        frames = pseudo_labels(
            model, trained_on, settings["replay_size"], settings["replay_rattle"], seed, device
        )
        stored = frames_to_extra(frames)
        logger.info("%d pseudo-labelled replay frames made for this member", len(frames))
    try:
        name = registry.name_of(model)
    except KeyError:  # a model built outside the registry: its own error will name them
        missing = []
    else:
        spec = {"name": name, **model.spec.to_dict()}
        missing = registry.backend(name).missing_elements(spec, frames)
    if missing:
        raise ValueError(
            f"replay frames hold {', '.join(missing)}, which the model's element table lacks: "
            "give replay frames of the model's elements only"
        )
    graphs = replay_graphs(frames, model.spec.cutoff)
    return Replay(graphs, per_batch, batch_size - per_batch, rng, stored)
