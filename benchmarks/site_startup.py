"""Time from ``parsl.load`` to the first result of each module, per site.

    python benchmarks/site_startup.py laptop.py local_slurm.py --repeat 3

Each module gets one no-op task as soon as the site is loaded; the table gives the
median seconds until the first and the last of them came back. Writes
``benchmarks/results/site_startup.json``.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import common
from common import cell

common.use_this_interpreter()


def time_site(name: str) -> dict:
    import parsl
    from parsl import python_app

    from palflow.apps.common import _ping
    from palflow.apps.contracts import MODULES
    from palflow.pipeline.config.sites import load_site

    site = load_site(name)
    site.config.run_dir = tempfile.mkdtemp(prefix="palflow-startup-")
    t0 = time.perf_counter()
    with parsl.load(site.config):
        futures = {}
        for module in MODULES:
            kwargs = {}
            if module == "oracle" and site.oracle_mpi:
                kwargs["parsl_resource_specification"] = site.oracle_resources(1, 1)
            futures[module] = python_app(_ping, executors=[module])(**kwargs)
        results = {}
        for module, future in futures.items():
            record = future.result(timeout=600)
            results[module] = {
                "first_result_s": time.perf_counter() - t0,
                "slurm_partition": record["slurm_partition"],
                "slurm_job_id": record["slurm_job_id"],
            }
    return {
        "site": name,
        "first_result_s": min(r["first_result_s"] for r in results.values()),
        "all_modules_s": max(r["first_result_s"] for r in results.values()),
        "modules": results,
    }


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("sites", nargs="+")
    parser.add_argument("--repeat", type=int, default=3, help="loads per site")
    args = parser.parse_args()
    rows = []
    # Interleave the sites, so that a busy spell on the machine hits them alike.
    runs = [time_site(name) for _ in range(args.repeat) for name in args.sites]
    for name in args.sites:
        mine = [r for r in runs if r["site"] == name]
        first = statistics.median(r["first_result_s"] for r in mine)
        last = statistics.median(r["all_modules_s"] for r in mine)
        rows.append({"site": name, "first_result_s": first, "all_modules_s": last, "runs": mine})
    common.print_table(
        [
            ("site", "<16", cell("site")),
            ("first result s (median)", ">25", cell("first_result_s", ".1f")),
            ("all modules s (median)", ">24", cell("all_modules_s", ".1f")),
        ],
        rows,
    )
    common.write_results("site_startup", rows)


if __name__ == "__main__":
    main()
