"""What a member publishes: averaged weights, a validation gate, a rate that follows both.

A training task (:func:`palflow.apps.training._train_member`) keeps three states of its
member, all in the member's checkpoint, for any model backend (they are plain
``state_dict`` tensors):

- the **raw** weights the optimiser moves, which the next task continues from;
- their **average** (:class:`WeightAverage`), an exponential moving average whose
  decay warms up with the step count and never reaches back more than half a task;
- the **published** weights, which the ensemble versions stack. The average replaces
  them only when the gate (:func:`judge`) finds it not worse, beyond a tolerance, on
  the member's validation frames than the published state, both measured on the same
  frames now.

The learning rate (:class:`RateOnPlateau`) is cut when the gate's comparison shows no
gain for a few tasks in a row. All three are settings of ``[training]``
(:class:`palflow.apps.sections.TrainingSettings`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from ase import Atoms

from palflow.apps.models.calculator import evaluate_errors, predict_batches

logger = logging.getLogger(__name__)

State = dict[str, torch.Tensor]

FIRST, ACCEPTED, REJECTED, UNJUDGED = "first", "accepted", "rejected", "unjudged"
"""The gate's verdicts: a member's first state (nothing published to compare with),
accepted or rejected against the published state, or not judged (too few validation
frames)."""


def clone_state(state: Mapping[str, torch.Tensor]) -> State:
    """A detached copy of a ``state_dict``."""
    return {key: value.detach().clone() for key, value in state.items()}


class WeightAverage:
    """An exponential moving average of a model's floating-point state.

    After update ``n`` (counted over the member's whole life, so streaming labels never
    restart it) the decay is ``min(decay, (1 + n) / (10 + n), cap)``: the first updates
    weigh almost fully, as in torch-ema and timm, and ``cap`` keeps the mean age of the
    averaged weights at most half of this task's planned steps, so that the published
    weights trail the raw ones by less than one task (:attr:`lag_steps`).

    Parameters
    ----------
    state
        The raw state to start from, when no average is saved.
    decay
        Largest decay per optimiser step; 0 turns averaging off (the average is the raw
        state).
    saved
        An earlier :meth:`to_dict`, to continue.
    planned_steps
        Steps this task will take at least, which sets ``cap``.
    """

    def __init__(
        self,
        state: Mapping[str, torch.Tensor],
        decay: float,
        saved: dict | None,
        planned_steps: int,
    ) -> None:
        self.decay = float(decay)
        half = max(planned_steps, 1) / 2
        # A constant decay d gives weights of mean age d / (1 - d) steps.
        self.cap = half / (1 + half)
        if saved and set(saved.get("state", {})) == set(state):
            self.state = clone_state(saved["state"])
            self.updates = int(saved.get("updates", 0))
            self.lag_steps = float(saved.get("lag_steps", 0.0))
        else:
            self.state, self.updates, self.lag_steps = clone_state(state), 0, 0.0

    def step_decay(self) -> float:
        """The decay of the next update."""
        if self.decay <= 0:
            return 0.0
        return min(self.decay, (1 + self.updates) / (10 + self.updates), self.cap)

    @torch.no_grad()
    def update(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take in the raw state after one optimiser step."""
        decay = self.step_decay()
        for key, value in state.items():
            average = self.state[key]
            if average.is_floating_point():
                average.lerp_(value.detach().to(average.device), 1.0 - decay)
            else:
                average.copy_(value)
        self.lag_steps = decay * (self.lag_steps + 1.0)
        self.updates += 1

    def to_dict(self) -> dict:
        return {"state": self.state, "updates": self.updates, "lag_steps": self.lag_steps}


@dataclass
class Verdict:
    """The gate's decision on a member's new (averaged) state."""

    gate: str
    """:data:`FIRST`, :data:`ACCEPTED`, :data:`REJECTED` or :data:`UNJUDGED`."""
    n_validation: int
    new: dict[str, float] | None = None
    """Validation errors of the new state (``force_mae``, ...), when measured."""
    old: dict[str, float] | None = None
    """The same of the published state, on the same frames."""
    ratio: float | None = None
    """:func:`error_ratio` of the new state to the published one, where judged."""

    @property
    def publish(self) -> bool:
        return self.gate != REJECTED


@torch.no_grad()
def recentre(model, frames: Sequence[Atoms], limit: int = 256) -> float:
    """Shift ``model``'s energies so that its mean energy error per atom on ``frames``
    (its training labels; the newest ``limit``) is zero, and return the shift (eV/atom,
    member 0's).

    The loss weighs forces far more than energies, and a constant energy offset, which
    no force sees, drifts from one task to the next; one number per member removes it
    exactly (``shift_energy`` of :class:`~palflow.apps.models.protocol.PotentialEnsemble`).
    """
    frames = list(frames)[-limit:]
    if not frames or not hasattr(model, "shift_energy"):  # optional for a backend
        return 0.0
    device = next(model.parameters()).device
    total = torch.zeros(model.n_members, dtype=torch.float64)
    for batch, out in predict_batches(model, frames, device, 64, with_targets=True):
        error = (out["energy"].double().cpu() - batch.energy.double().cpu()) / batch.n_atoms.cpu()
        total += error.sum(dim=1)
    shift = -total / len(frames)
    model.shift_energy(shift)
    return float(shift[0])


