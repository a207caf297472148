"""Robustness, counted: kills survived, faults injected and handled, resume cost.

    python benchmarks/robustness.py --kills 5 --fault-rate 0.3

1. Runs ``benchmarks/short_cu13.toml`` on the thread-pool site, kills the
   coordinator with SIGKILL at random moments and resumes it each time; counts
   labels lost and stored twice, and the seconds from a resumed process's start to
   its first new task.
2. Runs the same campaign with an oracle that fails at ``--fault-rate`` in all six
   ways (``palflow.apps.oracles.fault_injection``), and counts the faults by kind:
   retried, recorded for good, and bad labels that reached ``labels.db`` (checked
   against EMT).

3. With ``--corrupt``, instead: kills the coordinator as in 1, and between a kill
   and its resume damages one run file (truncated, garbage or deleted, in turn:
   labels.db, state.json, the queue, the newest oracle output and input, the start
   structure, the newest member checkpoint and ensemble version, events.jsonl, the
   label log's rows and atoms; 11 kills reach every kind).
   Counts labels lost (stored before the damage, missing at the end; goal 0) and
   resumes that ended clearly: mended with a warning, or stopped with one message
   and exit status 2 (goal: all; the file is then put back and the run resumed).

    python benchmarks/robustness.py --corrupt --kills 11 --labels 44

Writes ``benchmarks/results/robustness.json`` (``robustness_corrupt.json`` with
``--corrupt``).
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common
import numpy as np
from common import ROOT, cell

CAMPAIGN = common.BENCHMARKS / "short_cu13.toml"
RUN = [*common.palflow_run("threads.py"), "--quiet"]


def kills(n_kills: int, labels: int, seed: int) -> dict:

    from palflow.pipeline.resume.journal import labelled_ids_in_results
    from palflow.pipeline.state.rundir import SUMMARY_FILE, RunDirectory

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


DAMAGES = [
    ("labels.db", "labels.db"),
    ("state.json", "state.json"),
    ("state.queue.npz", "state.queue.npz"),
    ("oracle output", "oracle/batch*.out.npz"),
    ("oracle input", "oracle/batch*.in.npz"),
    ("start structure", "system/start.extxyz"),
    ("member checkpoint", "models/member*.pt"),
    ("ensemble version", "models/ensemble.v*.pt"),
    ("events.jsonl", "events.jsonl"),
    ("label log rows", "data/labels/frames.bin"),
    ("label log atoms", "data/labels/atoms.bin"),
]
WAYS = ("truncate", "garbage", "delete")


def damage_one(run_dir: Path, turn: int, rng: random.Random) -> dict:
    """Damage the turn-th file kind of :data:`DAMAGES` that exists (its newest file);
    returns the kind, the way, the path and the bytes it held."""
    for k in range(len(DAMAGES)):
        kind, pattern = DAMAGES[(turn + k) % len(DAMAGES)]
        found = sorted(run_dir.glob(pattern))
        if found:
            break
    path = found[-1]
    how = WAYS[(turn + rng.randrange(len(WAYS))) % len(WAYS)]
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(rng.randbytes(max(len(data), 256)))
    else:
        path.unlink()
    return {"file": kind, "how": how, "path": path, "data": data}


def outcome_of(logs: list[Path], exit_code: int | None, name: str = "") -> str:
    """How the sessions after a damage met it: mended (a warning naming the file),
    named (one message, exit status 2), quiet (nothing to mend), or not clearly (a
    traceback, another exit status)."""
    text = "".join(log.read_text() for log in logs)
    if exit_code == 2:
        errors = [line for line in text.splitlines() if line.startswith("palflow: error:")]
        return "named" if len(errors) == 1 and "Traceback" not in text else "unclear exit 2"
    if "Traceback" in text:
        return "traceback"
    if any("resume mends the run" in line and name in line for line in text.splitlines()):
        return "mended"
    return "quiet" if exit_code in (0, -signal.SIGKILL) else f"exit {exit_code}"


def corrupt(n_kills: int, labels: int, seed: int) -> dict:
    """Kill, damage one file, resume; as :func:`kills`, with the damage between."""
    from palflow.pipeline.resume.journal import labelled_ids_in_results
    from palflow.pipeline.state.rundir import RunDirectory

    work = Path(tempfile.mkdtemp(prefix="palflow-corrupt-"))
    run_dir, rng = work / "run", random.Random(seed)
    names = iter(work / f"session{i}.log" for i in range(10_000))

    def start(*args: str) -> tuple[subprocess.Popen, Path]:
        log = next(names)
        with open(log, "w") as handle:
            return subprocess.Popen([*RUN, *args], stdout=handle, stderr=subprocess.STDOUT), log

    def stored() -> set[int]:
        try:
            return {row.candidate_id for row in RunDirectory(run_dir).labels().select()}
        except Exception:  # missing or damaged: what was read before counts
            return set()

    def held_or_ended(process: subprocess.Popen) -> None:
        while process.poll() is None and not RunDirectory(run_dir).is_locked():
            time.sleep(0.1)

    process, log = start(
        "--campaign", str(CAMPAIGN), "--run-dir", str(run_dir), "--max-labels", str(labels)
    )
    seen: set[int] = set()
    damages: list[dict] = []
    logs: list[Path] = []  # of every resumed session, in order
    while True:
        held_or_ended(process)  # killed only once it holds the run (and mends it)
        if len(damages) < n_kills:
            time.sleep(rng.uniform(2.0, 6.0))
        else:
            process.wait()  # the last damage: let the run finish
        if process.poll() is not None and process.returncode == 2 and damages:
            damages[-1]["outcome"] = outcome_of(logs[damages[-1]["from"] :], 2)
            damages[-1]["path"].write_bytes(damages[-1]["data"])  # put back, and go on
            process, log = start("--resume", str(run_dir))
            logs.append(log)
            continue
        if process.poll() is not None:
            break  # finished (or failed, which the outcome says)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        seen |= stored()
        damages.append({**damage_one(run_dir, len(damages), rng), "from": len(logs)})
        process, log = start("--resume", str(run_dir))
        logs.append(log)
    for damage in damages:
        if "outcome" not in damage:
            # A session killed before its mend leaves it to the next one: every
            # session from the damage on is read for the file's name.
            damage["outcome"] = outcome_of(logs[damage["from"] :], process.returncode,
                                           damage["path"].name)  # fmt: skip
        text = "".join(log.read_text() for log in logs[damage.pop("from") :])
        said = [line for line in text.splitlines() if damage["path"].name in line]
        # The run's own path is this machine's business, not the results file's.
        message = said[0].split(": ", 1)[-1].replace(f"{run_dir}{os.sep}", "RUN/") if said else None
        damage["message"] = message[:300] if message else None
        damage.pop("data")
        damage["path"] = str(damage["path"].relative_to(run_dir))
    ids = [row.candidate_id for row in RunDirectory(run_dir).labels().select()]
    final = set(ids)
    clear = [d for d in damages if d["outcome"] in ("mended", "named", "quiet")]
    return {
        "kills": len(damages),
        "labels_stored": len(final),
        "budget": labels,
        "labels_lost": len(seen - final),
        "duplicates": len(ids) - len(final),
        "labels_computed_not_stored": len(labelled_ids_in_results(RunDirectory(run_dir)) - final),
        "damages": damages,
        "ended_clearly": len(clear),
        "exit_code": process.returncode,
    }


def faults(rate: float, labels: int) -> dict:
    from ase.calculators.emt import EMT
    from ase.db import connect
    from ase.io import write

    from palflow.apps.contracts import MODULES, FailureKind, failure_counts
    from palflow.pipeline.config.settings import load_campaign
    from palflow.pipeline.engine.coordinator import Apps, Coordinator
    from palflow.pipeline.state.rundir import RunDirectory
    from palflow.pipeline.state.structures import load_start_structure

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
        oracle__calculator="palflow.apps.oracles.fault_injection:FaultyCalculator",
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
    parser = common.parser(__doc__)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--labels", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--corrupt", action="store_true", help="damage one run file between kills (only)"
    )
    args = parser.parse_args()
    if args.corrupt:
        return report_corrupt(corrupt(args.kills, args.labels, args.seed))
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
    kinds = [
        {
            "kind": kind,
            "injected": f["faults_by_kind"][kind],
            "retried": f["retried_by_kind"].get(kind, 0),
            "recorded": f["recorded_by_kind"].get(kind, 0),
        }
        for kind in sorted(f["faults_by_kind"])
    ]
    columns = [
        ("kind", "<14", cell("kind")),
        ("injected", ">9", cell("injected")),
        ("retried", ">9", cell("retried")),
        ("recorded", ">10", cell("recorded")),
    ]
    common.print_table(columns, kinds)
    common.write_results("robustness", result)


def report_corrupt(result: dict) -> None:
    columns = [
        ("file", "<19", cell("file")),
        ("how", "<10", cell("how")),
        ("outcome", "", cell("outcome")),
    ]
    common.print_table(columns, result["damages"])
    print(
        f"kills with a damaged file {result['kills']}; labels stored {result['labels_stored']} "
        f"(budget {result['budget']} + initial); duplicates {result['duplicates']}; "
        f"labels lost {result['labels_lost']} (goal 0); ended clearly (mended or named) "
        f"{result['ended_clearly']}/{len(result['damages'])} (goal all); "
        f"final exit status {result['exit_code']}"
    )
    common.write_results("robustness_corrupt", result)


if __name__ == "__main__":
    main()
