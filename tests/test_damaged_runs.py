"""A damaged run directory on --resume: each run file in turn truncated, filled with
garbage or deleted in a copy of one finished run. Every resume either mends the run
with a warning, keeping every stored label, or ends with one message naming the file
and exit status 2. Also: creating a run directory is exclusive, and failed oracle
calls leave no empty scratch folder behind."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.db import connect

from palflow.pipeline.state.rundir import RunDirectory, RunDirectoryError
from tests.test_cli import ROOT, run_cli, small_campaign

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One small EMT copper campaign run to its label budget (about ten seconds)."""
    work = tmp_path_factory.mktemp("finished")
    shutil.copyfile(ROOT / "examples" / "structures" / "cu13.xyz", work / "cu13.xyz")
    campaign = small_campaign(work)
    campaign.write_text(
        campaign.read_text().replace(str(ROOT / "examples" / "structures"), str(work))
    )
    run_dir = work / "run"
    result = run_cli(
        "--site", "threads.py", "--campaign", str(campaign), "--run-dir", str(run_dir),
        "--max-labels", "4", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return run_dir


def labels_of(run_dir: Path) -> dict[int, np.ndarray]:
    """Stored labels: candidate id -> positions."""
    return {row.candidate_id: row.positions for row in connect(run_dir / "labels.db").select()}


def newest(pattern: str):
    return lambda run: max(run.glob(pattern))


FILES = {
    "labels.db": lambda run: run / "labels.db",
    "state.json": lambda run: run / "state.json",
    "state.queue.npz": lambda run: run / "state.queue.npz",
    "oracle output": newest("oracle/batch*.out.npz"),
    "oracle input": newest("oracle/batch*.in.npz"),
    "start structure": lambda run: run / "system" / "start.extxyz",
    "system start": lambda run: run / "system" / "main.start000.extxyz",
    "member checkpoint": newest("models/member0.*.pt"),
    "ensemble version": newest("models/ensemble.v*.pt"),
    "walker frame": newest("generator/walker001.seg*.last.extxyz"),
    "held-out set": lambda run: run / "data" / "test.npz",
    "events.jsonl": lambda run: run / "events.jsonl",
    "metrics.jsonl": lambda run: run / "metrics.jsonl",
    "campaign.json": lambda run: run / "campaign.json",
    "label log rows": lambda run: run / "data" / "labels" / "frames.bin",
    "label log atoms": lambda run: run / "data" / "labels" / "atoms.bin",
}


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        cut = len(data) // 2
        path.write_bytes(data[: cut - (data[cut - 1 : cut] == b"\n")])  # mid-line
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(max(len(data), 256)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "delete":
        path.unlink()
    elif how == "not an object":
        path.write_text("[1, 2, 3]")
    else:
        raise ValueError(how)


def damaged_copy(finished: Path, tmp_path: Path, name: str, how: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "summary.json").unlink()
    if name == "walker frame":
        # The walker continues from its newest frame (it may have been reset home).
        state = json.loads((run / "state.json").read_text())
        state["walkers"][1]["start_path"] = str(FILES[name](run))
        (run / "state.json").write_text(json.dumps(state))
    damage(FILES[name](run), how)
    return run


# (file, how, what the resume does): "mend" warns and goes on, "quiet" goes on as any
# resume does (nothing was damaged that the journal does not handle by design),
# "name" stops with one message naming the file and exit status 2.
CASES = [
    ("labels.db", "truncate", "mend"),
    ("labels.db", "garbage", "mend"),
    ("labels.db", "empty", "mend"),
    ("labels.db", "delete", "mend"),
    ("state.json", "truncate", "mend"),
    ("state.json", "garbage", "mend"),
    ("state.json", "not an object", "mend"),
    ("state.json", "delete", "mend"),
    ("state.queue.npz", "truncate", "mend"),
    ("state.queue.npz", "garbage", "mend"),
    ("state.queue.npz", "delete", "quiet"),
    ("oracle output", "truncate", "mend"),
    ("oracle output", "garbage", "mend"),
    ("oracle output", "delete", "quiet"),
    ("oracle input", "truncate", "mend"),
    ("oracle input", "garbage", "mend"),
    ("start structure", "delete", "mend"),
    ("start structure", "garbage", "mend"),
    ("start structure", "empty", "mend"),
    ("system start", "delete", "mend"),
    ("member checkpoint", "truncate", "mend"),
    ("member checkpoint", "garbage", "mend"),
    ("member checkpoint", "delete", "mend"),
    ("ensemble version", "truncate", "mend"),
    ("ensemble version", "garbage", "mend"),
    ("walker frame", "garbage", "mend"),
    ("held-out set", "truncate", "mend"),
    ("events.jsonl", "truncate", "mend"),
    ("events.jsonl", "garbage", "mend"),
    ("metrics.jsonl", "truncate", "mend"),
    # A truncated log lacks its newest rows, which labels.db gives back as after a kill.
    ("label log rows", "truncate", "quiet"),
    ("label log rows", "garbage", "mend"),
    ("label log rows", "delete", "mend"),
    ("label log atoms", "truncate", "mend"),
    ("label log atoms", "garbage", "mend"),
    ("label log atoms", "delete", "mend"),
    ("campaign.json", "truncate", "name"),
    ("campaign.json", "garbage", "name"),
    ("campaign.json", "not an object", "name"),
]


def resume_in_process(run: Path):
    """What ``--resume`` does before anything is submitted: prepare (lock and mend),
    then rebuild the state."""
    from palflow.pipeline.resume.restore import resume_state
    from palflow.pipeline.run import parse_args, prepare_run

    campaign, run_directory, _ = prepare_run(
        parse_args(["--site", "threads.py", "--resume", str(run)])
    )
    return resume_state(campaign, run_directory)


def assert_no_label_lost(before: dict, run: Path, label_ids: list[int]) -> None:
    after = labels_of(run)
    assert sorted(after) == sorted(label_ids), "labels.db and the resumed state disagree"
    assert set(before) <= set(after), f"labels lost: {sorted(set(before) - set(after))}"
    assert len(after) == len(label_ids) == len(set(label_ids)), "a label was stored twice"
    for candidate_id, positions in before.items():
        np.testing.assert_allclose(after[candidate_id], positions)


@pytest.mark.parametrize(("name", "how", "outcome"), CASES, ids=[f"{n}-{h}" for n, h, _ in CASES])
def test_a_damaged_file_is_mended_or_named(finished, tmp_path, caplog, name, how, outcome):
    before = labels_of(finished)
    run = damaged_copy(finished, tmp_path, name, how)
    caplog.set_level(logging.WARNING)
    if outcome == "name":
        with pytest.raises(RunDirectoryError) as raised:
            resume_in_process(run)
        assert Path(FILES[name](finished)).name in str(raised.value)
        assert labels_of(run).keys() == before.keys()
        return
    state, queue, _ = resume_in_process(run)
    mends = [
        r.getMessage() for r in caplog.records if r.name.startswith("palflow.pipeline.resume.mend")
    ]
    if outcome == "mend":
        assert mends, "the mend was not said"
        assert any(FILES[name](finished).name in m for m in mends), mends
    else:
        assert not mends, mends
    assert_no_label_lost(before, run, state.label_log.column("candidate_id"))
    assert not state.labelled_ids & {c.candidate_id for c in queue.candidates()}
    assert all(Path(w.start_path).is_file() for w in state.walkers)
    assert all(m.checkpoint is None or Path(m.checkpoint).is_file() for m in state.members)
    if (run / "damaged").exists():
        assert any((run / "damaged").rglob("*")), "the damaged file is kept"


def test_a_member_falls_back_to_its_previous_good_checkpoint(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    task, newest_path = RunDirectory(run).member_checkpoints(0)[-1]
    older = Path(RunDirectory(run).member_checkpoint(0, task - 3))
    shutil.copyfile(newest_path, older)
    damage(newest_path, "garbage")
    state, _, _ = resume_in_process(run)
    assert state.members[0].checkpoint == str(older)
    assert state.members[0].tasks == task - 2
    assert (run / "damaged" / "models" / newest_path.name).exists()


@pytest.mark.parametrize(
    "damaged",
    [("oracle input", "labels.db"), ("start structure", "system start")],
    ids=["labels-nowhere", "start-and-its-source-gone"],
)
def test_what_cannot_be_rebuilt_is_named_with_exit_status_2(finished, tmp_path, capsys, damaged):
    """An oracle input whose labels no readable labels.db holds; a start structure
    whose copies and source are all gone."""
    from palflow.pipeline.run import main

    run = damaged_copy(finished, tmp_path, damaged[0], "garbage")
    if damaged[1] == "labels.db":
        damage(run / "labels.db", "garbage")
        named = FILES["oracle input"](finished).name
    else:
        damage(FILES["system start"](run), "delete")
        settings = json.loads((run / "campaign.json").read_text())
        settings["system"]["structure"] = str(tmp_path / "moved-away.xyz")
        (run / "campaign.json").write_text(json.dumps(settings))
        named = "start"
    stored = sorted(p.name for p in run.rglob("*"))
    status = main(["--site", "threads.py", "--resume", str(run), "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(error) == 1 and error[0].startswith("palflow: error:"), error
    assert named in error[0]
    if damaged[1] == "system start":
        assert "moved-away.xyz" in error[0]
        assert sorted(p.name for p in run.rglob("*")) == stored


def run_resume(run: Path) -> subprocess.CompletedProcess:
    return run_cli("--site", "threads.py", "--resume", str(run), "--quiet")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("labels.db", "truncate"),
        ("state.json", "garbage"),
        ("state.queue.npz", "truncate"),
        ("oracle output", "truncate"),
        ("member checkpoint", "garbage"),
        ("start structure", "delete"),
    ],
)
def test_the_command_resumes_a_mended_run_to_its_end(finished, tmp_path, name, how):
    """End to end: the mend is on the console, the run finishes, no label is lost."""
    before = labels_of(finished)
    run = damaged_copy(finished, tmp_path, name, how)
    result = run_resume(run)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resume mends the run" in result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert_no_label_lost(before, run, list(labels_of(run)))
    assert summary["labels"] + summary["initial_labels"] == len(labels_of(run))


def test_the_command_names_a_damaged_campaign_file(finished, tmp_path):
    run = damaged_copy(finished, tmp_path, "campaign.json", "garbage")
    result = run_resume(run)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("palflow: error:")
    ]
    assert "campaign.json" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- creation
def _create(root: str, barrier, results) -> None:
    barrier.wait()
    try:
        RunDirectory.create(root, {"name": str(os.getpid())})
        results.put("won")
    except RunDirectoryError as error:
        results.put(f"lost: {error}")
    except BaseException as error:  # noqa: BLE001 (reported to the parent)
        results.put(f"crashed: {error!r}")


@pytest.mark.parametrize("existing", ["none", "empty folder"])
def test_of_racing_creators_exactly_one_wins_and_nothing_is_left(tmp_path, existing):
    context = multiprocessing.get_context("fork")
    for round_ in range(8):
        root = tmp_path / f"run{round_}"
        if existing == "empty folder":
            root.mkdir()
        barrier, results = context.Barrier(3), context.Queue()
        racers = [context.Process(target=_create, args=(str(root), barrier, results))
                  for _ in range(3)]  # fmt: skip
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(30)
        outcomes = sorted(results.get(timeout=5) for _ in racers)
        assert outcomes.count("won") == 1, outcomes
        assert all(o.startswith("lost: run directory") for o in outcomes if o != "won"), outcomes
        assert json.loads((root / "campaign.json").read_text())["name"].isdigit()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"run{i}" for i in range(8)]


@pytest.mark.slow
def test_two_commands_started_together_on_one_new_run_directory(tmp_path):
    """One runs the campaign; the other says why it did not, with exit status 2."""
    campaign, run_dir = small_campaign(tmp_path), tmp_path / "run"
    command = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--site", "threads.py",
               "--campaign", str(campaign), "--run-dir", str(run_dir), "--max-labels", "2",
               "--quiet"]  # fmt: skip
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=280) for p in processes]
    statuses = sorted(p.returncode for p in processes)
    assert statuses == [0, 2], outputs
    loser = outputs[[p.returncode for p in processes].index(2)][1]
    assert loser.strip().startswith("palflow: error:") and str(run_dir) in loser, loser
    assert "Traceback" not in loser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "small.toml"]


