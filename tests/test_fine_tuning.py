"""Fine-tuning without forgetting (:mod:`palflow.apps.fine_tuning`): the settings,
frozen weights staying put, replay frames in the batches and out of validation,
pseudo-labels made once, and the errors that name what to fix."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from pydantic import ValidationError

from palflow.apps import fine_tuning, training
from palflow.apps.data.dataset import write_dataset
from palflow.apps.models.calculator import evaluate_errors, predict_structures
from palflow.apps.models.core import build_batch, load_checkpoint
from palflow.apps.models.schnet.network import ModelSpec, SchNetEnsemble
from palflow.apps.sections import TrainingSettings
from palflow.apps.training import _train_member
from palflow.pipeline.config.settings import CampaignError, load_campaign

SPEC = ModelSpec(cutoff=4.0, n_features=16, n_interactions=2, n_rbf=10, max_z=30).to_dict()


def cu_frames(n: int, seed: int, repeat=(1, 1, 1), offset: float = 0.0) -> list:
    """``n`` rattled fcc Cu cells (4 atoms, or ``repeat`` of them) with EMT's energy
    (plus ``offset`` eV per atom: another energy reference), forces and stress."""
    frames = []
    for i in range(n):
        atoms = bulk("Cu", cubic=True).repeat(repeat)
        atoms.rattle(0.1, seed=seed * 1000 + i)
        atoms.calc = EMT()
        energy, forces, stress = (
            atoms.get_potential_energy(),
            atoms.get_forces(),
            atoms.get_stress(),
        )
        energy += offset * len(atoms)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
        frames.append(atoms)
    return frames


@pytest.fixture
def data(tmp_path):
    """A training set of 4-atom cells, held-out labels, and a replay file of 8-atom
    cells whose energies are 100 eV/atom off (so that its frames are told apart)."""
    write_dataset(tmp_path / "train.npz", cu_frames(20, seed=1))
    write_dataset(tmp_path / "val.npz", cu_frames(8, seed=2))
    write(tmp_path / "replay.extxyz", cu_frames(10, seed=3, repeat=(2, 1, 1), offset=100.0))
    return tmp_path


def settings(**changes) -> dict:
    return TrainingSettings(min_task_s=0.0, batch_size=8, **changes).model_dump()


def train(folder, out: str, checkpoint_in: str | None = None, n_epochs: int = 3, **changes):
    """One training task of member 0 on ``folder``'s data; ``values``, when given, is
    the whole training section, else :func:`settings` with ``changes``."""
    values = changes.pop("values", None) or settings(**changes)
    return _train_member(
        0,
        str(folder / "train.npz"),
        None if checkpoint_in is None else str(folder / checkpoint_in),
        str(folder / out),
        SPEC,
        values,
        seed=3,
        n_epochs=n_epochs,
        validation_path=str(folder / "val.npz"),
        device="cpu",
    )


# ------------------------------------------------------------------ settings
def test_settings_defaults_bounds_and_the_rules_between_them(data):
    default = TrainingSettings()
    assert (default.train_only, default.replay_fraction, default.replay_file) == ("all", 0.0, None)
    for bad in (
        {"train_only": "backbone"},
        {"replay_fraction": 1.0},
        {"replay_fraction": -0.1},
        {"replay_fraction": "0.25", "replay_source": "foundation"},  # strict: no strings
        {"replay_source": "disk"},
        {"replay_size": 0, "replay_fraction": 0.2, "replay_source": "foundation"},
    ):
        with pytest.raises(ValidationError):
            TrainingSettings(**bad)
    rules = {
        "takes replay frames from replay_file": {"replay_fraction": 0.25},
        "drop one of them": {
            "replay_fraction": 0.25,
            "replay_source": "foundation",
            "replay_file": str(data / "replay.extxyz"),
        },
        "does nothing": {"replay_file": str(data / "replay.extxyz")},
        "needs batch_size >= 2": {
            "replay_fraction": 0.5,
            "replay_source": "foundation",
            "batch_size": 1,
        },
    }
    for message, values in rules.items():
        with pytest.raises(ValidationError, match=message):
            TrainingSettings(**values)
    with pytest.raises(ValidationError, match="does nothing"):
        TrainingSettings(replay_source="foundation")
    good = TrainingSettings(replay_fraction=0.25, replay_source="foundation", train_only="readout")
    assert good.replay_size == 64 and good.train_only == "readout"


def test_a_replay_file_is_checked_and_made_absolute_before_anything_runs(data, monkeypatch):
    monkeypatch.chdir(data)
    given = TrainingSettings(replay_fraction=0.25, replay_file="replay.extxyz")
    assert given.replay_file == str(data / "replay.extxyz")  # a worker's folder is not ours
    unlabelled = bulk("Cu", cubic=True)
    write(data / "bare.extxyz", [unlabelled])
    for path, message in (("missing.extxyz", "no file"), ("bare.extxyz", "holds no forces")):
        with pytest.raises(CampaignError, match=message) as error:
            load_campaign(None, training__replay_fraction=0.25, training__replay_file=path)
        assert "\n" not in str(error.value) and "training.replay_file" in str(error.value)


# ------------------------------------------------------------------ freezing
@pytest.mark.parametrize("part", ["readout", "last_interaction"])
def test_frozen_weights_stay_and_the_trainable_ones_learn_forces(data, part):
    train(data, "start.pt", n_epochs=0)
    start, _ = load_checkpoint(data / "start.pt")
    values = dict(train_only=part, force_weight=100.0, learning_rate=1e-2, gate_tolerance=1e9)
    train(data, "tuned.pt", "start.pt", n_epochs=10, **values)  # every state published
    tuned, extra = load_checkpoint(data / "tuned.pt")
    trainable = {id(p) for p in start.trainable_parameters(part)}
    names = {name for name, p in start.named_parameters() if id(p) in trainable}
    assert names and any(name.startswith("readout") for name in names)
    assert ("interactions.1.filter1.weight" in names) == (part == "last_interaction")
    before = dict(start.named_parameters())
    for state in (extra["raw"], tuned.state_dict()):  # raw and published weights
        for name, value in before.items():
            moved = not torch.equal(state[name], value)
            assert moved == (name in names), f"{name}: moved {moved}, trainable {name in names}"
    # The optimiser holds only the trainable ones.
    assert len(extra["optimizer"]["state"]) == len(names) and extra["train_only"] == part
    frames = cu_frames(20, seed=1)
    assert (
        evaluate_errors(tuned, frames, "cpu")["force_mae"]
        < 0.5 * evaluate_errors(start, frames, "cpu")["force_mae"]
    )


def test_a_model_without_parts_names_its_backend_and_the_setting(data, monkeypatch):
    monkeypatch.delattr(SchNetEnsemble, "trainable_parameters")
    with pytest.raises(ValueError, match="train_only = 'readout': the 'schnet' model backend"):
        train(data, "m.pt", n_epochs=1, train_only="readout")
    train(data, "m.pt", n_epochs=1)  # "all" needs no parts


def test_the_optimiser_state_of_another_part_is_dropped_not_misapplied(data, caplog):
    train(data, "all.pt", n_epochs=2)
    with caplog.at_level(logging.WARNING, logger="palflow.apps.fine_tuning"):
        train(data, "readout.pt", "all.pt", n_epochs=2, train_only="readout")
    assert "Adam starts afresh" in caplog.text
    caplog.clear()
    first = load_checkpoint(data / "readout.pt")[1]["optimizer"]["state"]
    train(data, "again.pt", "readout.pt", n_epochs=2, train_only="readout")
    assert "Adam starts afresh" not in caplog.text  # the same part: its state carries on
    again = load_checkpoint(data / "again.pt")[1]["optimizer"]["state"]
    assert int(again[0]["step"]) == 2 * int(first[0]["step"])


# ------------------------------------------------------------------ replay
def test_replay_frames_fill_their_share_of_each_batch_and_stay_out_of_validation(data, monkeypatch):
    batches, judged = [], []
    loss, judge = training._loss, training.judge

    def recording_loss(model, batch, settings, n_replay=0):
        batches.append((batch.n_atoms.tolist(), n_replay))
        return loss(model, batch, settings, n_replay)

    def recording_judge(model, state, published, validation, settings):
        judged.extend(validation)
        return judge(model, state, published, validation, settings)

    monkeypatch.setattr(training, "_loss", recording_loss)
    monkeypatch.setattr(training, "judge", recording_judge)
    result = train(
        data, "m.pt", n_epochs=2, replay_fraction=0.25, replay_file=str(data / "replay.extxyz")
    )
    assert result["n_replay"] == 10
    full = [(atoms, n) for atoms, n in batches if len(atoms) == 8]
    assert full and all(n == 2 for _, n in full)  # round(0.25 * 8) of every full batch
    for atoms, n in batches:  # campaign labels first (4 atoms), replay frames last (8)
        assert n >= 1 and atoms[-n:] == [8] * n and atoms[:-n] == [4] * (len(atoms) - n)
    per_epoch = sum(len(atoms) - n for atoms, n in batches) / 2
    assert per_epoch == result["n_train"]  # an epoch is a pass over the campaign's labels
    assert judged and all(len(atoms) == 4 for atoms in judged)
    assert result["n_validation"] == len(judged)


def test_replay_frames_train_forces_and_stress_not_energy():
    model = SchNetEnsemble(ModelSpec(**SPEC), 1).train()
    own, replay = cu_frames(3, seed=5), cu_frames(2, seed=6, repeat=(2, 1, 1))
    shifted = cu_frames(2, seed=6, repeat=(2, 1, 1), offset=100.0)
    values = settings(loss="mse")

    def loss(frames, n_replay):
        return training._loss(model, build_batch(frames, 4.0, "cpu"), values, n_replay).item()

    assert loss(own + replay, 2) == pytest.approx(loss(own + shifted, 2), rel=1e-6)
    assert loss(own + shifted, 0) > 10 * loss(own + replay, 0)  # the energy term, when counted
    moved = [a.copy() for a in replay]
    for atoms, frame in zip(moved, replay, strict=True):
        forces = frame.calc.results["forces"] + 1.0
        atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=forces)
    assert loss(own + moved, 2) > loss(own + replay, 2)  # their forces count


def test_pseudo_labels_are_made_once_and_reused(data, monkeypatch):
    calls = []
    make = fine_tuning.pseudo_labels

    def counting(*args, **kwargs):
        calls.append(1)
        return make(*args, **kwargs)

    monkeypatch.setattr(fine_tuning, "pseudo_labels", counting)
    replay = dict(replay_fraction=0.25, replay_source="foundation", replay_size=12)
    with pytest.raises(ValueError, match="starts from random weights"):
        train(data, "fresh.pt", n_epochs=1, **replay)
    train(data, "warm.pt", n_epochs=4)  # stands for a pretrained member (a warm start)
    first = train(data, "one.pt", "warm.pt", n_epochs=1, **replay)
    train(data, "two.pt", "one.pt", n_epochs=1, **replay)
    assert len(calls) == 1 and first["n_replay"] == 12
    one, two = (load_checkpoint(data / name)[1]["replay"] for name in ("one.pt", "two.pt"))
    assert all(torch.equal(one[key], two[key]) for key in one)
    # Their labels are the warm member's own forces (of the raw weights its training goes
    # on from), on rattled copies of its training frames.
    warm, extra = load_checkpoint(data / "warm.pt")
    warm.load_state_dict(extra["raw"])
    frames = fine_tuning.frames_from_extra(one)
    predicted = predict_structures(warm, frames, "cpu")["forces"]
    for atoms, forces in zip(frames, predicted, strict=True):
        np.testing.assert_allclose(atoms.calc.results["forces"], forces, atol=1e-5)
        assert atoms.calc.results["stress"].shape in ((6,), (3, 3))
    originals = cu_frames(20, seed=1)
    nearest = [min(np.abs(a.positions - b.positions).max() for b in originals) for a in frames]
    assert all(0 < d < 0.3 for d in nearest)


def test_a_replay_file_that_breaks_after_the_settings_names_the_frame(data):
    path = data / "replay.extxyz"
    values = settings(replay_fraction=0.25, replay_file=str(path))  # checked: sound
    frames = cu_frames(2, seed=7)
    frames[1].calc = None
    write(path, frames)
    with pytest.raises(ValueError, match="frame 1 of 2 has no forces"):
        train(data, "m.pt", n_epochs=1, values=values)
    path.unlink()
    with pytest.raises(ValueError, match="replay_file .* cannot be read"):
        train(data, "m.pt", n_epochs=1, values=values)


def test_a_fresh_member_of_a_mace_foundation_labels_its_own_replay_frames(tmp_path):
    """With ``model.foundation`` a fresh member may pseudo-label (it is the foundation,
    its readout perturbed): the frames stored are its own forces on them."""
    from palflow.apps.models import registry
    from palflow.apps.models.core import new_ensemble
    from palflow.pipeline.config.models import resolve_model_spec

    def spec(**changes) -> dict:
        tiny = dict(r_max=4.0, num_channels=8, max_L=0, correlation=2, num_interactions=1)
        model = {f"model__{k}": v for k, v in {**tiny, "dtype": "float32", **changes}.items()}
        campaign = load_campaign(
            None, model__name="mace", oracle__calculator="ase.calculators.emt:EMT",
            oracle__kwargs={}, **model,
        )  # fmt: skip
        return resolve_model_spec(campaign, frames, frames[0])

    frames = cu_frames(6, seed=1)
    (foundation,) = new_ensemble("mace", spec(), 1, seed=0).export(str(tmp_path / "foundation"))
    tuned = spec(foundation=foundation)
    write_dataset(tmp_path / "train.npz", frames)
    values = settings(replay_fraction=0.25, replay_source="foundation", replay_size=6)
    out = str(tmp_path / "member.pt")
    _train_member(0, str(tmp_path / "train.npz"), None, out, tuned, values, seed=2, n_epochs=1)
    stored = fine_tuning.frames_from_extra(load_checkpoint(out)[1]["replay"])
    fresh = registry.backend("mace").new_member(tuned, frames, 2, "cpu")
    predicted = predict_structures(fresh, stored, "cpu")["forces"]
    assert len(stored) == 6
    for atoms, forces in zip(stored, predicted, strict=True):
        np.testing.assert_allclose(atoms.calc.results["forces"], forces, atol=1e-4)


def test_the_preflight_refuses_train_only_for_a_backend_without_parts(monkeypatch):
    """A backend that names no parts of its weights (``trains_parts`` false) cannot
    train one alone: refused before anything runs, naming the setting and the backend."""
    from palflow.apps.models.backend import ModelError
    from palflow.apps.models.schnet import SchNetBackend
    from palflow.pipeline.config.models import check_model

    start = bulk("Cu", "fcc", a=3.6, cubic=True)
    campaign = load_campaign(None, training__train_only="readout")
    check_model(campaign, start)  # SchNet names its readout
    monkeypatch.setattr(SchNetBackend, "trains_parts", False)
    with pytest.raises(ModelError, match="train_only = 'readout'.*'schnet'"):
        check_model(campaign, start)
    check_model(load_campaign(None), start)  # "all" needs no parts
