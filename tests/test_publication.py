"""What a member publishes: averaged weights, the validation gate and the rate on a
plateau (:mod:`palflow.apps.publication`), alone and inside a training task."""

import math

import pytest
import torch

from palflow.apps.data.dataset import write_dataset
from palflow.apps.models.core import load_checkpoint, save_checkpoint
from palflow.apps.publication import (
    ACCEPTED,
    FIRST,
    REJECTED,
    UNJUDGED,
    RateOnPlateau,
    Verdict,
    WeightAverage,
    error_ratio,
    judge,
)
from palflow.apps.sections import TrainingSettings
from palflow.apps.training import _train_member, learning_rate
from tests.test_model import SPEC, emt_labelled, make_model


def settings(**overrides) -> dict:
    base = dict(learning_rate_half_life_steps=0, batch_size=8, min_task_s=0.0)
    return TrainingSettings(**{**base, **overrides}).model_dump()


def test_average_warms_up_and_never_trails_more_than_half_a_task():
    """The first updates take in the new weights almost fully; the decay then grows to
    at most ``decay`` and at most what keeps the mean age under half the task."""
    state = {"w": torch.zeros(3), "n": torch.tensor(0)}
    average = WeightAverage(state, decay=0.99, saved=None, planned_steps=20)
    assert average.step_decay() == pytest.approx(0.1)
    average.update({"w": torch.ones(3), "n": torch.tensor(5)})
    assert torch.allclose(average.state["w"], torch.full((3,), 0.9))
    assert int(average.state["n"]) == 5, "integer buffers are copied, not averaged"
    for _ in range(2000):
        average.update({"w": torch.ones(3), "n": torch.tensor(5)})
    # cap for 20 planned steps: 10 / 11; the mean age of the weights tends to 10 steps.
    assert average.step_decay() == pytest.approx(10 / 11)
    assert average.lag_steps == pytest.approx(10.0, rel=1e-3)
    # A saved average continues where it was, with this task's own cap.
    again = WeightAverage(state, 0.99, average.to_dict(), planned_steps=200)
    assert again.updates == average.updates and again.step_decay() == pytest.approx(0.99)
    assert torch.equal(again.state["w"], average.state["w"])
    # decay 0: the average is the raw state.
    off = WeightAverage(state, 0.0, None, planned_steps=20)
    off.update({"w": torch.full((3,), 2.0), "n": torch.tensor(1)})
    assert torch.equal(off.state["w"], torch.full((3,), 2.0)) and off.lag_steps == 0


def test_gate_rejects_a_worse_state_and_judges_only_enough_frames():
    frames = emt_labelled(10, seed=2)
    good, bad = make_model(1, seed=0), make_model(1, seed=1)
    with torch.no_grad():  # a state far off: every weight tripled
        for value in bad.state_dict().values():
            if value.is_floating_point():
                value.mul_(3.0)
    good_state, bad_state = good.state_dict(), bad.state_dict()
    rules = settings(min_validation_size=5, gate_tolerance=0.05)
    model = make_model(1, seed=2)
    verdict = judge(model, bad_state, good_state, frames, rules)
    assert verdict.gate == REJECTED and not verdict.publish and verdict.n_validation == 10
    assert verdict.ratio > 1.05 and verdict.new["force_mae"] > verdict.old["force_mae"]
    assert judge(model, good_state, bad_state, frames, rules).gate == ACCEPTED
    assert judge(model, bad_state, None, frames, rules).gate == FIRST
    few = judge(model, bad_state, good_state, frames[:4], rules)
    assert few.gate == UNJUDGED and few.publish and few.new is None
    assert torch.equal(model.state_dict()["readout2.weight"], bad_state["readout2.weight"])
    # A tolerance this large publishes every state with a finite score.
    worse = {k: v * 1.2 if v.is_floating_point() else v for k, v in good_state.items()}
    lenient = settings(min_validation_size=5, gate_tolerance=1e9)
    assert judge(model, worse, good_state, frames, lenient).gate == ACCEPTED
    assert judge(model, worse, good_state, frames, rules).gate == REJECTED


def test_the_error_ratio_weighs_energy_and_forces_alike_and_handles_nan():
    rules = settings()
    old = {"force_mae": 0.10, "energy_mae_per_atom": 0.002}
    twice_the_energy = {"force_mae": 0.095, "energy_mae_per_atom": 0.004}
    assert error_ratio(twice_the_energy, old, rules) == pytest.approx(1.475)
    assert error_ratio(old, old, rules) == 1.0
    forces_only = {**rules, "energy_weight": 0.0}
    assert error_ratio(twice_the_energy, old, forces_only) == pytest.approx(0.95)
    broken = {"force_mae": math.nan, "energy_mae_per_atom": math.nan}
    assert error_ratio(broken, old, rules) == math.inf
    assert error_ratio(old, broken, rules) == 0.0, "anything finite beats a broken state"


def test_a_state_that_is_not_finite_is_never_published():
    frames = emt_labelled(10, seed=2)
    good = make_model(1, seed=0).state_dict()
    nan = {k: v * math.nan if v.is_floating_point() else v for k, v in good.items()}
    model = make_model(1, seed=2)
    rules = settings(min_validation_size=5)
    assert judge(model, nan, good, frames, rules).gate == REJECTED
    assert judge(model, nan, good, frames[:2], rules).gate == REJECTED, "even unjudged"
    with pytest.raises(FloatingPointError, match="non-finite"):
        judge(model, nan, None, frames, rules)
    assert judge(model, good, nan, frames, rules).gate == ACCEPTED