# ---------------------------------------------------------------- scratch
class WritingFailure(EMT):
    """Writes a file into its scratch, then fails: the scratch is kept to look at."""

    def __init__(self, directory: str = ".", **kwargs) -> None:
        super().__init__(**kwargs)
        self.scratch = Path(directory)

    def calculate(self, *args, **kwargs):
        (self.scratch / "output.log").write_text("SCF did not converge\n")
        raise RuntimeError("SCF did not converge")


def label_failing(tmp_path, calculator: str, output: Path, **kwargs) -> Path:
    from ase.build import bulk

    from palflow.apps.data.dataset import write_dataset
    from palflow.apps.oracle import _label_batch

    write_dataset(tmp_path / "in.npz", [bulk("Cu", cubic=True)] * 2,
                  extra={"candidate_id": np.arange(2)})  # fmt: skip
    scratch_dir = tmp_path / "run" / "oracle" / "scratch" / "batch000001"
    spec = {"calculator": calculator, "kwargs": kwargs}
    _label_batch(str(tmp_path / "in.npz"), str(output), spec, str(scratch_dir),
                 max_force=50.0, timeout_s=0.0, isolate=False)  # fmt: skip
    return scratch_dir


def test_failed_oracle_calls_leave_no_empty_scratch(tmp_path, monkeypatch):
    local = tmp_path / "local"
    local.mkdir()
    monkeypatch.setenv("PALFLOW_SCRATCH", str(local))
    # Every structure fails, the calculator wrote nothing: no folder kept.
    kept = label_failing(
        tmp_path, "palflow.apps.oracles.fault_injection:FaultyCalculator", tmp_path / "a.npz",
        rate=1.0, kinds=["exception"],
    )  # fmt: skip
    assert not kept.parent.exists() and not any(local.iterdir())
    # The task itself raises (its output cannot be written): nothing left either.
    with pytest.raises(OSError):
        label_failing(tmp_path, "ase.calculators.emt:EMT", tmp_path / "no" / "such" / "b.npz")
    assert not kept.parent.exists() and not any(local.iterdir())
    # A calculator that wrote files: they are kept for a post-mortem.
    kept = label_failing(tmp_path, "tests.test_damaged_runs:WritingFailure", tmp_path / "c.npz")
    assert (kept / "output.log").is_file() and not any(local.iterdir())


