"""Run an active-learning campaign on a site.

    python pipeline/run.py --site laptop.py
    python pipeline/run.py --site hpc.py --campaign examples/cu_emt.toml --max-labels 500
    python pipeline/run.py --site laptop.py --resume runs/ethanol-gfn2-20261122-145705
    python pipeline/run.py --site laptop.py --campaign a.toml --campaign b.toml

Several ``--campaign`` files run side by side on the same executors, each with its
own coordinator and run directory (``NAME-TIME-INDEX`` in ``--run-dir``, default
``runs/``); one failing leaves the others running.

Exit status: 0 when every campaign reached a stop (a budget, a target, a wall time)
with labels stored and a finite held-out force MAE; 1 when one failed or achieved
nothing (the reason on the last line and in ``summary.json``), or on any other
exception (its traceback in the run's log, ``palflow.log`` in the run directory, or
on stderr before one exists; a one-line reason printed last); 2 on bad input, an
:class:`~palflow.apps.errors.InputError` or a pydantic ``ValidationError`` (nothing
created). ``palflow run`` (:mod:`palflow.pipeline.cli`) is the same command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

PROCESS_START = time.time()
# palflow imports through the installed package (``palflow.pipeline``,
# ``palflow.apps``), here and in Parsl's workers. Run as a script, though, this
# file's folder heads sys.path, where its subfolders (config/, state/, ...) could
# shadow other top-level modules: the folder the script was started from takes its
# place, which also keeps import paths into it (a plugin's ``mymodule:Class``, the
# tests' ``tests.test_cli:BrokenQuery``) resolving.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = os.getcwd()
# Parsl's HTEX starts interchange.py and process_worker_pool.py from PATH: make
# this interpreter's scripts folder (the venv's bin) win even when not activated.
os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))
if __name__ == "__main__" and importlib.util.find_spec("palflow") is None:
    print(
        "palflow is not installed in this Python: run `bash .ci/setup.sh` from the checkout "
        "(or `pip install -e .`), then `.venv/bin/python pipeline/run.py ...`",
        file=sys.stderr,
    )
    sys.exit(2)

# palflow's own modules, once the path above is right.
from palflow.apps.errors import InputError  # noqa: E402
from palflow.pipeline.config.preflight import check_calculator, check_campaign, check_run_path  # noqa: E402
from palflow.pipeline.config.settings import campaign_from_dict, load_campaign  # noqa: E402
from palflow.pipeline.config.sites import load_site  # noqa: E402
from palflow.pipeline.engine.coordinator import Apps, Coordinator  # noqa: E402
from palflow.pipeline.engine.final_stage import validate_after  # noqa: E402
from palflow.pipeline.engine.watchdog import WorkerStartWatch  # noqa: E402
from palflow.pipeline.observe.console import LOG_FILE, log_file, set_up_logging  # noqa: E402
from palflow.pipeline.observe.live import LiveView, ReportRefresher  # noqa: E402
from palflow.pipeline.observe.report import build_report  # noqa: E402
from palflow.pipeline.resume.mend import mend_run  # noqa: E402
from palflow.pipeline.state.rundir import (  # noqa: E402
    CAMPAIGN_FILE,
    FAILURE_FILE,
    SUMMARY_FILE,
    RunDirectory,
    RunDirectoryError,
)

logger = logging.getLogger("palflow")


def parse_args(argv: list[str] | None = None, prog: str = "pipeline/run.py") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Streaming active learning of an interatomic potential.",
    )
    parser.add_argument(
        "--site", required=True, help="site config: a name in site_configs/ (laptop.py) or a path"
    )
    parser.add_argument(
        "--campaign",
        action="append",
        help="campaign TOML file (default: ethanol with GFN2-xTB); repeat it to run several "
        "campaigns side by side on the same executors",
    )
    parser.add_argument(
        "--run-dir",
        help="new directory for this run (default: runs/NAME-TIME); with several "
        "--campaign, the folder their runs go to (default: runs/)",
    )
    parser.add_argument("--max-labels", type=int, help="override stop.max_labels")
    parser.add_argument(
        "--max-wall", type=float, metavar="SECONDS", help="override stop.max_wall_s"
    )
    parser.add_argument(
        "--final-training",
        type=float,
        metavar="SECONDS",
        help="override stop.final_training_s: how long training goes on after a stop "
        "(0: each member only takes in the last labels once; the default 60 s is most of a "
        "smoke run's time)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped or killed run; --max-labels/--max-wall may raise its budgets",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="warnings only (no progress lines)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "pipeline/run.py") -> int:
    """Run the campaigns of the command line ``argv``; ``prog`` names the command in
    usage lines (``palflow run`` from :mod:`palflow.pipeline.cli`). Returns the exit status."""
    from pydantic import ValidationError

    args = parse_args(argv, prog)
    set_up_logging(args.quiet, len(args.campaign or []) > 1)
    try:
        site = load_site(args.site)
        prepared = prepare_runs(args, site.mpi_command)
        for _, run, _ in prepared:
            run.lock()
    except (InputError, ValidationError) as error:  # bad input: nothing was created
        print(f"palflow: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # palflow's own failure: no run directory to log it in
        logger.exception("palflow failed before any campaign started")
        print(f"palflow: failed: {one_line(error)}", file=sys.stderr)
        return 1

    reasons: dict[int, str] = {}
    handlers = [
        log_file(run, None if len(prepared) == 1 else f"{campaign.name}-{index}")
        for index, (campaign, run, _) in enumerate(prepared)
    ]
    for handler in handlers:
        logging.getLogger().addHandler(handler)
    try:
        if len(prepared) == 1:
            campaign, run, start = prepared[0]
            interactive = sys.stderr.isatty() and not args.quiet
            try:
                summaries = [execute(campaign, run, site, start, interactive)]
            except Exception as error:  # the traceback goes to the run's log
                reasons[0] = log_failure(campaign, run, error)
                summaries = [None]
        else:
            summaries = execute_side_by_side(prepared, site, reasons)
        for index, (_, run, _) in enumerate(prepared):
            end_run(run, reasons.get(index))
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()
    for index, ((campaign, run, _), summary) in enumerate(zip(prepared, summaries, strict=True)):
        report(campaign, run, summary, reasons.get(index))
    # 0 only for a real stop with labels and a finite MAE (engine.watchdog.verdict).
    return 0 if all(s is not None and not s["failed"] for s in summaries) else 1


def one_line(error: BaseException) -> str:
    """The reason an exception gives, on one line."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:500]


