"""The command line: a short campaign end to end; bad input refused with status 2 and
nothing created; any other failure status 1, its traceback in the run's log and a
one-line reason printed last."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = """
name = "cli-test"
[system]
structure = "{structure}"
[oracle]
calculator = "ase.calculators.emt:EMT"
kwargs = {{}}
[model]
n_features = 16
n_interactions = 2
n_rbf = 8
[training]
min_task_s = 0.0
epochs_per_task = 4
[generator]
steps_per_task = 40
n_walkers = 2
temperature_K = 800.0
timestep_fs = 2.0
[selection]
threshold = 0.02
[initial]
n_structures = 8
[test]
n_structures = 8
[stop]
max_labels = 12
max_wall_s = 200.0
final_training_s = 2.0
"""


def small_campaign(tmp_path: Path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text(SMALL.format(structure=ROOT / "examples" / "structures" / "cu13.xyz"))
    return path


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("site", ["threads.py", "laptop.py"])
def test_campaign_runs_end_to_end(tmp_path, site):
    run_dir = tmp_path / "run"
    result = run_cli(
        "--site",
        site,
        "--campaign",
        str(small_campaign(tmp_path)),
        "--run-dir",
        str(run_dir),
        "--max-labels",
        "10",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["labels"] == 10
    assert summary["stop_reason"] == "label budget of 10 reached"
    assert len(summary["test_force_mae"]) >= 1
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert {e["module"] for e in events} == {"oracle", "generator", "train", "infer"}
    assert (run_dir / "labels.db").exists() and (run_dir / "campaign.json").exists()
    assert (run_dir.stat().st_mode & 0o777) == 0o700
    assert "test force MAE" in result.stdout


class BrokenQuery:
    """A user's query with a bug that its trial call before the run (pipeline/config/trials.py)
    does not meet: the campaign that names it fails at its first real batch."""

    calls = 0

    def select(self, candidates, size, context):
        BrokenQuery.calls += 1
        if BrokenQuery.calls > 1:
            raise RuntimeError("bug in a user's query")
        return list(candidates[:size])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_campaigns_side_by_side_and_one_failing_leaves_the_other(tmp_path):
    good = small_campaign(tmp_path)
    broken = tmp_path / "broken.toml"
    broken.write_text(
        good.read_text()
        .replace('name = "cli-test"', 'name = "cli-broken"')
        .replace("[selection]", '[selection]\nquery = "tests.test_cli:BrokenQuery"')
    )
    parent = tmp_path / "runs"
    result = run_cli(
        "--site", "threads.py", "--campaign", str(good), "--campaign", str(broken),
        "--run-dir", str(parent),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    (good_run,) = parent.glob("cli-test-*-0")
    (broken_run,) = parent.glob("cli-broken-*-1")
    summary = json.loads((good_run / "summary.json").read_text())
    assert summary["labels"] == 12 and summary["stop_reason"] == "label budget of 12 reached"
    assert not (broken_run / "summary.json").exists()
    assert "RuntimeError: bug in a user's query" in (broken_run / "palflow.log").read_text()
    assert "bug in a user's query" not in (good_run / "palflow.log").read_text()
    assert "[cli-broken-1]" in result.stderr, "log lines name their campaign"
    assert "campaign cli-broken failed: RuntimeError: bug in a user's query" in result.stdout


# ------------------------------------------------------------------ exit statuses
def test_a_bug_in_the_coordinator_exits_1_with_its_traceback_in_the_run_log(
    tmp_path, monkeypatch, capsys
):
    """A programming error is no bad input: exit status 1, the traceback in the run's
    log (not on the console), and a one-line reason printed last."""
    from palflow.pipeline.engine.coordinator import Coordinator
    from palflow.pipeline.run import main

    def broken_run(self):
        raise TypeError("unsupported operand in the coordinator")

    monkeypatch.setattr(Coordinator, "run", broken_run)
    run_dir = tmp_path / "run"
    status = main(
        ["--site", "threads.py", "--campaign", str(small_campaign(tmp_path)),
         "--run-dir", str(run_dir)]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 1
    log = (run_dir / "palflow.log").read_text()
    assert "Traceback (most recent call last)" in log and "in broken_run" in log
    assert "TypeError: unsupported operand in the coordinator" in log
    assert "Traceback" not in err + out
    last = out.strip().splitlines()[-1]
    assert last == (
        "campaign cli-test failed: TypeError: unsupported operand in the coordinator "
        f"(traceback in {run_dir / 'palflow.log'})"
    )
    # The status and the final report say the same, though no summary was written.
    from palflow.pipeline.observe.status import run_status_facts

    reason = last.removeprefix("campaign cli-test failed: ")
    facts = run_status_facts(run_dir)
    assert (facts["state"], facts["stop_reason"]) == ("failed", reason)
    html = (run_dir / "report.html").read_text()
    assert "<tr><th>status</th><td>failed</td></tr>" in html
    assert "TypeError: unsupported operand in the coordinator" in html


def test_a_bug_before_the_run_exits_1_not_2(tmp_path, monkeypatch, capsys, caplog):
    """A TypeError in the pre-flight is palflow's bug, not the user's input: status 1,
    the traceback on stderr (no run directory yet), the one-line reason last."""
    from palflow.pipeline.config import preflight
    from palflow.pipeline.run import main

    def broken_check(campaign):
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr(preflight, "check_settings", broken_check)
    status = main(
        ["--site", "threads.py", "--campaign", str(small_campaign(tmp_path)),
         "--run-dir", str(tmp_path / "run")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1
    # On stderr (here, pytest's log capture): no run directory exists to hold it.
    assert "Traceback (most recent call last)" in caplog.text and "in broken_check" in caplog.text
    assert err.strip().splitlines()[-1] == (
        "palflow: failed: TypeError: 'NoneType' object is not subscriptable"
    )
    assert not (tmp_path / "run").exists()


def test_bad_input_exits_2_with_nothing_created(tmp_path, capsys):
    """An input error (here a calculator that does not import) is refused before
    anything exists: status 2 and one line naming it, no traceback."""
    from palflow.pipeline.run import main

    campaign = small_campaign(tmp_path)
    campaign.write_text(campaign.read_text().replace("ase.calculators.emt:EMT", "no_such:Calc"))
    before = set(tmp_path.iterdir())
    status = main(
        ["--site", "threads.py", "--campaign", str(campaign), "--run-dir", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().splitlines() == [
        f"palflow: error: {campaign}: oracle.calculator = 'no_such:Calc': cannot import module "
        "'no_such' of 'no_such:Calc': No module named 'no_such'"
    ]
    assert set(tmp_path.iterdir()) == before
