"""How the cost of storing labels grows with the labels stored: the label store alone.

The first measurement of issue 29 (cost that stays flat as a campaign grows), and its
"before": every harvest of the current code stores its labels in ``labels.db`` and
writes the whole training set again as a new snapshot
(:meth:`palflow.pipeline.state.labels.LabelStore.add_labels`). This script drives
that code directly, without a coordinator, with synthetic labelled frames of 64
copper atoms harvested ``--batch`` at a time, and reports for each size (each in a
fresh process, so that its peak memory is its own):

- the CPU and wall time per label of the last tenth of the harvests (the marginal
  cost; wall time includes the waits for the disk, each snapshot being synced) and
  the CPU time per label of all of them;
- the run directory's bytes and files per label (``data/`` and ``labels.db``);
- the resume time (:meth:`~palflow.pipeline.state.labels.LabelStore.restore_labels`,
  which reads every row back);
- the peak resident memory of the process, and its growth over the process's
  memory before the first label (the imports alone take about 100 MB).

One run per size, on whatever else the machine is doing: the JSON records the load
average before and after.

    python benchmarks/scale_store.py                    # 256, 512, 1024, 2048 labels
    python benchmarks/scale_store.py --labels 100 200   # other sizes
    python benchmarks/scale_store.py --quick            # 40 and 80 labels, seconds

Results: ``benchmarks/results/scale_store.json``. The coordinator simulation of the
issue (walkers, oracle slots, latency on a virtual clock) is not here yet.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import common
import numpy as np
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from palflow.pipeline.config.settings import load_campaign
from palflow.pipeline.state.labels import LabelStore
from palflow.pipeline.state.rundir import RunDirectory

SIZES = [256, 512, 1024, 2048]
QUICK_SIZES = [40, 80]
"""Multiples of the default batch: every harvest holds the same number of labels."""


class Store(LabelStore):
    """The label store of a campaign state, on its own."""

    def __init__(self, run: RunDirectory) -> None:
        self.campaign = load_campaign()
        self.run = run
        self.label_log, self.labelled_ids = None, set()
        self.n_labels_active = self.n_labels_initial = 0
        self.active_by_system = Counter()
        self.train_snapshot = None


def frames(n: int, rng: np.random.Generator) -> list:
    """``n`` labelled frames of 64 rattled copper atoms (random energies and forces)."""
    base = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 4))
    made = []
    for _ in range(n):
        atoms = base.copy()
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        forces = rng.normal(0, 0.5, atoms.positions.shape)
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=forces)
        made.append(atoms)
    return made


def bytes_and_files(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def measure_one(labels: int, batch: int) -> dict:
    """Harvest ``labels`` labels ``batch`` at a time into a new run directory; then
    resume its labels once."""
    rng = np.random.default_rng(labels)
    with tempfile.TemporaryDirectory() as work:
        run = RunDirectory.create(Path(work) / "run", load_campaign().model_dump())
        store = Store(run)
        rss_before_mb = peak_rss_mb()
        harvests = []  # (labels, CPU s, wall s) of each harvest
        for start in range(0, labels, batch):
            new = frames(min(batch, labels - start), rng)
            metadata = [
                {"candidate_id": start + k, "source": "active", "oracle_task": start // batch}
                for k in range(len(new))
            ]
            cpu, wall = time.process_time(), time.perf_counter()
            store.add_labels(new, metadata)
            harvests.append((len(new), time.process_time() - cpu, time.perf_counter() - wall))
        data_bytes, data_files = bytes_and_files(run.root / "data")
        db_bytes = run.labels_db.stat().st_size
        peak_mb = peak_rss_mb()
        del store  # the resume below holds the only copy of the labels
        resumed = Store(run)
        began = time.perf_counter()
        resumed.restore_labels()
        resume_s = time.perf_counter() - began
    counts, cpu, wall = (np.array(column) for column in zip(*harvests, strict=True))
    tail = slice(-max(1, len(harvests) // 10), None)
    return {
        "labels": labels,
        "batch": batch,
        "atoms": 64,
        "cpu_s_per_label_last_tenth": float(cpu[tail].sum() / counts[tail].sum()),
        "wall_s_per_label_last_tenth": float(wall[tail].sum() / counts[tail].sum()),
        "cpu_s_per_label_mean": float(cpu.sum() / counts.sum()),
        "data_bytes": data_bytes,
        "data_files": data_files,
        "labels_db_bytes": db_bytes,
        "bytes_per_label": (data_bytes + db_bytes) / labels,
        "resume_s": resume_s,
        "peak_rss_mb": peak_mb,
        "rss_growth_mb": peak_mb - rss_before_mb,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--labels", type=int, nargs="+", help="sizes (default: 250 to 2000)")
    parser.add_argument("--batch", type=int, default=4, help="labels per harvest (4)")
    parser.add_argument("--quick", action="store_true", help="40 and 80 labels")
    parser.add_argument("--one", type=int, help=argparse_hidden())
    args = parser.parse_args(argv)
    if args.one is not None:  # one size, in this process
        print(json.dumps(measure_one(args.one, args.batch)))
        return 0
    sizes = args.labels or (QUICK_SIZES if args.quick else SIZES)
    load_before = os.getloadavg()
    rows = []
    for labels in sizes:
        done = subprocess.run(
            [sys.executable, __file__, "--one", str(labels), "--batch", str(args.batch)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(
            f"{labels:>6} labels: {1e3 * row['cpu_s_per_label_last_tenth']:7.2f} ms CPU, "
            f"{1e3 * row['wall_s_per_label_last_tenth']:7.2f} ms wall per label (last tenth), "
            f"{row['bytes_per_label'] / 1e3:8.1f} kB per label in {row['data_files']} files, "
            f"resume {row['resume_s']:.2f} s, memory +{row['rss_growth_mb']:.0f} MB "
            f"(peak {row['peak_rss_mb']:.0f} MB)",
            flush=True,
        )
    first, last = rows[0], rows[-1]
    growth = {
        "labels": [first["labels"], last["labels"]],
        "cpu_per_label_last_over_first": last["cpu_s_per_label_last_tenth"]
        / first["cpu_s_per_label_last_tenth"],
        "wall_per_label_last_over_first": last["wall_s_per_label_last_tenth"]
        / first["wall_s_per_label_last_tenth"],
        "rss_growth_last_over_first": last["rss_growth_mb"] / max(first["rss_growth_mb"], 1e-9),
        "bytes_per_label_last_over_first": last["bytes_per_label"] / first["bytes_per_label"],
    }
    print(
        f"from {first['labels']} to {last['labels']} labels: CPU per label x"
        f"{growth['cpu_per_label_last_over_first']:.2f} (wall x"
        f"{growth['wall_per_label_last_over_first']:.2f}), bytes per label x"
        f"{growth['bytes_per_label_last_over_first']:.2f}, memory growth x"
        f"{growth['rss_growth_last_over_first']:.2f}"
    )
    commit = subprocess.run(
        ["git", "-C", str(common.ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    result = {
        "code": commit,
        "batch": args.batch,
        "repeats": 1,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": rows,
        "growth": growth,
    }
    common.write_results("scale_store_quick" if args.quick else "scale_store", result)
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
