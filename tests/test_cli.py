"""The command line: a short campaign end to end, and bad input refused with status 2."""

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


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: ["--site", "no-such-site"], "site 'no-such-site' not found"),
        (lambda d: ["--site", "threads.py", "--max-labels", "0"], "stop.max_labels"),
        (lambda d: ["--site", "threads.py", "--max-wall", "-5"], "stop.max_wall_s"),
        (lambda d: ["--site", "threads.py", "--campaign", str(d / "typo.toml")], "max_lables"),
        (
            lambda d: ["--site", "threads.py", "--campaign", str(d / "calc.toml")],
            "cannot import module 'no_such_code'",
        ),
        (
            lambda d: ["--site", "threads.py", "--campaign", str(d / "structure.toml")],
            "does not parse",
        ),
        (lambda d: ["--site", "threads.py", "--run-dir", str(d)], "exists and is not empty"),
    ],
    ids=["site", "labels", "wall", "key", "calculator", "structure", "run-dir"],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, make_args, message):
    (tmp_path / "typo.toml").write_text("[stop]\nmax_lables = 3\n")
    (tmp_path / "calc.toml").write_text('[oracle]\ncalculator = "no_such_code:Calc"\n')
    (tmp_path / "garbage.xyz").write_text("this is not\na structure file\n")
    (tmp_path / "structure.toml").write_text(f'[system]\nstructure = "{tmp_path}/garbage.xyz"\n')
    result = run_cli(*make_args(tmp_path), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
