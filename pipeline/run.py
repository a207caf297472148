"""Run an active-learning campaign on a site.

    python pipeline/run.py --site laptop.py
    python pipeline/run.py --site hpc.py --campaign examples/cu_emt.toml --max-labels 500

Exit status: 0 when the campaign ran to a stop, 2 on bad input (nothing submitted).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder heads sys.path, where its siblings could
# shadow other modules; the project root belongs there instead. Parsl workers
# inherit PYTHONPATH, so they import ``apps`` even from an uninstalled checkout.
if sys.path and Path(sys.path[0]).resolve() == ROOT / "pipeline":
    sys.path[0] = str(ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
)
# Parsl's HTEX starts interchange.py and process_worker_pool.py from PATH: make
# this interpreter's scripts folder (the venv's bin) win even when not activated.
os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))

logger = logging.getLogger("palflow")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pipeline/run.py",
        description="Streaming active learning of an interatomic potential.",
    )
    parser.add_argument(
        "--site", required=True, help="site config: a name in site_configs/ (laptop.py) or a path"
    )
    parser.add_argument("--campaign", help="campaign TOML file (default: ethanol with GFN2-xTB)")
    parser.add_argument("--run-dir", help="new directory for this run (default: runs/NAME-TIME)")
    parser.add_argument("--max-labels", type=int, help="override stop.max_labels")
    parser.add_argument(
        "--max-wall", type=float, metavar="SECONDS", help="override stop.max_wall_s"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Parsl logs everything to its own files in the run directory; on the console
    # only its warnings, so that the campaign's progress stays readable.
    for handler in logging.getLogger().handlers:
        handler.addFilter(
            lambda record: not record.name.startswith("parsl") or record.levelno >= logging.WARNING
        )

    from pipeline.campaign_state import load_start_structure
    from pipeline.rundir import RunDirectory
    from pipeline.settings import CampaignError, load_campaign
    from pipeline.sites import SiteError, load_site

    overrides = {}
    if args.max_labels is not None:
        overrides["stop__max_labels"] = args.max_labels
    if args.max_wall is not None:
        overrides["stop__max_wall_s"] = args.max_wall
    try:
        campaign = load_campaign(args.campaign, **overrides)
        check_calculator(campaign.oracle.calculator)
        start = load_start_structure(campaign.system.structure, campaign.system.vacuum)
        site = load_site(args.site)
        run_dir = Path(
            args.run_dir or ROOT / "runs" / f"{campaign.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        run = RunDirectory.create(run_dir)
    except (CampaignError, SiteError, ValueError, ImportError, FileExistsError) as error:
        print(f"palflow: error: {error}", file=sys.stderr)
        return 2

    run.write_json("campaign.json", campaign.model_dump())
    summary = execute(campaign, run, site, start)
    print(f"run directory: {run.root}")
    print(f"stopped: {summary['stop_reason']}")
    print(
        f"labels: {summary['labels']} (+{summary['initial_labels']} initial), "
        f"oracle failures: {summary['oracle_failures']}, wall: {summary['wall_s']:.0f} s"
    )
    if summary["test_force_mae"]:
        first, last = summary["test_force_mae"][0][2], summary["test_force_mae"][-1][2]
        print(f"test force MAE: {first:.4f} -> {last:.4f} eV/Å")
    print(
        "busy fraction: " + ", ".join(f"{k} {v:.0%}" for k, v in summary["busy_fraction"].items())
    )
    return 0


def check_calculator(path: str) -> None:
    """Fail before anything is submitted when the oracle's calculator does not import."""
    from apps.common import import_object

    import_object(path)


def execute(campaign, run, site, start) -> dict:
    """Load the site's executors, run the coordinator on them, and shut them down."""
    import parsl

    from pipeline.coordinator import Apps, Coordinator

    site.config.run_dir = run.path("parsl")
    with parsl.load(site.config):
        resources = site.oracle_resources(campaign.oracle.mpi_ranks, campaign.oracle.mpi_nodes)
        coordinator = Coordinator(
            campaign,
            run,
            Apps.parsl(),
            site.slots,
            start,
            oracle_resources=resources,
            mpi_command=site.mpi_command,
        )
        return coordinator.run()


if __name__ == "__main__":
    sys.exit(main())
