"""How a campaign's cost grows with its size: the real coordinator on a simulated site.

Issue 29 asks that a campaign's cost stay flat as it grows. This script runs the real
coordinator (:class:`palflow.pipeline.engine.coordinator.Coordinator`: agents, label
store, journal, events, versions, summary) with every app replaced by a stand-in on a
simulated site with a virtual clock (``benchmarks/scale_sim.py``): a task completes
when the engine's observer says so, at once in real time, so that what is measured is
the coordinator and not a thousand sleeping threads on two cores. Frames are 64
copper atoms; oracle batches of 4; oracle, generator and training times drawn from
fixed distributions (``scale_sim.DURATIONS``; a training task takes the same virtual
time whatever the data, so versions come at a steady rate and their cost is counted
in full). The stand-ins compute nothing and write what the real apps write: the
oracle, the ``.out.npz`` of its batch with random energies and forces, all "ok" (and
the held-out set: rattled copies of the start); the generator, per walker, frames
with the members' disagreement fields (force spread about 0.1 eV/A, above the 0.03
threshold) and the last frame; training reads the data it is handed (a training
snapshot's file whole; a selection of the label store, only the rows that member has
not read yet) and copies one real member checkpoint made at the start, which the
coordinator stacks into versions; scoring and evaluation read their inputs and
return what the real ones return. Each point runs in a fresh process, so that its
peak memory is its own:

- coordinator CPU per label: the process's CPU time over the run minus the
  stand-ins' own (``time.thread_time`` around each), over the active labels;
- run-directory bytes per label (every file the run wrote);
- peak resident memory (``ru_maxrss``; it includes the stand-ins' reads: a training
  stand-in of the old code reads a whole training snapshot, as the real task would);
- resume: in another fresh process, reopen the finished run and build
  ``Coordinator.resume`` (mend, labels, queue; the model's imports done before the
  clock starts) until it could submit; and the same for a copy of the run taken when
  it had half its labels (a kill mid-way; labels sweep only);
- latency from a task's completion (the simulated ``set_result``) to the first
  submission of the turn that handled it, p50 and p99, in real time, over the
  completions whose turn submitted something (the others wait for work, which is
  no latency of the coordinator's); and each turn's whole duration (the result
  used, every submission made, the journal saved), p50 and p99.

Sweeps: labels (16 walkers, 64 oracle slots), walkers (64 slots) at
``--sweep-labels`` and oracle slots (256 walkers) at ``--slot-labels``: with one
oracle slot, 256 walkers make many segments per label, and 10⁴ labels take an hour.
The goals of the issue are printed beside the results and recorded met or not. With
a ``--before`` commit (default 4c36776, before the label store), the same simulation
runs on that commit's code, a ``git archive`` of it put first on ``PYTHONPATH``
(each point checks which ``palflow`` it imported): up to the largest size that
finishes within ``--before-limit-s``; beyond, its figures are a power law fitted to
the sizes it reached, and marked extrapolated.

    python benchmarks/scale.py                                # 1e3, 1e4, 1e5 labels
    python benchmarks/scale.py --labels 1000 10000 --no-before
    python benchmarks/scale.py --quick --no-before            # tiny sizes, seconds

Results: ``benchmarks/results/scale.json`` and ``scale.png`` (``scale_quick.*``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import cell

SIM = Path(__file__).with_name("scale_sim.py")
BASE = {"walkers": 16, "slots": 64, "batch": 4}
QUICK_BASE = {"walkers": 2, "slots": 4, "batch": 4}
METRICS = ("cpu_s_per_label", "bytes_per_label", "peak_rss_mb", "resume_s")
GOALS = {
    "cpu_per_label_ratio": "coordinator CPU per label, largest / smallest labels <= 1.5",
    "bytes_per_label_flat": "run-directory bytes per label within 10% across labels",
    "label_bytes_flat": "(the labels' own files: labels.db, labels.extxyz, data/, oracle/)",
    "resume_s": "resume at the largest labels <= 10 s",
    "peak_rss_mb": "coordinator peak memory at the largest labels <= 1 GB",
    "latency_p99_ms": "completion -> next submission at the most oracle slots, p99 <= 10 ms",
}


def run_point(point: dict, tree: Path | None, limit_s: float | None, folder: Path) -> dict | None:
    """One point in a fresh process (and its resumes in others), in a new folder of
    ``folder`` (which keeps the member checkpoint every point of one code copies);
    None past ``limit_s``."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    work = Path(tempfile.mkdtemp(prefix="point-", dir=folder))
    point = {**point, "template": str(folder / "template.pt")}

    def child(*words: str, timeout: float | None = None) -> dict:
        done = subprocess.run(
            [sys.executable, str(SIM), *words],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=SIM.parent,
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(words[:2])} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    try:
        row = child("--point", json.dumps(point), str(work), timeout=limit_s)
        expected = tree / "palflow" if tree is not None else imported()
        if Path(row.pop("palflow")).resolve() != expected.resolve():
            raise RuntimeError(f"the point imported palflow from elsewhere than {expected}")
        row.pop("template")
        row.update(child("--resume", row.pop("run_dir"), json.dumps(point)))
        killed = row.pop("killed_copy")
        if killed:
            resumed = child("--resume", killed, json.dumps(point))
            row["killed_resume_s"] = resumed["resume_s"]
        return row
    except subprocess.TimeoutExpired:
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def imported() -> Path:
    """Where this process imports ``palflow`` from (the checkout, installed editable)."""
    import palflow.apps

    return Path(palflow.apps.__file__).parent.parent


