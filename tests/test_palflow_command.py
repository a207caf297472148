"""The installed ``palflow`` command: run, status, report and export on a real run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from palflow.pipeline.cli import main
from palflow.pipeline.observe.status import run_status_facts
from palflow.pipeline.state.rundir import RunDirectory
from tests.test_cli import ROOT, small_campaign

PALFLOW = Path(sys.executable).parent / "palflow"


def palflow(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed script, as a user runs it."""
    assert PALFLOW.exists(), f"{PALFLOW} is missing: install the project with pip install -e ."
    return subprocess.run(
        [str(PALFLOW), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def exit_status(argv: list[str]) -> int:
    """``palflow argv`` in this process; argparse's errors exit, the others return."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def files_and_times(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: its size and modification time (ns)."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            stat = (Path(folder) / name).stat()
            found[os.path.relpath(Path(folder) / name, root)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A short campaign (EMT on Cu13, thread pools) run through ``palflow run``."""
    tmp_path = tmp_path_factory.mktemp("palflow")
    root = tmp_path / "run"
    done = palflow(
        "run", "--site", "threads.py", "--campaign", str(small_campaign(tmp_path)),
        "--run-dir", str(root), "--max-labels", "8", "-q",
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run directory: {root}" in done.stdout
    return root


@pytest.fixture
def copied_run(finished_run, tmp_path) -> Path:
    """A copy of the finished run, for tests that change it."""
    return Path(shutil.copytree(finished_run, tmp_path / "copy"))


def test_help_from_another_directory(tmp_path):
    listed = palflow("--help", cwd=tmp_path)
    assert listed.returncode == 0
    assert all(command in listed.stdout for command in ("run", "status", "report", "export"))
    run_help = palflow("run", "--help", cwd=tmp_path)
    assert run_help.returncode == 0 and run_help.stdout.startswith("usage: palflow run")
    assert "--max-labels" in run_help.stdout and "--resume" in run_help.stdout
    script = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "run.py"), "--help"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert script.returncode == 0 and script.stdout.startswith("usage: pipeline/run.py")


@pytest.mark.timeout(300)
def test_status_of_a_finished_run_matches_its_summary(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    facts = run_status_facts(finished_run)
    assert facts["campaign"] == "cli-test" == summary["campaign"]
    assert facts["state"] == "finished"
    assert facts["stop_reason"] == summary["stop_reason"] == "label budget of 8 reached"
    assert facts["labels"] == {
        "active": summary["labels"],
        "initial": summary["initial_labels"],
        "budget": 8,
    }
    assert facts["oracle_failures"]["by_kind"] == summary["oracle_failures_by_kind"]
    assert facts["oracle_failures"]["total"] == summary["oracle_failures"]
    assert facts["ensemble_versions"] == summary["versions"]
    assert facts["test_force_mae"] == summary["test_force_mae"][-1][2]
    assert facts["elapsed_s"] == summary["wall_s"]
    assert {m: n["finished"] for m, n in facts["tasks"].items()} == summary["tasks"]

    shown = palflow("status", str(finished_run))
    assert shown.returncode == 0, shown.stderr
    assert "finished: label budget of 8 reached" in shown.stdout
    assert f"{summary['labels']} of 8 active, {summary['initial_labels']} initial" in shown.stdout
    as_json = palflow("status", str(finished_run), "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == facts


@pytest.mark.timeout(300)
def test_status_while_a_coordinator_holds_the_run_reads_it_and_writes_nothing(copied_run):
    """Mid-run: no summary yet, a torn last event line; another process holds the lock."""
    (copied_run / "summary.json").unlink()
    with open(copied_run / "events.jsonl", "a") as events:
        events.write('{"task": 999, "kind": "lab')
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time; from palflow.pipeline.state.rundir import RunDirectory; "
            "run = RunDirectory(sys.argv[1]); run.lock(); print('locked', flush=True); "
            "time.sleep(120)",
            str(copied_run),
        ],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = files_and_times(copied_run)
        facts = run_status_facts(copied_run)
        shown = palflow("status", str(copied_run))
        after = files_and_times(copied_run)
    finally:
        holder.kill()
        holder.wait()
    assert after == before, "status wrote to the run directory"
    assert facts["state"] == "running" and facts["stop_reason"] is None
    assert facts["labels"]["active"] == 8 and facts["labels"]["initial"] == 8
    assert facts["elapsed_s"] > 0 and facts["ensemble_versions"] >= 1
    assert shown.returncode == 0, shown.stderr
    assert "state:             running" in shown.stdout
    assert shown.stderr == "", "a torn line mid-run is not worth a warning"


def test_status_of_a_new_and_of_a_killed_run(copied_run, tmp_path, capsys):
    fresh = RunDirectory.create(tmp_path / "fresh", {"name": "fresh", "stop": {"max_labels": 5}})
    before = files_and_times(fresh.root)
    facts = run_status_facts(fresh.root)
    assert files_and_times(fresh.root) == before, "status wrote to a new run"
    assert facts["state"] == "not started"
    assert facts["labels"] == {"active": 0, "initial": 0, "budget": 5}
    assert facts["elapsed_s"] is None and facts["tasks"] == {}
    assert exit_status(["status", str(fresh.root)]) == 0
    assert "not started" in capsys.readouterr().out

    (copied_run / "summary.json").unlink()  # killed: no summary, nobody holds the lock
    (copied_run / "state.json").write_text('{"elapsed_s": 3')  # torn
    facts = run_status_facts(copied_run)
    assert facts["state"] == "stopped early" and facts["labels"]["active"] == 8
    assert exit_status(["status", str(copied_run)]) == 0
    assert "stopped early (killed or crashed" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_report_builds_report_html(copied_run):
    (copied_run / "report.html").unlink()
    built = palflow("report", str(copied_run))
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == str(copied_run / "report.html")
    assert "<img" in (copied_run / "report.html").read_text()


@pytest.mark.timeout(300)
def test_export_writes_what_trainers_and_the_calculator_read(finished_run, tmp_path, capsys):
    from ase.io import read

    from palflow.apps.models.calculator import EnsembleCalculator

    before = files_and_times(finished_run)
    out = tmp_path / "exported"
    assert main(["export", str(finished_run), "--to", str(out)]) == 0
    assert files_and_times(finished_run) == before, "export wrote to the run directory"
    assert "labels.extxyz: 16 labels" in capsys.readouterr().out

    frames = read(out / "labels.extxyz", index=":")
    with RunDirectory(finished_run).labels() as database:
        rows = list(database.select())
    assert len(frames) == len(rows) == 16
    for atoms, row in zip(frames, rows, strict=True):
        assert atoms.info["REF_energy"] == pytest.approx(row.energy, abs=1e-8)
        assert np.allclose(atoms.arrays["REF_forces"], row.forces, atol=1e-7)
        assert atoms.get_potential_energy() == pytest.approx(row.energy, abs=1e-8)
        assert np.allclose(atoms.get_forces(), row.forces, atol=1e-7)
        assert np.allclose(atoms.positions, row.positions, atol=1e-7)
        assert atoms.info["config_type"] == row.source
        assert atoms.info["candidate_id"] == row.candidate_id
    assert {a.info["config_type"] for a in frames} == {"initial", "active"}

    newest = RunDirectory(finished_run).ensembles()[-1][0]
    calculator = EnsembleCalculator.from_checkpoint(out / "ensemble.pt", device="cpu")
    assert calculator.checkpoint_extra["version"] == newest
    probe = frames[0].copy()
    probe.calc = calculator
    assert np.isfinite(probe.get_potential_energy()) and np.isfinite(probe.get_forces()).all()
    assert "EnsembleCalculator.from_checkpoint" in (out / "README.txt").read_text()


@pytest.mark.timeout(300)
def test_export_writes_the_held_out_set_with_its_labels(finished_run, tmp_path):
    """``test.extxyz``: the run's held-out set (``data/test.npz``), with the label keys of
    ``labels.extxyz``; a SchNet run has no model files of its own format."""
    from ase.io import read

    from palflow.apps.data.dataset import read_dataset
    from palflow.pipeline.state.export import export_run

    run = RunDirectory(finished_run)
    held_out = read_dataset(run.test_set)
    assert len(held_out) == 8  # test.n_structures of the small campaign
    done = export_run(finished_run, tmp_path / "out")
    assert done["test_structures"] == 8
    assert done["test_file"] == str(tmp_path / "out" / "test.extxyz")
    assert done["model_files"] == []
    frames = read(done["test_file"], index=":")
    assert len(frames) == len(held_out)
    for atoms, expected in zip(frames, held_out, strict=True):
        energy, forces = expected.get_potential_energy(), expected.get_forces()
        assert atoms.info["REF_energy"] == pytest.approx(energy, abs=1e-8)
        assert np.allclose(atoms.arrays["REF_forces"], forces, atol=1e-7)
        assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-8)
        assert np.allclose(atoms.get_forces(), forces, atol=1e-7)
        assert np.allclose(atoms.positions, expected.positions, atol=1e-7)
        assert atoms.info["config_type"] == "test"
    readme = Path(done["readme_file"]).read_text()
    assert "test.extxyz\n  The run's held-out set: 8 structures" in readme
    assert "MACECalculator" not in readme and "member0" not in readme

    # A run without a held-out set (yet): no test file, and the README says so.
    copy = Path(shutil.copytree(finished_run, tmp_path / "copy"))
    (copy / "data" / "test.npz").unlink()
    done = export_run(copy, tmp_path / "out2")
    assert done["test_file"] is None and done["test_structures"] == 0
    assert not (tmp_path / "out2" / "test.extxyz").exists()
    assert "no held-out set (yet)" in Path(done["readme_file"]).read_text()


def test_export_reads_in_mace(finished_run, tmp_path):
    """MACE's own reader, with its default keys, when mace-torch is installed."""
    utils = pytest.importorskip("mace.data.utils", reason="mace-torch is not installed")
    from mace.tools import DefaultKeys

    assert main(["export", str(finished_run), "--to", str(tmp_path / "out")]) == 0
    keys = utils.KeySpecification()  # as mace_run_train builds it from its default options
    utils.update_keyspec_from_kwargs(keys, DefaultKeys.keydict())
    _, configs = utils.load_from_xyz(str(tmp_path / "out" / "labels.extxyz"), keys)
    with RunDirectory(finished_run).labels() as database:
        rows = list(database.select())
    assert len(configs) == len(rows) == 16
    for config, row in zip(configs, rows, strict=True):
        assert config.properties["energy"] == pytest.approx(row.energy, abs=1e-8)
        assert np.allclose(config.properties["forces"], row.forces, atol=1e-7)
        assert config.config_type == row.source


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "{empty}"],
        ["status", "{missing}"],
        ["report", "{empty}"],
        ["export", "{empty}", "--to", "{new}"],
        ["export", "{run}", "--to", "{full}"],
        ["export", "{unlabelled}", "--to", "{new}"],
    ],
    ids=["status-not-a-run", "status-missing", "report-not-a-run", "export-not-a-run",
         "export-to-a-full-folder", "export-no-labels"],
)  # fmt: skip
def test_bad_input_is_one_line_and_status_2(argv, finished_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    RunDirectory.create(tmp_path / "unlabelled", {"name": "unlabelled"})
    paths = {
        name: str(tmp_path / name) for name in ("empty", "missing", "new", "full", "unlabelled")
    }
    argv = [a.format(run=finished_run, **paths) for a in argv]
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("palflow: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "args",
    [[], ["nosuch"], ["export", "{run}"], ["run", "--site", "nosuch"], ["status", "{run}", "-x"]],
    ids=["no-command", "unknown-command", "export-without-to", "run-unknown-site", "status-x"],
)
def test_bad_command_lines_exit_2(args, finished_run, tmp_path):
    done = palflow(*[a.format(run=finished_run) for a in args], cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "error:" in done.stderr and not done.stdout


def test_a_task_whose_result_could_not_be_used_counts_once_as_failed():
    """Such a task writes two lines to events.jsonl (its result, then its failure)."""
    from palflow.pipeline.observe.status import tasks_by_module

    events = [
        {"task": 1, "module": "oracle", "kind": "label", "ok": True},
        {"task": 2, "module": "oracle", "kind": "label", "ok": True},
        {"task": 2, "module": "oracle", "kind": "label", "ok": False, "error": "unusable"},
        {"task": 3, "module": "train", "kind": "train", "ok": False},
    ]
    assert tasks_by_module(events) == {
        "oracle": {"finished": 2, "failed": 1},
        "train": {"finished": 1, "failed": 1},
    }
