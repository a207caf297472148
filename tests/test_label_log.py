"""The label log (apps/data/label_log.py): each label written once, read back by row,
damage found; and the campaign state on it: a snapshot is a range of rows, the run
directory grows by the same bytes per label, a resume reads ids, not structures."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator

from palflow.apps.data import label_log
from palflow.apps.data.label_log import (
    ATOM_WIDTH,
    FRAME_WIDTH,
    LabelLog,
    LabelLogError,
    read_rows,
    read_selection,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def labelled(n: int, seed: int = 0, molecule_every: int = 0) -> list:
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        if molecule_every and k % molecule_every == 0:
            atoms = molecule("H2O")  # no cell, no stress
            results = {"energy": -1.0 * k, "forces": rng.normal(size=(3, 3))}
        else:
            atoms = bulk("Cu", cubic=True) * (2, 1, 1)
            atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
            results = {
                "energy": float(rng.normal()),
                "forces": rng.normal(size=(len(atoms), 3)),
                "stress": rng.normal(size=6) * 0.01,
            }
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


def meta(ids, **extra) -> list[dict]:
    return [{"candidate_id": i, **extra} for i in ids]


def test_labels_read_back_as_written_with_their_split_and_flags(tmp_path):
    frames = labelled(12, molecule_every=4)
    log = LabelLog.create(tmp_path / "labels")
    log.append(frames[:5], meta(range(1, 6), initial=True, system="cu"))
    log.append(frames[5:], meta(range(6, 13), system="water"))
    reopened = LabelLog.open(tmp_path / "labels", check_crc=True)
    assert reopened.column("candidate_id") == list(range(1, 13))
    assert reopened.column("initial") == [1] * 5 + [0] * 7
    assert reopened.system_names() == ["cu"] * 5 + ["water"] * 7
    back = read_selection(reopened.selection(0, 12, "all", 0.0))
    for written, read in zip(frames, back, strict=True):
        assert np.array_equal(read.numbers, written.numbers)
        assert np.array_equal(read.positions, written.positions)
        assert np.array_equal(read.get_forces(), written.get_forces())
        assert read.get_potential_energy() == written.get_potential_energy()
        assert np.array_equal(read.pbc, written.pbc)
        assert np.array_equal(read.cell[:], written.cell[:])
        if "stress" in written.calc.results:
            assert np.allclose(read.get_stress(), written.get_stress())
        else:
            assert "stress" not in read.calc.results
    # Each label is on one side, by its content, whatever the rows asked.
    train = read_selection(reopened.selection(0, 12, "train", 0.5))
    valid = read_selection(reopened.selection(0, 12, "valid", 0.5))
    assert len(train) + len(valid) == 12 and valid
    assert reopened.count_valid(0, 12, 0.5) == len(valid)
    late = read_selection(reopened.selection(6, 12, "valid", 0.5))
    assert {a.get_potential_energy() for a in late} <= {a.get_potential_energy() for a in valid}
    # Rows that would all be validation labels are all training labels.
    assert read_selection(reopened.selection(0, 12, "valid", 1.0)) == []
    assert len(read_selection(reopened.selection(0, 12, "train", 1.0))) == 12


def test_each_label_is_written_once_so_the_bytes_per_label_are_fixed(tmp_path):
    log = LabelLog.create(tmp_path / "labels")
    sizes = []
    for batch in range(20):
        log.append(labelled(4, seed=batch), meta(range(4 * batch, 4 * batch + 4)))
        sizes.append(sum(p.stat().st_size for p in (tmp_path / "labels").glob("*.bin")))
    per_label = FRAME_WIDTH * 8 + 8 * ATOM_WIDTH * 8  # 8 atoms each
    assert sizes == [per_label * 4 * (b + 1) for b in range(20)]


def test_a_torn_tail_is_trimmed_and_damage_is_found(tmp_path):
    folder = tmp_path / "labels"
    log = LabelLog.create(folder)
    log.append(labelled(6), meta(range(6)))
    size = {name: (folder / name).stat().st_size for name in ("atoms.bin", "frames.bin")}
    # A kill mid-append: the atoms of a 7th label, half its row.
    with open(folder / "atoms.bin", "ab") as handle:
        handle.write(b"\0" * 8 * ATOM_WIDTH * 8)
    with open(folder / "frames.bin", "ab") as handle:
        handle.write(b"\0" * 100)
    assert len(LabelLog.open(folder)) == 6
    assert {n: (folder / n).stat().st_size for n in size} == size
    # One flipped byte in a label's atoms: its CRC says so, to a reader and to a check.
    data = bytearray((folder / "atoms.bin").read_bytes())
    data[8 * ATOM_WIDTH * 8 * 3 + 17] ^= 0xFF
    (folder / "atoms.bin").write_bytes(bytes(data))
    with pytest.raises(LabelLogError, match="atoms.bin has damaged atoms in label 3"):
        LabelLog.open(folder, check_crc=True)
    with pytest.raises(LabelLogError, match="atoms.bin has damaged atoms in label 3"):
        read_rows(folder, 0, 6)
    assert len(read_rows(folder, 4, 6)["energy"]) == 2  # the others still read
    # Rows that do not follow each other (garbage in frames.bin).
    (folder / "frames.bin").write_bytes(os.urandom(FRAME_WIDTH * 8 * 2))
    with pytest.raises(LabelLogError):
        LabelLog.open(folder)


def test_a_log_of_another_format_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "labels"
    LabelLog.create(folder)
    (folder / "log.json").write_text(json.dumps({"format": 99, "uid": "x"}))
    with pytest.raises(LabelLogError, match="not a label log of format 1 .it says 99"):
        LabelLog.open(folder)


def test_a_worker_reads_only_the_labels_appended_since_its_last_task(tmp_path, monkeypatch):
    log = LabelLog.create(tmp_path / "labels")
    asked = []
    real = label_log.read_rows

    def counting(folder, start, stop):
        asked.append((start, stop))
        return real(folder, start, stop)

    monkeypatch.setattr(label_log, "read_rows", counting)
    monkeypatch.setattr(label_log, "_cache", label_log._Cache())
    log.append(labelled(10), meta(range(10)))
    first = read_selection(log.selection(0, 10, "all", 0.0), cache=True)
    log.append(labelled(5, seed=1), meta(range(10, 15)))
    second = read_selection(log.selection(0, 15, "all", 0.0), cache=True)
    # A rolling window that moved on: the rows below it are let go, none read again.
    third = read_selection(log.selection(5, 15, "all", 0.0), cache=True)
    assert asked == [(0, 10), (10, 15)]
    assert len(first) == 10 and len(second) == 15 and len(third) == 10
    assert [a.get_potential_energy() for a in third] == [
        a.get_potential_energy() for a in second[5:]
    ]
    # Another log (a rebuilt one has a new uid) is read afresh.
    other = LabelLog.create(tmp_path / "other")
    other.append(labelled(3, seed=2), meta(range(3)))
    assert len(read_selection(other.selection(0, 3, "all", 0.0), cache=True)) == 3
    assert asked[-1] == (0, 3)


# ---------------------------------------------------------------- the campaign state
def new_state(tmp_path, **overrides):
    from ase.io import read

    from palflow.pipeline.config.settings import load_campaign
    from palflow.pipeline.state.campaign_state import CampaignState
    from palflow.pipeline.state.rundir import RunDirectory

    campaign = load_campaign(ROOT / "examples" / "cu_emt.toml")
    campaign = campaign.model_copy(
        update={"training": campaign.training.model_copy(update=overrides)}
    )
    start = read(ROOT / "examples" / "structures" / "cu13.xyz")
    run = RunDirectory.create(tmp_path / "run", campaign.model_dump())
    return CampaignState.new(campaign, run, start), campaign, run


def harvest(state, batches: int, per_batch: int = 4, first: int = 1) -> None:
    start = state.start
    rng = np.random.default_rng(first)
    for batch in range(batches):
        frames = []
        for _ in range(per_batch):
            atoms = start.copy()
            atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
            atoms.calc = SinglePointCalculator(
                atoms, energy=float(rng.normal()), forces=rng.normal(size=(len(atoms), 3))
            )
            frames.append(atoms)
        ids = range(first + batch * per_batch, first + (batch + 1) * per_batch)
        state.add_labels(frames, [{"candidate_id": i, "source": "active"} for i in ids])


def resumed_labels(campaign, run):
    from palflow.pipeline.state.campaign_state import CampaignState

    fresh = CampaignState(campaign=campaign, run=run, start=None, start_path="", walkers=[],
                          members=[])  # fmt: skip
    fresh.restore_labels()
    fresh.write_snapshot()
    return fresh


def test_a_snapshot_is_a_range_of_rows_and_nothing_is_copied(tmp_path):
    state, campaign, run = new_state(tmp_path, rolling_window=10, validation_fraction=0.25)
    harvest(state, 6)
    snapshot = state.train_snapshot
    assert snapshot.n_labels == 24
    assert (snapshot.train["start"], snapshot.train["stop"]) == (14, 24)
    train, valid = read_selection(snapshot.train), read_selection(snapshot.valid)
    assert len(train) + len(valid) == 10
    assert not list((run.root / "data").glob("*.npz"))  # no snapshot file, ever
    # The in-memory state holds ids and counts, not structures.
    assert state.labelled_ids == set(range(1, 25)) and state.n_labels_active == 24


def test_a_resume_reads_ids_and_appends_what_the_log_lacks(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    state, campaign, run = new_state(tmp_path)
    harvest(state, 3)
    # A kill between labels.db and the log: the db has a batch the log lacks.
    harvest(state, 1, first=13)
    folder = run.label_log
    frames = (folder / "frames.bin").read_bytes()
    (folder / "frames.bin").write_bytes(frames[: 12 * FRAME_WIDTH * 8])
    resumed = resumed_labels(campaign, run)
    assert resumed.label_log.column("candidate_id") == list(range(1, 17))
    assert resumed.n_labels_active == 16 and resumed.train_snapshot.n_labels == 16
    assert "4 labels of labels.db appended to the label log" in caplog.text
    back = read_selection(resumed.label_log.selection(0, 16, "all", 0.0))
    written = [row.toatoms() for row in run.labels().select(sort="id")]
    assert [a.get_potential_energy() for a in back] == [a.get_potential_energy() for a in written]


def test_a_run_of_the_version_before_the_log_is_migrated_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    import shutil

    state, campaign, run = new_state(tmp_path)
    harvest(state, 3)
    # What the version before left: labels.db and the snapshots, no log.
    shutil.rmtree(run.label_log)
    (run.root / "data" / "train.000012.npz").write_bytes(b"old snapshot")
    resumed = resumed_labels(campaign, run)
    assert resumed.label_log.column("candidate_id") == list(range(1, 13))
    assert caplog.text.count("go into the label log data/labels/, once") == 1
    assert (run.root / "data" / "train.000012.npz").read_bytes() == b"old snapshot"
    caplog.clear()
    again = resumed_labels(campaign, run)  # migrated once: the next resume only opens it
    assert len(again.label_log) == 12 and "label log" not in caplog.text


def test_export_writes_the_same_labels_extxyz_as_the_version_before(tmp_path):
    import export_run_fixture

    before = (ROOT / "tests" / "data" / "export_labels.extxyz").read_text()
    assert export_run_fixture.exported_labels(tmp_path) == before
