"""benchmarks/stability.py's quick protocol: both sides run, the before side on the old code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "664585e"


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_protocol_runs_both_sides_on_their_own_code(tmp_path):
    commit = git("rev-parse", "--verify", f"{BEFORE}^{{commit}}")
    need("git", commit.returncode == 0, f"commit {BEFORE} is not in this clone's history")
    work = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stability.py"), "--quick", "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
        env={**os.environ, "PALFLOW_BENCH_OUT": str(tmp_path)},
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "stability.json").read_text())
    assert (tmp_path / "stability.png").stat().st_size > 0
    # The worktree of the old commit is gone, and nothing names this machine's paths.
    assert str(work) not in git("worktree", "list").stdout
    assert str(work) not in json.dumps(result)

    sides = result["sides"]
    assert sides["before"]["commit"] == commit.stdout.strip()
    assert sides["after"]["commit"] == git("rev-parse", "HEAD").stdout.strip()
    assert sides["before"]["code_sha1"] != sides["after"]["code_sha1"]

    runs = {run["side"]: run for run in result["runs"]}
    assert sorted(runs) == ["after", "before"] and len(result["runs"]) == 2
    expected = {"before": "before worktree", "after": "this checkout"}
    for side, run in runs.items():
        assert run["ok"], run.get("error")
        assert (run["campaign"], run["seed"]) == ("cu_emt", 0)
        # Every Python process of the run (coordinator, interchanges, workers, the
        # energy evaluation) imported its own side's palflow.
        assert run["code"]["imported"] == [expected[side]]
        assert run["code"]["processes"] >= 4
        assert run["n_versions"] >= 1 and run["train_finished"] >= 1
        assert 0 <= run["publication_rate"] <= 1
        assert 0 <= run["regression_share"] <= 1 and run["last_over_best"] >= 1
        last = run["curve"][-1]
        assert run["evaluated_version"] == last["version"]
        # The energy evaluation read the last version and the run's held-out set.
        assert run["evaluated_energy_mae_per_atom"] == pytest.approx(
            last["energy_mae_per_atom"], rel=1e-3
        )
        assert run["final_energy_mae_per_atom_offset_removed"] >= 0
    # Old runs' training events carry no publication verdict; the gated ones do.
    assert not runs["before"]["events_record_published"]
    assert runs["after"]["events_record_published"]

    table = result["campaigns"]["cu_emt"]
    for side in ("before", "after"):
        assert table[side]["runs"] == 1 and not table[side]["failed"]
        assert table[side]["per_seed"]["final_force_mae"]["0"] == runs[side]["final_force_mae"]
    for goal in ("regressions", "last_version", "energy", "publication"):
        assert result["goals"][goal]["campaigns"]["cu_emt"]["pass"] in (True, False)
    assert result["goals"]["accuracy_per_time"]["pass"] is None  # the default campaign not run