def test_rate_is_cut_on_a_plateau_and_never_below_its_floor():
    rules = settings(
        learning_rate=1e-2,
        learning_rate_min=1e-3,
        learning_rate_plateau_patience=2,
        learning_rate_plateau_factor=0.5,
    )
    plateau = RateOnPlateau(None)
    errors = {"force_mae": 0.1, "energy_mae_per_atom": 0.01}
    same = Verdict(ACCEPTED, 10, errors, errors, ratio=1.0)
    better = Verdict(ACCEPTED, 10, errors, errors, ratio=0.5)
    plateau.observe(same, rules)
    plateau.observe(better, rules)  # a gain restarts the count
    plateau.observe(same, rules)
    assert plateau.scale == 1.0
    plateau.observe(Verdict(UNJUDGED, 3), rules)  # not judged: the count stays
    plateau.observe(same, rules)
    assert plateau.scale == 0.5 and plateau.cuts == 1
    assert learning_rate(rules, 0, plateau.scale) == pytest.approx(5e-3)
    for _ in range(20):
        plateau.observe(same, rules)
    assert learning_rate(rules, 0, plateau.scale) == pytest.approx(1e-3), "the floor"
    assert RateOnPlateau(plateau.to_dict()).scale == plateau.scale


def test_a_task_publishes_its_average_and_a_rejected_member_keeps_its_last_good_state(
    tmp_path,
):
    """The checkpoint's weights are what versions stack: the average when the gate
    accepts it, else the state published before; the raw weights go on training."""
    write_dataset(tmp_path / "train.npz", emt_labelled(30, seed=1))
    write_dataset(tmp_path / "val.npz", emt_labelled(10, seed=2))
    args = dict(
        dataset_path=str(tmp_path / "train.npz"),
        spec=SPEC.to_dict(),
        seed=5,
        validation_path=str(tmp_path / "val.npz"),
        device="cpu",
    )
    first = _train_member(
        0,
        checkpoint_in=None,
        checkpoint_out=str(tmp_path / "m1.pt"),
        settings=settings(),
        n_epochs=6,
        **args,
    )
    assert first["gate"] == FIRST and first["published"]
    assert 0 < first["ema_lag_tasks"] <= 0.5, "the average trails by under half a task"
    assert first["epochs_this_task"] >= 6, "events record the epochs a task ran (n_epochs 6)"
    assert first["event"]["gate"] == FIRST
    model, extra = load_checkpoint(tmp_path / "m1.pt")
    raw = extra["raw"]
    assert any(not torch.equal(raw[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(extra["average"]["state"][k], v) for k, v in model.state_dict().items())

    # Spoil the raw weights: the next averaged state is far worse, and is held back.
    spoiled = {k: v * 3.0 if v.is_floating_point() else v for k, v in raw.items()}
    save_checkpoint(tmp_path / "spoiled.pt", model, {**extra, "raw": spoiled, "average": None})
    rejected = _train_member(
        0,
        checkpoint_in=str(tmp_path / "spoiled.pt"),
        checkpoint_out=str(tmp_path / "m2.pt"),
        settings=settings(learning_rate=1e-6, learning_rate_min=1e-6),
        n_epochs=1,
        **args,
    )
    assert rejected["gate"] == REJECTED and not rejected["published"]
    kept, kept_extra = load_checkpoint(tmp_path / "m2.pt")
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in model.state_dict().items())
    assert rejected["val_force_mae"] == pytest.approx(first["val_force_mae"], rel=1e-5)
    # It trains on from its own (spoiled) state, not from the published one.
    assert not torch.equal(kept_extra["raw"]["readout2.weight"], raw["readout2.weight"])
    assert kept_extra["plateau"]["without_gain"] == 1


def test_new_labels_neither_raise_nor_reset_the_rate(tmp_path):
    """A member whose rate was cut on a plateau keeps the cut when labels arrive; the
    next comparison is made on the grown validation set."""
    labels = emt_labelled(40, seed=1)
    write_dataset(tmp_path / "few.npz", labels[:20])
    write_dataset(tmp_path / "more.npz", labels)
    rules = settings(learning_rate_plateau_patience=100, min_validation_size=1)
    common = dict(spec=SPEC.to_dict(), seed=5, validation_path=None, device="cpu")
    first = _train_member(
        0,
        dataset_path=str(tmp_path / "few.npz"),
        checkpoint_in=None,
        checkpoint_out=str(tmp_path / "m1.pt"),
        settings=rules,
        n_epochs=2,
        **common,
    )
    model, extra = load_checkpoint(tmp_path / "m1.pt")
    extra["plateau"] = {"scale": 0.25, "without_gain": 0, "cuts": 2}
    save_checkpoint(tmp_path / "cut.pt", model, extra)
    grown = _train_member(
        0,
        dataset_path=str(tmp_path / "more.npz"),
        checkpoint_in=str(tmp_path / "cut.pt"),
        checkpoint_out=str(tmp_path / "m2.pt"),
        settings=rules,
        n_epochs=2,
        **common,
    )
    assert grown["n_train"] > first["n_train"]
    assert grown["n_validation"] > first["n_validation"], "the out-of-bag frames grew"
    assert grown["learning_rate"] == pytest.approx(learning_rate(rules, grown["steps"], 0.25))
    assert load_checkpoint(tmp_path / "m2.pt")[1]["plateau"]["cuts"] == 2