def archive(commit: str, into: Path) -> Path:
    """``commit``'s apps, pipeline and site_configs as a ``palflow`` package in ``into``."""
    package = into / "palflow"
    package.mkdir(parents=True)
    tar = subprocess.run(
        ["git", "-C", str(common.ROOT), "archive", commit, "apps", "pipeline", "site_configs"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(package)], input=tar, check=True)
    (package / "__init__.py").write_text(f'"""palflow at {commit}, for scale.py."""\n')
    return into


def fit(rows: list[dict], labels: int) -> dict:
    """Every metric at ``labels`` from a power law fitted to ``rows`` (log-log line)."""
    import numpy as np

    x = np.log([r["labels"] for r in rows])
    out = {"labels": labels, "extrapolated": True, "fitted_to": [r["labels"] for r in rows]}
    for metric in METRICS:
        y = np.log([max(r[metric], 1e-12) for r in rows])
        slope, intercept = np.polyfit(x, y, 1) if len(rows) > 1 else (0.0, y[0])
        out[metric] = float(math.exp(intercept + slope * math.log(labels)))
        out[f"{metric}_exponent"] = float(slope)
    return out


def sweep(
    points: list[dict],
    tree: Path | None,
    limit_s: float | None,
    code: str,
    folder: Path,
    ladder: bool = True,
) -> list:
    """Run ``points`` in order; with ``limit_s``, stop at the first that overruns it
    (a ``ladder`` of growing sizes), or skip it (not a ladder)."""
    rows = []
    (folder / code).mkdir(exist_ok=True)
    for point in points:
        began = time.perf_counter()
        row = run_point(point, tree, limit_s, folder / code)
        if row is None:
            print(f"  {code} {point}: over {limit_s:.0f} s, stopped", flush=True)
            if ladder:
                break
            continue
        rows.append({**row, "code": code})
        print(
            f"  {code} {point}: {time.perf_counter() - began:.0f} s, "
            f"{1e3 * row['cpu_s_per_label']:.2f} ms CPU/label",
            flush=True,
        )
    return rows


def _spread(values: list) -> float | None:
    """max / min - 1 of ``values`` (None where one is missing)."""
    if not values or any(v is None for v in values):
        return None
    return max(values) / min(values) - 1