def finite_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor of ``state`` is finite."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def validation_errors(model, frames: Sequence[Atoms]) -> dict:
    """Errors of ``model`` on ``frames`` (:func:`evaluate_errors`)."""
    return evaluate_errors(model, frames, next(model.parameters()).device)


def error_ratio(new: Mapping, old: Mapping, settings: Mapping) -> float:
    """How much worse ``new`` validates than ``old``: the mean of the energy MAE ratio
    and the force MAE ratio (each only where its loss weight is above 0), so that a
    state whose energies got twice as bad does not pass on slightly better forces.
    A NaN new error makes it infinite; a NaN old one (a broken published state) makes
    any finite new state better."""
    ratios = []
    for key, weight in (("energy_mae_per_atom", "energy_weight"), ("force_mae", "force_weight")):
        if settings[weight] <= 0:
            continue
        if not math.isfinite(new[key]):
            return math.inf
        if not math.isfinite(old[key]):
            return 0.0
        ratios.append(new[key] / old[key] if old[key] > 0 else (1.0 if new[key] == 0 else math.inf))
    return sum(ratios) / len(ratios) if ratios else 1.0


def judge(
    model,
    new: State,
    published: State | None,
    frames: Sequence[Atoms],
    settings: Mapping,
) -> Verdict:
    """Whether ``new`` replaces ``published``, measuring both on ``frames`` with ``model``.

    ``new`` is published when nothing is published yet, when fewer than
    ``min_validation_size`` frames are at hand (the gate does not judge), or when its
    :func:`error_ratio` to the published state is at most ``1 + gate_tolerance``; a
    state with a weight that is not finite never is. ``model`` is left holding ``new``.

    Raises
    ------
    FloatingPointError
        When ``new`` is not finite and nothing is published to keep.
    """
    n = len(frames)
    if not finite_state(new):
        if published is None:
            raise FloatingPointError("training diverged: the new state has non-finite weights")
        model.load_state_dict(new)
        return Verdict(REJECTED, n, ratio=math.inf)
    if n < settings["min_validation_size"]:
        model.load_state_dict(new)
        return Verdict(FIRST if published is None else UNJUDGED, n)
    if published is not None:
        model.load_state_dict(published)
        old = validation_errors(model, frames)
    model.load_state_dict(new)
    errors = validation_errors(model, frames)
    if published is None:
        return Verdict(FIRST, n, errors)
    ratio = error_ratio(errors, old, settings)
    worse = not ratio <= 1.0 + settings["gate_tolerance"]  # NaN is worse too
    return Verdict(REJECTED if worse else ACCEPTED, n, errors, old, ratio)


class RateOnPlateau:
    """A multiplier of the learning rate, cut when validation stops improving.

    Each judged task counts as a gain when its new state's :func:`error_ratio` to the
    published state, both measured on the current validation frames, is below ``1 -
    learning_rate_plateau_threshold``; after ``learning_rate_plateau_patience`` judged
    tasks in a row without a gain the multiplier is multiplied by
    ``learning_rate_plateau_factor``. Tasks the gate does not judge leave the count as
    it is. New labels change nothing by
    themselves: the rate is neither raised nor reset, and the next comparison is made
    on the grown validation set, where both states are measured again. The rate never
    goes below ``learning_rate_min`` (:func:`palflow.apps.training.learning_rate`).
    """

    def __init__(self, saved: dict | None) -> None:
        saved = saved or {}
        self.scale = float(saved.get("scale", 1.0))
        self.without_gain = int(saved.get("without_gain", 0))
        self.cuts = int(saved.get("cuts", 0))

    def observe(self, verdict: Verdict, settings: Mapping) -> None:
        if verdict.ratio is None or verdict.new is None:
            return
        gain = verdict.ratio < 1.0 - settings["learning_rate_plateau_threshold"]
        self.without_gain = 0 if gain else self.without_gain + 1
        if self.without_gain >= settings["learning_rate_plateau_patience"]:
            self.scale *= settings["learning_rate_plateau_factor"]
            self.cuts += 1
            self.without_gain = 0
            logger.debug("learning rate cut to %.3g of its schedule", self.scale)

    def to_dict(self) -> dict:
        return {"scale": self.scale, "without_gain": self.without_gain, "cuts": self.cuts}


def finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
