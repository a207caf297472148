"""Each benchmark script runs on tiny settings and writes its JSON (speed is not tested)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(tmp_path, script, *args, timeout=300, env=None):
    environment = {**os.environ, "PALFLOW_BENCH_OUT": str(tmp_path), **(env or {})}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=environment,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_batched_ensemble(tmp_path):
    out = run_benchmark(tmp_path, "batched_ensemble.py", "--repeat", "3")
    assert "K=4 batched / K=1" in out
    rows = json.loads((tmp_path / "batched_ensemble.json").read_text())
    assert {r["variant"] for r in rows} >= {"K=1", "K=4 batched", "W=32 together"}
    tasks = [r for r in rows if "task_walkers" in r]
    assert [r["task_walkers"] for r in tasks] == [1, 4, 8]
    assert all(r["s_per_walker_segment_together"] > 0 for r in tasks)
    assert (tmp_path / "batched_ensemble.png").stat().st_size > 0


@pytest.mark.timeout(300)
def test_coordinator_overhead(tmp_path):
    run_benchmark(
        tmp_path,
        "coordinator_overhead.py",
        "--tasks",
        "40",
        "--in-flight",
        "8",
        "--executors",
        "threads",
    )
    result = json.loads((tmp_path / "coordinator_overhead.json").read_text())
    (row,) = result["rows"]
    assert row["tasks"] == 40 and row["throughput_ratio"] > 0
    assert_provenance(result, tasks=40)


def assert_provenance(result: dict, **options) -> None:
    """The results record their options, commit and the load before and after."""
    protocol = result["protocol"]
    assert options.items() <= protocol["options"].items()
    assert len(protocol["commit"]) >= 40
    assert len(protocol["load_average_before"]) == 3 and len(result["load_average_after"]) == 3


@pytest.mark.timeout(300)
def test_site_startup_and_campaign(tmp_path):
    run_benchmark(tmp_path, "site_startup.py", "threads.py", "--repeat", "1")
    assert json.loads((tmp_path / "site_startup.json").read_text())[0]["site"] == "threads.py"
    run_benchmark(tmp_path, "site_campaign.py", "threads.py", "--repeat", "1")
    (row,) = json.loads((tmp_path / "site_campaign.json").read_text())
    assert row["runs"][0]["labels"] == 40


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_robustness(tmp_path):
    out = run_benchmark(
        tmp_path,
        "robustness.py",
        "--kills",
        "1",
        "--labels",
        "12",
        "--fault-rate",
        "0.3",
        timeout=540,
    )
    result = json.loads((tmp_path / "robustness.json").read_text())
    assert result["kills"]["lost"] == 0 and result["kills"]["duplicates"] == 0
    assert result["faults"]["bad_labels_stored"] == 0
    assert "kills survived" in out


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_mpi_oracle(tmp_path):
    need(
        "mpi",
        shutil.which("nwchem") is not None and shutil.which("mpiexec") is not None,
        "nwchem or mpiexec is not installed",
    )
    run_benchmark(tmp_path, "mpi_oracle.py", "--repeat", "1", "--batch", "1")
    rows = json.loads((tmp_path / "mpi_oracle.json").read_text())
    assert [r["ranks"] for r in rows] == [1, 2]


@pytest.mark.timeout(400)
def test_overlap(tmp_path):
    out = run_benchmark(
        tmp_path,
        "overlap.py",
        "--iterations",
        "1",
        "--sites",
        "threads",
        "--cases",
        "2: t_train >> t_oracle, t_gen",
        timeout=360,
    )
    result = json.loads((tmp_path / "overlap.json").read_text())
    (row,) = result["rows"]
    assert_provenance(result, iterations=1)
    assert {"ideal_speedup", "measured_speedup", "measured_over_ideal"} <= set(row)
    assert set(row["measured_phase_s"]) == {"label", "train", "generate"}
    assert row["phase_ideal_speedup"] >= 1
    assert row["measured_over_phase_ideal"] == pytest.approx(
        row["measured_speedup"] / row["phase_ideal_speedup"]
    )
    assert row["serial_wall_s"] > 0 and row["streaming_wall_s"] > 0
    assert "measured/ideal" in out
    # Streaming's period against its own bottleneck task (PAL's model, its own times)
    own = row["streaming_task_s"]
    period = {"oracle": own["oracle"], "train": own["train"], "generator": own["generator"]}
    assert row["streaming_bottleneck"] == max(period, key=period.get)
    assert row["streaming_period_over_bottleneck"] == pytest.approx(
        row["streaming_wall_s"] / max(period.values())
    )
    # The rows can be derived again from the saved runs, unchanged
    saved = tmp_path / "saved.json"
    (tmp_path / "overlap.json").rename(saved)
    out = run_benchmark(tmp_path, "overlap.py", "--reanalyse", str(saved))
    (again,) = json.loads((tmp_path / "overlap.json").read_text())["rows"]
    assert again == row
    assert "streaming period / its" in out


@pytest.mark.timeout(400)
def test_remote_oracle(tmp_path):
    out = run_benchmark(
        tmp_path,
        "remote_oracle.py",
        "--campaign",
        "benchmarks/short_cu13.toml",
        "--site",
        "threads.py",
        "--seeds",
        "0",
        "--ratios",
        "1",
        "--labels",
        "8",
        "--test-structures",
        "4",
        "--train-task-s",
        "0.3",
        "--target",
        "5.0",
        timeout=360,
    )
    result = json.loads((tmp_path / "remote_oracle.json").read_text())
    loops = {("streaming", 1), ("serial", 1), ("serial_one_task", 1)}
    assert {(r["loop"], r["ratio"]) for r in result["runs"]} == loops
    # The protocol names the loops that ran (unpaced ran at no ratio), the wall limit
    # and the held-out set; seed 0 at the first ratio runs them in their own order
    protocol = result["protocol"]
    assert protocol["loops"] == ["streaming", "serial", "serial_one_task"]
    assert protocol["max_wall_s"] > 0 and protocol["held_out"].startswith("4 frames")
    assert [r["loop"] for r in result["runs"]] == protocol["loops"]
    assert all(r["labels"] == 8 and r["curve"] for r in result["runs"])
    # The oracle's set cost was spent: each label waits 0.15 s (0.6 s a full batch of 4).
    assert all(r["task_s"]["oracle"] >= 0.15 for r in result["runs"])
    point = result["points"]["1"]
    assert point["serial"]["reached"] == point["streaming"]["reached"] == 1
    stronger = point["stronger_serial"]
    assert stronger in ("serial", "serial_one_task")
    times = {loop: point[loop]["median_wall_to_target_s"] for loop in ("streaming", stronger)}
    comparison = point["streaming_over_stronger"]
    assert comparison == point[f"streaming_over_{stronger}"]
    assert comparison["time"]["median"] == pytest.approx(times["streaming"] / times[stronger])
    assert result["primary"]["ratio"] == "1" and result["primary"]["median"] > 0
    assert point["oracle_concurrency"] >= 1
    assert all(r["phase_s"]["train"] > 0 for r in result["runs"] if r["loop"] != "streaming")
    assert comparison["time"]["seeds"] == comparison["area"]["seeds"] == 1
    assert comparison["area"]["median"] > 0
    assert result["protocol"]["target"] == 5.0 and result["status"] == "finished"
    assert 0 < point["pal_ideal_ratio"] <= 1
    assert "streaming/stronger area" in out
    assert (tmp_path / "remote_oracle.png").stat().st_size > 0


@pytest.mark.timeout(600)
def test_time_to_accuracy(tmp_path):
    out = run_benchmark(
        tmp_path,
        "time_to_accuracy.py",
        "--target",
        "5.0",
        "--campaign",
        "benchmarks/short_cu13.toml",
        "--site",
        "threads.py",
        "--seeds",
        "0",
        "--labels",
        "8",
        "--test-structures",
        "4",
        timeout=540,
    )
    result = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert {r["variant"] for r in result["runs"]} == {"streaming", "serial", "random", "unpaced"}
    assert all(r["labels"] == 8 and r["curve"] for r in result["runs"])
    # The default target is one the typical run of every variant reaches.
    assert all(row["reached"] == 1 for row in result["table"].values())
    serial = result["table"]["serial"]["streaming_over_this"]
    assert set(serial) == {"area_wall_s", "area_labels", "wall_to_target", "labels_to_target"}
    assert serial["area_wall_s"]["seeds"] == 1 and serial["area_wall_s"]["median"] > 0
    assert result["primary"] == serial["area_wall_s"]
    assert "streaming_over_this" not in result["table"]["streaming"]
    assert result["protocol"]["target"] == 5.0
    assert "target test force MAE 5.0000" in out
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 0


@pytest.mark.timeout(300)
def test_batched_ensemble_mace(tmp_path):
    out = run_benchmark(
        tmp_path,
        "batched_ensemble.py",
        "--model",
        "mace",
        "--repeat",
        "1",
        "--dtype",
        "float32",
        "float64",
        timeout=240,
    )
    assert "K=4 batched / four separate" in out
    result = json.loads((tmp_path / "batched_ensemble_mace.json").read_text())
    assert set(result["specs"]) == {"float32", "float64"}
    cells = {(r["dtype"], r["members"], r["walkers"], r["mode"]) for r in result["rows"]}
    assert ("float64", 4, 8, "separate") in cells and ("float32", 1, 1, "batched") in cells
    assert len(cells) == 2 * 2 * 5  # dtypes, walkers, K=1 and K=4, 8 both ways
    assert all(r["ms"] > 0 for r in result["rows"])
    assert all(s["K4_batched_over_separate"] > 0 for s in result["summary"])
    assert (tmp_path / "batched_ensemble_mace.png").stat().st_size > 0
    assert not (tmp_path / "batched_ensemble.json").exists()  # SchNet's file stays


SMALL_CAMPAIGN = """
[training]
epochs_per_task = 2
min_task_s = 0.2