def log_failure(campaign, run, error: BaseException) -> str:
    """Log the traceback of a campaign's failure to its run's log; returns the one-line
    reason printed last."""
    logger.error("campaign %s failed", campaign.name, exc_info=error, extra={"log_file_only": True})
    return f"{one_line(error)} (traceback in {run.root / LOG_FILE})"


def report(campaign, run, summary: dict | None, reason: str | None = None) -> None:
    """Print the outcome of one campaign; ``reason`` says why one without a summary failed."""
    print(f"run directory: {run.root}")
    if summary is None:
        print(f"campaign {campaign.name} failed: {reason or 'see the log above'}")
        return
    print(f"stopped: {summary['stop_reason']}")
    print(
        f"labels: {summary['labels']} (+{summary['initial_labels']} initial), "
        f"oracle failures: {summary['oracle_failures']}, wall: {summary['wall_s']:.0f} s"
    )
    if summary["test_force_mae"]:
        first, last = summary["test_force_mae"][0][2], summary["test_force_mae"][-1][2]
        print(f"test force MAE: {first:.4f} -> {last:.4f} eV/Å")
    elif not summary.get("has_test_set", True):
        print("test force MAE: none (no held-out set); see validation and exploration below")
    if summary.get("validation_force_mae") is not None:
        print(f"ensemble error on validation labels: {summary['validation_force_mae']:.4f} eV/Å")
    for name, ratios in (summary.get("exploration") or {}).items():
        if ratios.get("accurate") is not None:
            print(
                f"explored frames, {name}: {ratios['accurate']:.0%} accurate, "
                f"{ratios['candidate']:.0%} candidate, {ratios['failed']:.0%} beyond the "
                "upper trust level"
            )
    for line in (summary.get("validate") or {}).get("lines", []):
        print(f"MD check: {line}")
    print(
        "busy fraction: " + ", ".join(f"{k} {v:.0%}" for k, v in summary["busy_fraction"].items())
    )
    if summary["failed"]:  # the last line says why the exit status is 1
        print(f"campaign {campaign.name} failed: {summary['failure']}")


