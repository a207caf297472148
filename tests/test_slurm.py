"""A short campaign on a real Slurm cluster, through local_slurm.py's pilot jobs."""

import json
import subprocess
from collections import defaultdict

import pytest

from tests.test_cli import run_cli, small_campaign

pytestmark = pytest.mark.slurm


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_campaign_runs_in_slurm_pilot_jobs(tmp_path, slurm_cluster):
    run_dir = tmp_path / "run"
    result = run_cli(
        "--site",
        "local_slurm.py",
        "--campaign",
        str(small_campaign(tmp_path)),
        "--run-dir",
        str(run_dir),
        "--max-labels",
        "8",
        timeout=540,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["labels"] == 8

    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    placement = defaultdict(set)
    for event in events:
        if event["ok"]:
            assert event["slurm_job_id"], f"{event['kind']} task ran outside Slurm"
            placement[event["module"]].add((event["slurm_partition"], event["slurm_job_id"]))
    partitions = {module: {p for p, _ in jobs} for module, jobs in placement.items()}
    assert partitions == {
        "oracle": {"cpu"},
        "generator": {"cpu"},
        "train": {"gpu"},
        "infer": {"gpu"},
    }
    # Each module had its own pilot job.
    job_ids = [job for jobs in placement.values() for _, job in jobs]
    assert len(set(job_ids)) == len(job_ids) == 4

    # The pilot jobs went through sbatch, with the partitions the site asks for.
    scripts = [
        p
        for p in (run_dir / "parsl").rglob("submit_scripts/parsl.*.block-*")
        if p.suffix not in (".stdout", ".stderr")
    ]
    assert len(scripts) == 4
    texts = [s.read_text() for s in scripts]
    assert sum("#SBATCH --partition=gpu" in t for t in texts) == 2
    assert sum("#SBATCH --partition=cpu" in t for t in texts) == 2
    # Parsl cancelled its blocks at shutdown: none of the run's jobs is left queued.
    queued = subprocess.run(
        ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert not set(job_ids) & set(queued)


def slurm_jobs(name_part: str) -> list[str]:
    listing = subprocess.run(
        ["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    return [line.split()[0] for line in listing if name_part in line]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_cancelled_pilot_job_loses_no_task(tmp_path, slurm_cluster):
    """scancel the training block mid-run: its task runs again on a new block."""
    import time

    from tests.test_resume import start_cli

    run_dir = tmp_path / "run"
    process = start_cli(
        "--site",
        "local_slurm.py",
        "--campaign",
        str(small_campaign(tmp_path)),
        "--run-dir",
        str(run_dir),
        "--max-labels",
        "30",
        "--quiet",
    )
    events_path = run_dir / "events.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if events_path.exists() and '"kind": "train"' in events_path.read_text():
            break
        time.sleep(0.5)
    cancelled = slurm_jobs("parsl.train")
    assert cancelled, "no training pilot job to cancel"
    subprocess.run(["scancel", *cancelled], check=True)
    output = process.communicate(timeout=500)[0].decode()
    assert process.returncode == 0, output[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["labels"] == 30
    events = [json.loads(x) for x in events_path.read_text().splitlines()]
    train_jobs = {e["slurm_job_id"] for e in events if e["module"] == "train" and e["ok"]}
    assert set(cancelled) < train_jobs, "training went on in a new pilot job"
    assert not [e for e in events if not e["ok"]], "no task was lost"