[generator]
n_walkers = 2
steps_per_task = 20

[initial]
n_structures = 8
"""
"""Ethanol with GFN2-xTB as in the default campaign, less of everything."""


@pytest.mark.slow
@pytest.mark.xtb
@pytest.mark.timeout(420)
def test_models(tmp_path, require_xtb):
    schnet, mace = tmp_path / "schnet.toml", tmp_path / "mace.toml"
    schnet.write_text("[model]\nn_features = 16\n" + SMALL_CAMPAIGN)
    mace.write_text('[model]\nname = "mace"\nnum_channels = 8\nmax_L = 0\n' + SMALL_CAMPAIGN)
    out = run_benchmark(
        tmp_path,
        "models.py",
        "--campaign",
        str(schnet),
        "--mace-campaign",
        str(mace),
        "--site",
        "threads.py",
        "--seeds",
        "10",
        "--labels",
        "8",
        "--max-wall",
        "20",
        "--test-structures",
        "4",
        "--at",
        "4",
        "8",
        "--finetune",
        "--foundation-structures",
        "8",
        "--foundation-epochs",
        "2",
        timeout=400,
    )
    result = json.loads((tmp_path / "models.json").read_text())
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == [
        ("schnet", 10),
        ("mace", 10),
        ("finetune", 10),
    ]
    assert all(r["curve"] for r in result["runs"])
    for row in result["table"].values():
        assert {"force_mae_at_4", "energy_mae_at_8", "final_force_mae", "wall_s"} <= set(row)
        assert {"learning_curve_area", "final_uncertainty_spearman", "energy_increases"} <= set(row)
        assert row["final_force_mae"]["min"] <= row["final_force_mae"]["max"]
    assert result["mace_over_schnet_final_force_mae"] > 0
    tuned = result["finetune"]
    assert tuned["target_force_mae"] == result["protocol"]["finetune_target_force_mae"] == 0.14
    assert tuned["area"]["seeds"] == 1 and "0.08" in tuned["at_other_targets"]
    assert tuned["foundation_labels"] == result["foundation"]["labels"] == 5  # 1 per molecule
    for key in ("without_foundation_labels", "with_foundation_labels"):
        assert tuned[key]["seeds"] == 1 and set(tuned[key]["reached"]) == {"mine", "theirs"}
    foundation = result["foundation"]
    assert foundation["path"].startswith("WORK/") and foundation["path"].endswith(".model")
    assert "CH3CH2OH" not in foundation["molecules"] and len(foundation["sha256"]) == 64
    assert foundation["oracle"]["method"] != foundation["target_oracle"].get("method")
    assert "MACE / SchNet final test force MAE" in out
    assert (tmp_path / "models.png").stat().st_size > 0
    # The saved runs analyse again without running anything.
    again = run_benchmark(tmp_path, "models.py", "--reanalyse", str(tmp_path / "models.json"))
    assert "final_force_mae" in again