def prepare_runs(args: argparse.Namespace, mpi_command: str = "parsl") -> list[tuple]:
    """Validate every campaign of the command line, then make their run directories.

    Nothing is created until every campaign has passed its checks; ``mpi_command`` is
    the site's launch prefix template, for the oracle's trial.
    """

    files = args.campaign or [None]
    if len(files) == 1:
        return [prepare_run(args, files[0], mpi_command=mpi_command)]
    if args.resume:
        raise RunDirectoryError("--resume continues one run: drop the --campaign options")
    parent = Path(args.run_dir) if args.run_dir else Path("runs")
    check_run_path(parent, args.site)  # first: a bad path fails before the trials
    checked = [prepare_run(args, path, False, mpi_command) for path in files]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    roots = [parent / f"{c.name}-{stamp}-{i}" for i, (c, _, _) in enumerate(checked)]
    for root in roots:
        if root.exists():
            raise RunDirectoryError(f"{root} already exists: pick another --run-dir")
    return [
        (campaign, RunDirectory.create(root, campaign.model_dump()), start)
        for (campaign, _, start), root in zip(checked, roots, strict=True)
    ]


def prepare_run(
    args: argparse.Namespace,
    campaign_file: str | None = None,
    create: bool = True,
    mpi_command: str = "parsl",
):
    """Validate every input (:mod:`palflow.pipeline.config.preflight`) and make (or
    reopen) the run directory; submit nothing.

    Returns
    -------
    tuple
        The campaign, the run directory, and the start structure (None on resume,
        where the run directory holds it).
    """
    overrides = {}
    if args.max_labels is not None:
        overrides["stop__max_labels"] = args.max_labels
    if args.max_wall is not None:
        overrides["stop__max_wall_s"] = args.max_wall
    if args.final_training is not None:
        overrides["stop__final_training_s"] = args.final_training
    if args.resume:
        if args.campaign or args.run_dir:
            raise RunDirectoryError(
                "--resume continues a run with its own campaign: drop --campaign and --run-dir"
            )
        run = RunDirectory.open(args.resume)
        data = json.loads(run.file(CAMPAIGN_FILE).read_text())
        data.setdefault("stop", {}).update(
            {key.split("__")[1]: value for key, value in overrides.items()}
        )
        campaign = campaign_from_dict(data, str(run.file(CAMPAIGN_FILE)))
        check_calculator(campaign.oracle.calculator, run.file(CAMPAIGN_FILE))

        run.lock()  # first: no other coordinator may be writing what is mended
        mend_run(campaign, run)  # rebuilds what the journal can; names what it cannot
        # This session's outcome replaces the last one's: until it ends, a killed
        # resume is "stopped early", not the last session's "finished" or "failed".
        for previous in (FAILURE_FILE, SUMMARY_FILE):
            run.file(previous).unlink(missing_ok=True)
        if overrides:  # raised budgets are the run's settings from now on (status reads them)
            run.write_json(CAMPAIGN_FILE, campaign.model_dump())
        return campaign, run, None
    campaign = load_campaign(campaign_file, **overrides)
    name = f"{campaign.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = Path(args.run_dir or Path("runs") / name)
    if create:
        check_run_path(root, args.site)
    starts = check_campaign(campaign, mpi_command, source=campaign_file)
    start = next(iter(starts.values()))[0]
    if not create:
        return campaign, None, start
    return campaign, RunDirectory.create(root, campaign.model_dump()), start