def test_a_resume_sweeps_empty_scratch_folders(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    scratch = run / "oracle" / "scratch"
    (scratch / "batch000002").mkdir(parents=True)
    (scratch / "batch000003" / "empty").mkdir(parents=True)
    (scratch / "batch000004").mkdir()
    (scratch / "batch000004" / "output.log").write_text("kept\n")
    resume_in_process(run)
    assert sorted(p.name for p in scratch.iterdir()) == ["batch000004"]


def test_a_resume_reads_only_the_oracle_batches_that_changed(finished, tmp_path, monkeypatch):
    """The coordinator notes each batch it harvested (oracle/checked.jsonl), and
    state.json says below which task every batch was harvested: a resume reads no
    batch again, also after a mend that leaves the labels and the journal whole (a
    torn events.jsonl, as a kill leaves); one damaged since is read, and mended; after
    a mend of the journal (the queue), every batch is read again."""
    from palflow.pipeline.resume import mend, restore

    run = damaged_copy(finished, tmp_path, "events.jsonl", "truncate")
    checked, requeued = [], []
    real_check, real_read = mend.dataset_problem, restore.read_candidates
    monkeypatch.setattr(
        mend, "dataset_problem", lambda p, *k: checked.append(Path(p).name) or real_check(p, *k)
    )
    monkeypatch.setattr(
        restore, "read_candidates", lambda p: requeued.append(Path(p).name) or real_read(p)
    )

    def batches_read() -> list[str]:
        names = [name for name in checked + requeued if name.startswith("batch")]
        checked.clear(), requeued.clear()
        return names

    state, _, _ = resume_in_process(run)
    state.run.unlock()
    batches = sorted(p.name for p in (run / "oracle").glob("batch*.npz"))
    assert len(batches) >= 4
    assert batches_read() == []
    damaged = FILES["oracle output"](run)
    damage(damaged, "garbage")
    state, _, _ = resume_in_process(run)  # mended: read, and all read again for the requeue
    state.run.unlock()
    read = batches_read()
    assert read[:2] == [damaged.name.replace(".out.", ".in."), damaged.name], read
    assert damaged.name.replace(".out.", ".in.") in read[2:]
    state, _, _ = resume_in_process(run)
    state.run.unlock()
    assert batches_read() == []
    damage(run / "state.queue.npz", "garbage")
    resume_in_process(run)
    assert {n for n in batches_read() if ".in." in n} == {n for n in batches if ".in." in n}
