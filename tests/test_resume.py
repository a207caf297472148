"""Kill -9 the coordinator at random moments, resume each time: no label lost or doubled."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from ase.db import connect

from palflow.pipeline.resume.journal import labelled_ids_in_results
from palflow.pipeline.state.rundir import RunDirectory
from tests.test_cli import ROOT, run_cli, small_campaign


def stored_candidate_ids(path) -> list[int]:
    """The candidate ids of the rows in a labels database, read with SQLite alone: a
    kill while ASE creates the file can leave its tables without ASE's version row,
    which ASE's reader refuses (the resume mends that file; this only counts rows)."""
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
        if "systems" not in tables:
            return []
        pairs = connection.execute("SELECT key_value_pairs FROM systems").fetchall()
    return [int(json.loads(text)["candidate_id"]) for (text,) in pairs]


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "pipeline" / "run.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def systems_campaign(tmp_path):
    """The small campaign with two systems: a periodic copper cell at constant
    pressure (stress labels) and the copper cluster."""
    from ase.build import bulk
    from ase.io import write

    write(tmp_path / "cu32.extxyz", bulk("Cu", cubic=True).repeat(2))
    cluster = ROOT / "examples" / "structures" / "cu13.xyz"
    systems = (
        f'[[systems]]\nname = "bulk"\nstructure = "{tmp_path / "cu32.extxyz"}"\n'
        "pressure_bar = 1.0\ntemperatures_K = [600.0]\nn_walkers = 1\n"
        f'[[systems]]\nname = "cluster"\nstructure = "{cluster}"\nn_walkers = 1\n'
    )
    text = small_campaign(tmp_path).read_text()
    text = text.replace(f'[system]\nstructure = "{cluster}"\n', systems)
    path = tmp_path / "systems.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["cluster", "systems"])
def test_five_kills_lose_and_double_no_label(tmp_path, kind):
    """Also for two systems, one of them periodic at constant pressure."""
    campaign = small_campaign(tmp_path) if kind == "cluster" else systems_campaign(tmp_path)
    run_dir = tmp_path / "run"
    rng = random.Random(4)
    kills = 0
    process = start_cli(
        "--site",
        "threads.py",
        "--campaign",
        str(campaign),
        "--run-dir",
        str(run_dir),
        "--max-labels",
        "40",
        "--quiet",
    )
    while kills < 5:
        # The first kill comes once the run exists, so that every later session resumes.
        while kills == 0 and not (run_dir / "campaign.json").exists():
            time.sleep(0.1)
        time.sleep(rng.uniform(2.0, 6.0))
        if process.poll() is not None:
            break  # it finished before the kill: the budget is too small for the test
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
        stored = stored_candidate_ids(run_dir / "labels.db")
        assert len(stored) == len(set(stored)), f"a label was stored twice before kill {kills}"
        process = start_cli("--site", "threads.py", "--resume", str(run_dir), "--quiet")
    output = process.communicate(timeout=500)[0].decode()
    assert kills == 5, "the campaign ended before five kills"
    assert process.returncode == 0, output[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["labels"] == 40, "the label budget counts across resumes"
    rows = list(connect(run_dir / "labels.db").select())
    ids = [row.candidate_id for row in rows]
    assert [i for i, n in Counter(ids).items() if n > 1] == [], "duplicates"
    lost = labelled_ids_in_results(RunDirectory(run_dir)) - set(ids)
    assert lost == set(), f"labels computed but not stored: {sorted(lost)}"
    assert len(rows) == summary["labels"] + summary["initial_labels"]
    assert len(summary["resumes"]) >= 1
    assert all(r["seconds_to_first_task"] >= 0 for r in summary["resumes"])
    if kind == "systems":
        bulk = [row for row in rows if row.system == "bulk"]
        assert bulk and all("stress" in row.toatoms().calc.results for row in bulk)
        volumes = {round(row.toatoms().get_volume(), 3) for row in bulk if row.source == "active"}
        assert len(volumes) > 1, "constant pressure moved the cells"
        assert sum(s["labels"] for s in summary["systems"].values()) == 40


def test_resume_harvests_a_result_that_finished_while_the_coordinator_was_down(tmp_path):
    """An oracle output written after the coordinator died is stored, not recomputed."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "--site",
        "threads.py",
        "--campaign",
        str(small_campaign(tmp_path)),
        "--run-dir",
        str(run_dir),
        "--max-labels",
        "4",
        "--quiet",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # Make the run look killed with its last batch done but not stored.
    database = connect(run_dir / "labels.db")
    last_batch = max((run_dir / "oracle").glob("batch*.out.npz"))
    with np.load(last_batch) as data:
        orphaned = [
            int(i) for i, s in zip(data["candidate_id"], data["status"], strict=True) if s == "ok"
        ]
    database.delete([row.id for row in database.select() if row.candidate_id in orphaned])
    os.remove(run_dir / "summary.json")
    mtime = last_batch.stat().st_mtime

    result = run_cli("--site", "threads.py", "--resume", str(run_dir), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    stored = {row.candidate_id for row in connect(run_dir / "labels.db").select()}
    assert set(orphaned) <= stored
    assert last_batch.stat().st_mtime == mtime, "the finished batch was not recomputed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["labels"] == 4


@pytest.mark.timeout(60)
def test_a_lock_file_left_by_a_kill_does_not_stop_the_next_writer(tmp_path):
    """ASE's database lock is a file made and removed around each write; a coordinator
    killed in between left it, and the resumed run waited for it for ever (seen in
    the five-kills test). The run directory's database does without it."""
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator

    run = RunDirectory.create(tmp_path / "run")
    (run.root / "labels.db.lock").write_text("")  # what the kill left behind
    atoms = molecule("H2O")
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((3, 3)))
    run.store_labels([atoms], [{"candidate_id": 7, "source": "active"}])
    assert [row.candidate_id for row in run.labels().select()] == [7]