def watch(coordinator, run, interactive: bool, site=None):
    """Attach the live view, the report refresher and, where the site sets
    ``worker_start_timeout_s``, the watch on workers that never start."""
    import parsl

    view, refresher = LiveView(interactive), ReportRefresher(run.root)
    coordinator.observers += [view, refresher]
    if site is not None and site.worker_start_timeout_s:
        executors = parsl.dfk().executors
        coordinator.observers.append(WorkerStartWatch(executors, site.worker_start_timeout_s))
    return view, refresher


def finish_watching(coordinator, view, refresher) -> None:
    """The final view; wait for a report refresh in progress (:func:`end_run` builds
    the final one)."""

    view.close(coordinator)
    refresher.close()


def end_run(run, reason: str | None = None) -> None:
    """After a campaign: record a failure that left no summary (``reason``, in
    ``failure.json``), release the run's lock, then build the final report, which so
    says how the run ended (a failure to draw costs only the report)."""
    if reason is not None:
        run.write_json(FAILURE_FILE, {"failure": reason, "at": time.time()})
    run.unlock()
    try:
        logger.info("report: %s", build_report(run.root))
    except Exception:
        logger.exception("the report could not be built; the run itself is complete")


def execute(campaign, run, site, start, interactive: bool = False) -> dict:
    """Load the site's executors, run the coordinator on them, and shut them down."""
    import parsl

    site.config.run_dir = run.path("parsl")
    options = site.coordinator_options(campaign)
    with parsl.load(site.config):
        if start is None:
            coordinator = Coordinator.resume(
                campaign, run, Apps.parsl(), site.slots, began_at=PROCESS_START, **options
            )
        else:
            coordinator = Coordinator(campaign, run, Apps.parsl(), site.slots, start, **options)
        view, refresher = watch(coordinator, run, interactive, site)
        try:
            summary = coordinator.run()
        finally:
            finish_watching(coordinator, view, refresher)
        if campaign.validate.after_campaign and not summary["failed"]:
            validate_after(campaign, run, summary)
        return summary


def execute_side_by_side(prepared: list[tuple], site, reasons: dict) -> list[dict | None]:
    """Run several campaigns at once on one set of executors, one thread each.

    Every campaign has its own coordinator and run directory; a campaign that fails
    is logged and leaves the others running. Returns the summaries in order (None
    for a campaign that failed, whose one-line reason goes to ``reasons[index]``).
    """
    import threading

    import parsl

    site.config.run_dir = prepared[0][1].path("parsl")
    summaries: list[dict | None] = [None] * len(prepared)

    def run_one(index: int, campaign, run, start) -> None:
        try:
            coordinator = Coordinator(
                campaign, run, Apps.parsl(), site.slots, start, **site.coordinator_options(campaign)
            )
            view, refresher = watch(coordinator, run, interactive=False, site=site)
            try:
                summaries[index] = coordinator.run()
            finally:
                finish_watching(coordinator, view, refresher)
            if campaign.validate.after_campaign and not summaries[index]["failed"]:
                validate_after(campaign, run, summaries[index])
        except Exception as error:  # the traceback goes to the run's log; the others go on
            reasons[index] = log_failure(campaign, run, error)

    with parsl.load(site.config):
        threads = [
            threading.Thread(target=run_one, args=(i, *p), name=f"{p[0].name}-{i}")
            for i, p in enumerate(prepared)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return summaries


if __name__ == "__main__":
    sys.exit(main())
