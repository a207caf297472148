"""The ``palflow`` command: run a campaign, and see, report on or export a run.

    palflow run --site laptop.py --campaign examples/cu_emt.toml
    palflow status runs/cu-emt-20261122-145705 [--json]
    palflow report runs/cu-emt-20261122-145705
    palflow export runs/cu-emt-20261122-145705 --to cu-emt-data
    palflow validate runs/cu-emt-20261122-145705
    palflow check --site my_cluster.py --campaign my.toml
    palflow init [DIR] [--site hpc]

``run`` is ``python pipeline/run.py`` under another name, with the same options.
``status``, ``report`` and ``export`` read the run directory's files alone, also
while a coordinator is running on it: they never hold its lock, ``status`` and
``export`` write nothing in it (``report`` writes ``report.html`` and ``report/``),
and a missing or torn file counts as not written yet.

Exit status: 0 when done, 1 when a campaign failed (``run``), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from palflow import apps
from palflow.apps.errors import InputError
from palflow.pipeline.config.quick import first_look
from palflow.pipeline.config.site_check import check_site
from palflow.pipeline.config.sites import load_site
from palflow.pipeline.config.starter import write_starter
from palflow.pipeline.state import run_files

# The commands import their heavy modules (Parsl, ASE, matplotlib, torch) when they
# run: a typo on the command line is answered before those load.

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------ commands
def _status(args: argparse.Namespace) -> int:
    from palflow.pipeline.observe.status import format_status, run_status_facts

    # A torn last line is what a running coordinator leaves mid-write, not news.
    logging.getLogger(run_files.__name__).setLevel(logging.ERROR)
    facts = run_status_facts(args.run_dir)
    print(json.dumps(facts, indent=2) if args.json else format_status(facts))
    return 0


def _report(args: argparse.Namespace) -> int:
    from palflow.pipeline.observe.report import build_report
    from palflow.pipeline.state.rundir import RunDirectory

    RunDirectory.open(args.run_dir)
    print(build_report(args.run_dir))
    return 0


def _export(args: argparse.Namespace) -> int:
    from palflow.pipeline.state.export import export_run

    done = export_run(args.run_dir, args.to)
    print(f"{done['labels_file']}: {done['labels']} labels")
    if done["ensemble_file"]:
        print(f"{done['ensemble_file']}: ensemble version {done['ensemble_version']}")
    else:
        print("no ensemble published yet: no checkpoint exported")
    for path in done.get("model_files") or []:
        print(f"{path}: one member in its model's own format")
    if done.get("test_file"):
        print(f"{done['test_file']}: the held-out set, {done['test_structures']} labelled frames")
    print(f"{done['readme_file']}: how to load them")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from palflow.pipeline.engine.validation import summary_lines, validate_run
    from palflow.pipeline.state.rundir import RunDirectory, RunDirectoryError

    run = RunDirectory.open(args.run_dir)
    if not run.ensembles():  # before any site is loaded: nothing created
        raise RunDirectoryError(
            f"{run.root} has no published ensemble to validate: run the campaign until it "
            "publishes one"
        )
    logging.getLogger("palflow").setLevel(logging.INFO)
    versions = [number for number, _ in run.ensembles()]
    if args.version is not None and args.version not in versions:
        raise RunDirectoryError(
            f"{run.root} has no ensemble version {args.version}: it has versions "
            f"{versions[0]} to {versions[-1]}"
        )
    if args.site is None:
        verdict = validate_run(args.run_dir, version=args.version)
    else:
        import parsl

        site = load_site(args.site)
        site.config.run_dir = str(run.root / "validate" / "parsl")
        with parsl.load(site.config):
            verdict = validate_run(args.run_dir, apps=apps, version=args.version)
    for line in summary_lines(verdict):
        print(line)
    print(f"{run.root / 'validate.json'}: the runs in full (ensemble v{verdict['version']})")
    return 0 if verdict["passed"] else 1


def _check(args: argparse.Namespace) -> int:

    logging.getLogger("palflow").setLevel(logging.WARNING)
    found = check_site(args.site, args.campaign)
    for line in found.passed:
        print(f"ok: {line}")
    for line in found.problems:
        print(f"problem: {line}")
    if found.problems:
        print(f"{len(found.problems)} problem(s): fix them, then check again", file=sys.stderr)
        return 2
    print("ready: nothing found that would stop a campaign from starting")
    return 0


def _init(args: argparse.Namespace) -> int:

    written = write_starter(args.folder, args.site)
    campaign, site = written["campaign"], written["site"]
    print(f"{campaign}: every setting at its default, commented out; edit what you change")
    print(f"{site}: a copy of palflow's {args.site} site; edit the lines marked EDIT")
    print(f"next: palflow check --site {site} --campaign {campaign}")
    print(f"then: palflow run --site {site} --campaign {campaign}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(
        prog="palflow", description="Parallel active learning of interatomic potentials."
    )
    parser.add_argument("--version", action="version", version=f"palflow {version('palflow')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Listed for the help only: main() hands `run` and its options to pipeline/run.py.
    commands.add_parser("run", help="run a campaign (palflow run --help for its options)")

    status = commands.add_parser("status", help="what a run has done, running or not")
    status.add_argument("run_dir", metavar="RUN_DIR")
    status.add_argument("--json", action="store_true", help="print the facts as JSON")
    status.set_defaults(handler=_status)

    report = commands.add_parser("report", help="build RUN_DIR/report.html")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(handler=_report)

    export = commands.add_parser(
        "export", help="labels as extxyz (MACE, NequIP) and the newest ensemble checkpoint"
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--to", required=True, metavar="DIR", help="new folder to write")
    export.set_defaults(handler=_export)

    check = commands.add_parser(
        "validate",
        help="MD check of the newest ensemble: time to failure, NVE drift (exit 1 on failure)",
    )
    check.add_argument("run_dir", metavar="RUN_DIR")
    check.add_argument(
        "--site", help="run the MD on this site's generator executor (default: here)"
    )
    check.add_argument("--version", type=int, help="ensemble version (default: the newest)")
    check.set_defaults(handler=_validate)

    site_check = commands.add_parser(
        "check",
        help="check a site (and a campaign) before running on it: placeholders, Slurm "
        "partitions and account, a test job, the campaign's pre-flight (exit 2 on a problem)",
    )
    site_check.add_argument("--site", required=True, help="site file, or a shipped site's name")
    site_check.add_argument("--campaign", help="campaign TOML file to pre-flight on this site")
    site_check.set_defaults(handler=_check)

    init = commands.add_parser(
        "init", help="write a commented campaign.toml and a copy of a site to edit"
    )
    init.add_argument("folder", nargs="?", default=".", metavar="DIR", help="default: here")
    init.add_argument(
        "--site", default="laptop", help="the shipped site to copy (laptop, hpc, ...)"
    )
    init.set_defaults(handler=_init)
    return parser


def _first_look(argv: list[str]) -> None:
    """:func:`~palflow.pipeline.config.quick.first_look` on the ``--site`` and
    ``--campaign`` values of a ``palflow run`` command line (argparse judges the rest
    later)."""

    values: dict[str, list[str]] = {"--site": [], "--campaign": []}
    for index, word in enumerate(argv):
        option, equals, value = word.partition("=")
        if option in values:
            if equals:
                values[option].append(value)
            elif index + 1 < len(argv) and not argv[index + 1].startswith("-"):
                values[option].append(argv[index + 1])
    sites = values["--site"]
    first_look(sites[-1] if sites else None, values["--campaign"])
    if values["--campaign"]:  # their settings, with pydantic alone (before Parsl, ase.io)
        from palflow.pipeline.config.settings import load_campaign

        for campaign in values["--campaign"]:
            load_campaign(campaign)


def main(argv: list[str] | None = None) -> int:
    """The ``palflow`` command; returns its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        try:  # a missing file is answered before the run's imports
            _first_look(argv[1:])
        except InputError as error:
            print(f"palflow: error: {error}", file=sys.stderr)
            return 2
        from palflow.pipeline import run

        return run.main(argv[1:], prog="palflow run")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except InputError as error:  # bad input; any other exception is a bug: its traceback, 1
        print(f"palflow: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
