"""The same short campaign on several sites, wall time side by side.

    python benchmarks/site_campaign.py laptop.py local_slurm.py --repeat 3

Runs ``pipeline/run.py`` on ``benchmarks/short_cu13.toml`` (Cu13, EMT, 40 labels)
for each site in turn and reports the median wall time of the process and of the
campaign itself (from the coordinator's start). Writes
``benchmarks/results/site_campaign.json``.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import common
from common import cell

from palflow.pipeline.state.rundir import SUMMARY_FILE, RunDirectory

CAMPAIGN = common.BENCHMARKS / "short_cu13.toml"


def run_once(site: str) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="palflow-bench-")) / "run"
    t0 = time.perf_counter()
    done = subprocess.run(
        [
            *common.palflow_run(site),
            "--campaign",
            str(CAMPAIGN),
            "--run-dir",
            str(run_dir),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{site}: run failed\n{done.stderr[-2000:]}")
    summary = RunDirectory(run_dir).read_json(SUMMARY_FILE)
    return {
        "site": site,
        "process_s": elapsed,
        "campaign_s": summary["wall_s"],
        "labels": summary["labels"],
        "final_force_mae": summary["test_force_mae"][-1][2],
    }


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("sites", nargs="+")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs = [run_once(site) for _ in range(args.repeat) for site in args.sites]
    rows = []
    for site in args.sites:
        mine = [r for r in runs if r["site"] == site]
        row = {"site": site, "runs": mine}
        for key in ("process_s", "campaign_s", "final_force_mae"):
            row[key] = statistics.median(r[key] for r in mine)
        rows.append(row)
    common.print_table(
        [
            ("site", "<16", cell("site")),
            ("process s", ">11", cell("process_s", ".1f")),
            ("campaign s", ">12", cell("campaign_s", ".1f")),
            ("final MAE eV/Å", ">16", cell("final_force_mae", ".4f")),
        ],
        rows,
    )
    base = rows[0]["process_s"]
    for row in rows[1:]:
        print(f"{row['site']} / {rows[0]['site']} process time: {row['process_s'] / base:.2f}")
    common.write_results("site_campaign", rows)


if __name__ == "__main__":
    main()
