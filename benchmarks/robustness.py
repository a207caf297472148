"""Robustness, counted: kills survived, faults injected and handled, resume cost.

    python benchmarks/robustness.py --kills 5 --fault-rate 0.3

1. Runs ``benchmarks/short_cu13.toml`` on the thread-pool site, kills the
   coordinator with SIGKILL at random moments and resumes it each time; counts
   labels lost and stored twice, and the seconds from a resumed process's start to
   its first new task.
2. Runs the same campaign with an oracle that fails at ``--fault-rate`` in all six
   ways (``apps.fault_injection``), and counts the faults by kind: retried, recorded for
   good, and bad labels that reached ``labels.db`` (checked against EMT).

Writes ``benchmarks/results/robustness.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Tests point this elsewhere, so that tiny runs never overwrite the measured results.
RESULTS = Path(os.environ.get("PALFLOW_BENCH_OUT", ROOT / "benchmarks" / "results"))
sys.path.insert(0, str(ROOT))
CAMPAIGN = ROOT / "benchmarks" / "short_cu13.toml"
RUN = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--site", "threads.py", "--quiet"]


def kills(n_kills: int, labels: int, seed: int) -> dict:

    from pipeline.journal import labelled_ids_in_results
    from pipeline.rundir import SUMMARY_FILE, RunDirectory

    run_dir = Path(tempfile.mkdtemp(prefix="palflow-kills-")) / "run"
    rng = random.Random(seed)
    process = subprocess.Popen(
        [*RUN, "--campaign", str(CAMPAIGN), "--run-dir", str(run_dir), "--max-labels", str(labels)]
    )
    done = 0
    while done < n_kills:
        # The first kill comes once the run exists (its campaign.json), so that every
        # later session resumes a run rather than one that was never made.
        while done == 0 and not (run_dir / "campaign.json").exists():
            if process.poll() is not None:
                break
            time.sleep(0.1)
        time.sleep(rng.uniform(2.0, 6.0))
        if process.poll() is not None:
            break
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        done += 1
        process = subprocess.Popen([*RUN, "--resume", str(run_dir)])
    process.wait()
    run = RunDirectory(run_dir)
    summary = run.read_json(SUMMARY_FILE)
    stored = [row.candidate_id for row in run.labels().select()]
    resumes = [r["seconds_to_first_task"] for r in summary["resumes"]]
    return {
        "kills": done,
        "labels": summary["labels"],
        "budget": labels,
        "duplicates": len(stored) - len(set(stored)),
        "lost": len(labelled_ids_in_results(RunDirectory(run_dir)) - set(stored)),
        "resume_to_first_task_s_median": statistics.median(resumes) if resumes else None,
        "resume_to_first_task_s_max": max(resumes) if resumes else None,
        "exit_code": process.returncode,
    }


def faults(rate: float, labels: int) -> dict:
    from ase.calculators.emt import EMT
    from ase.db import connect
    from ase.io import write

    from apps.contracts import MODULES, FailureKind, failure_counts
    from pipeline.campaign_state import load_start_structure
    from pipeline.coordinator import Apps, Coordinator
    from pipeline.rundir import RunDirectory
    from pipeline.settings import load_campaign

    work = Path(tempfile.mkdtemp(prefix="palflow-faults-"))
    start = load_start_structure(str(ROOT / "examples" / "structures" / "cu13.xyz"))
    held_out = []
    for seed in range(8):
        frame = start.copy()
        frame.rattle(0.1, seed=seed)
        frame.calc = EMT()
        frame.get_forces()
        held_out.append(frame)
    write(work / "held_out.extxyz", held_out)
    campaign = load_campaign(
        CAMPAIGN,
        stop__max_labels=labels,
        test__file=str(work / "held_out.extxyz"),
        oracle__calculator="apps.fault_injection:FaultyCalculator",
        oracle__kwargs={
            "rate": rate,
            "hang_s": 120,
            "kinds": ["exception", "hang", "nan", "absurd", "crash", "scf"],
        },
        oracle__timeout_s=2.0,
        oracle__max_attempts=3,
    )
    run = RunDirectory.create(work / "run")
    slots = {"oracle": 2, "generator": 2, "train": 2, "infer": 1}
    executors = {m: ThreadPoolExecutor(slots[m]) for m in MODULES}
    summary = Coordinator(campaign, run, Apps.from_executors(executors), slots, start).run()
    for executor in executors.values():
        executor.shutdown(wait=True, cancel_futures=True)
    injected: Counter[str] = Counter()
    for _, _, path in run.oracle_batches():
        with np.load(path) as data:
            injected.update(failure_counts(str(s) for s in data["status"] if s != "ok"))
    bad = 0
    for row in connect(run.labels_db).select():
        atoms = row.toatoms()
        reference = atoms.copy()
        reference.calc = EMT()
        bad += not np.allclose(atoms.get_forces(), reference.get_forces(), atol=1e-8)
    return {
        "rate": rate,
        "labels": summary["labels"],
        "budget": labels,
        "stop_reason": summary["stop_reason"],
        "faults_by_kind": dict(injected),
        "retried_by_kind": summary["oracle_retries_by_kind"],
        "recorded_by_kind": summary["oracle_failures_by_kind"],
        "deterministic_kinds_retried": sorted(
            {k for k in summary["oracle_retries_by_kind"] if not FailureKind(k).transient}
        ),
        "bad_labels_stored": bad,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--labels", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    result = {
        "kills": kills(args.kills, args.labels, args.seed),
        "faults": faults(args.fault_rate, args.labels),
    }
    k, f = result["kills"], result["faults"]
    print(
        f"kills survived {k['kills']}; labels {k['labels']}/{k['budget']}; lost {k['lost']}; "
        f"duplicates {k['duplicates']}; resume to first task median "
        f"{k['resume_to_first_task_s_median']:.2f} s, max {k['resume_to_first_task_s_max']:.2f} s"
    )
    print(
        f"faults at rate {f['rate']}: labels {f['labels']}/{f['budget']}; "
        f"bad labels stored {f['bad_labels_stored']}"
    )
    print(f"{'kind':<14}{'injected':>9}{'retried':>9}{'recorded':>10}")
    for kind in sorted(f["faults_by_kind"]):
        print(
            f"{kind:<14}{f['faults_by_kind'][kind]:>9}{f['retried_by_kind'].get(kind, 0):>9}"
            f"{f['recorded_by_kind'].get(kind, 0):>10}"
        )
    out = RESULTS / "robustness.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