def goals(labels: list[dict], slots: list[dict]) -> dict:
    """The issue's goals on one code's rows (measured, or extrapolated where marked)."""
    if not labels:
        return {}
    small, large = labels[0], labels[-1]
    bytes_ = [r["bytes_per_label"] for r in labels]
    most = max(slots, key=lambda r: r["slots"]) if slots else None
    values = {
        "cpu_per_label_ratio": (large["cpu_s_per_label"] / small["cpu_s_per_label"], 1.5),
        "bytes_per_label_flat": (max(bytes_) / min(bytes_) - 1, 0.10),
        "label_bytes_flat": (_spread([r.get("label_bytes_per_label") for r in labels]), 0.10),
        "resume_s": (large["resume_s"], 10.0),
        "peak_rss_mb": (large["peak_rss_mb"], 1024.0),
        "latency_p99_ms": (most["latency_p99_ms"] if most else None, 10.0),
    }
    return {
        name: {
            "goal": GOALS[name],
            "value": value,
            "limit": limit,
            "met": value is not None and value <= limit,
            "at_labels": [small["labels"], large["labels"]],
            "at_slots": most["slots"] if most else None,
            "extrapolated": bool(large.get("extrapolated")),
        }
        for name, (value, limit) in values.items()
    }


COLUMNS = [
    ("code", "<8", cell("code")),
    ("labels", ">8", cell("labels")),
    ("walkers", ">8", cell("walkers")),
    ("slots", ">6", cell("slots")),
    ("CPU ms/label", ">13", lambda r: common.show(r.get("cpu_s_per_label", 0) * 1e3, ".2f")),
    ("kB/label", ">10", lambda r: common.show(r.get("bytes_per_label", 0) / 1e3, ".1f")),
    ("label kB", ">9", lambda r: common.show(r.get("label_bytes_per_label", 0) / 1e3, ".1f")),
    ("peak MB", ">9", cell("peak_rss_mb", ".0f")),
    ("resume s", ">9", cell("resume_s", ".2f")),
    ("killed s", ">9", cell("killed_resume_s", ".2f")),
    ("p50 ms", ">8", cell("latency_p50_ms", ".2f")),
    ("p99 ms", ">8", cell("latency_p99_ms", ".2f")),
    ("turn p99", ">9", cell("turn_p99_ms", ".2f")),
    ("wall s", ">8", cell("wall_s", ".0f")),
    ("", "<6", lambda r: " (fit)" if r.get("extrapolated") else ""),
]


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    figure, axes = plt.subplots(1, 4, figsize=(16, 4))
    names = {
        "cpu_s_per_label": "coordinator CPU s / label",
        "bytes_per_label": "bytes / label",
        "peak_rss_mb": "peak memory MB",
        "resume_s": "resume s",
    }
    for ax, metric in zip(axes, METRICS, strict=True):
        for code, style in (("before", "o-"), ("after", "s-")):
            rows = result["sweeps"]["labels"].get(code) or []
            ladder = result["sweeps"]["labels"].get(f"{code}_ladder") or []
            measured = sorted(
                [r for r in rows + ladder if not r.get("extrapolated")], key=lambda r: r["labels"]
            )
            fitted = [r for r in rows if r.get("extrapolated")]
            if measured:
                ax.plot(
                    [r["labels"] for r in measured],
                    [r[metric] for r in measured],
                    style,
                    label=f"{code} ({result['codes'][code]})",
                )
            if fitted:
                tail = measured[-1:] + fitted
                ax.plot(
                    [r["labels"] for r in tail],
                    [r[metric] for r in tail],
                    "o--",
                    color="grey",
                    label=f"{code}, extrapolated",
                )
        ax.set(xscale="log", yscale="log", xlabel="active labels", title=names[metric])
        ax.legend(fontsize=7)
    common.save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--labels", type=int, nargs="+", help="default 1e3 1e4 1e5")
    parser.add_argument("--walkers", type=int, nargs="+", help="default 1 16 256")
    parser.add_argument("--slots", type=int, nargs="+", help="oracle slots; default 1 32 1000")
    parser.add_argument("--sweep-labels", type=int, help="labels of the walker sweep (2,000)")
    parser.add_argument("--slot-labels", type=int, help="labels of the slot sweep (1,000)")
    parser.add_argument("--before", default="4c36776", help="the commit before the change")
    parser.add_argument("--no-before", action="store_true", help="the checkout's code only")
    parser.add_argument(
        "--before-limit-s",
        type=float,
        default=120.0,
        help="longest run of one point of the old code (120)",
    )
    parser.add_argument(
        "--before-max-labels", type=int, help="run the old code to this size at most; fit beyond"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args(argv)
    quick = args.quick
    base = QUICK_BASE if quick else BASE
    labels = args.labels or ([24, 48] if quick else [1000, 10_000, 100_000])
    walkers = args.walkers or ([1] if quick else [1, 16, 256])
    slots = args.slots or ([8] if quick else [1, 32, 1000])
    at = args.sweep_labels or (24 if quick else 2_000)
    at_slots = args.slot_labels or (24 if quick else 1_000)
    protocol = common.provenance(args)
    protocol["load_average_before"] = list(os.getloadavg())
    protocol["goals"] = GOALS
    plan = {
        "labels": [{**base, "labels": n, "kill": True} for n in labels],
        "walkers": [{**base, "labels": at, "walkers": w} for w in walkers],
        "slots": [
            {**base, "labels": at_slots, "walkers": 4 if quick else 256, "slots": s} for s in slots
        ],
    }
    where = "checkout" if imported().resolve() == common.ROOT.resolve() else "not the checkout"
    codes = {"after": f"{common.commit()[:12]} ({where})"}
    sweeps: dict = {name: {} for name in plan}
    # What has run so far, in case the run is stopped; removed once the results are.
    partial = common.RESULTS / f"scale{'_quick' if quick else ''}.partial.json"
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="palflow-before-") as folder:
        for name, points in plan.items():
            print(f"{name} sweep", flush=True)
            sweeps[name]["after"] = sweep(points, None, None, "after", Path(folder))
            partial.write_text(json.dumps(sweeps, default=str))
        if not args.no_before:
            tree = archive(args.before, Path(folder) / "tree")
            codes["before"] = args.before
            ladder = sorted({*(n for n in (250, 500) if n < min(labels)), *labels})
            ladder = [n for n in ladder if n <= (args.before_max_labels or n)]
            print("labels sweep, before", flush=True)
            before = sweep(
                [{**base, "labels": n, "kill": True} for n in ladder],
                tree,
                args.before_limit_s,
                "before",
                Path(folder),
            )
            reached = {r["labels"] for r in before}
            if before:
                before += [fit(before, n) | {"code": "before"} for n in labels if n not in reached]
            sweeps["labels"]["before"] = [r for r in before if r["labels"] in labels]
            sweeps["labels"]["before_ladder"] = [r for r in before if r["labels"] not in labels]
            cap = max(reached, default=0)
            for name in ("walkers", "slots"):
                points = [{**p, "labels": min(p["labels"], cap)} for p in plan[name]]
                print(f"{name} sweep, before, at most {cap} labels", flush=True)
                sweeps[name]["before"] = (
                    sweep(points, tree, args.before_limit_s, "before", Path(folder), False)
                    if cap
                    else []
                )
                partial.write_text(json.dumps(sweeps, default=str))
    for name in plan:
        print(f"\n{name} sweep")
        common.print_table(COLUMNS, [*sweeps[name].get("before", []), *sweeps[name]["after"]])
    verdicts = {
        code: goals(sweeps["labels"].get(code, []), sweeps["slots"].get(code, [])) for code in codes
    }
    for code, verdict in verdicts.items():
        print(f"\ngoals, {code} ({codes[code]}):")
        for goal in verdict.values():
            value = common.show(goal["value"], ".3g")
            print(
                f"  {'met    ' if goal['met'] else 'NOT met'}  {goal['goal']}: {value}"
                f"{' (extrapolated)' if goal['extrapolated'] else ''}"
            )
    result = {
        "protocol": protocol,
        "codes": codes,
        "method": __doc__.split("\n\n")[1],
        "extrapolation": "before-code rows marked extrapolated are a power law a*N^b per "
        "metric, fitted (least squares in log-log) to the sizes in fitted_to, which it ran; "
        "its walker and slot sweeps ran at min(sweep labels, the largest size it reached)",
        "sweeps": sweeps,
        "goals": verdicts,
        "load_average_after": list(os.getloadavg()),
    }
    common.write_results("scale_quick" if quick else "scale", result, plot, finite=True)
    partial.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
