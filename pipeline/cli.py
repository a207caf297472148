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
while a coordinator is running on it: they never take its lock, ``status`` and
``export`` write nothing in it (``report`` writes ``report.html`` and ``report/``),
and a missing or torn file counts as not written yet.

Exit status: 0 when done, 1 when a campaign failed (``run``), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from palflow.apps.errors import InputError

# The commands import what they need when they run: a typo on the command line is
# answered before Parsl, ASE or torch load.
_EXPORT_NAMES = ("EXPORTED_ENSEMBLE", "EXPORTED_LABELS", "EXPORTED_README", "export_run")


def __getattr__(name: str) -> Any:
    """The export command's names (``palflow.pipeline.cli.export_run``), on first use."""
    if name in _EXPORT_NAMES or name == "labelled_frames":
        from palflow.pipeline.state import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------ status
def run_status_facts(root: str | Path) -> dict[str, Any]:
    """What a run has done so far, from its files alone.

    Parameters
    ----------
    root
        The run directory; it may be running, stopped, killed or not started.

    Returns
    -------
    dict
        ``state`` is ``running``, ``finished`` or ``failed`` (``stop_reason`` says
        why, whole), ``stopped early`` (killed or crashed, no summary) or ``not
        started``; the
        label counts, the oracle failures by kind, the ensemble versions, the latest
        test force MAE (eV/Å), the elapsed wall time (s) and the finished tasks per
        module (and how many of them failed).

    Raises
    ------
    RunDirectoryError
        When ``root`` is not a run directory.
    """
    from palflow.apps.contracts import failure_counts
    from palflow.pipeline.state.rundir import (
        CAMPAIGN_FILE,
        METRICS_FILE,
        SUMMARY_FILE,
        RunDirectory,
    )

    run = RunDirectory.open(root)  # reading only: no lock
    campaign = run.read_json(CAMPAIGN_FILE) or {}
    summary = run.read_json(SUMMARY_FILE) or {}
    state = run.read_state()
    events = run.read_events()
    state_name, reason = run_state(run, state, events)
    active, initial = count_labels(run)
    if active is None:  # labels.db unreadable this instant: the last counts written
        active, initial = summary.get("labels"), summary.get("initial_labels")
    reasons = state.get("task_failures", {}).values()
    failures = failure_counts(reasons) if state else summary.get("oracle_failures_by_kind", {})
    ensembles = run.ensembles()
    rows = run.read_jsonl(METRICS_FILE) or state.get("test_errors", [])
    newest = max(rows, key=lambda e: e.get("version", 0), default={})
    tested = [e for e in rows if e.get("force_mae") is not None]
    latest = max(tested, key=lambda e: e.get("version", 0), default={})
    stop, test = campaign.get("stop", {}), campaign.get("test", {})
    return {
        "run_dir": str(run.root),
        "campaign": campaign.get("name", run.root.name),
        "state": state_name,
        "stop_reason": reason,
        "labels": {"active": active, "initial": initial, "budget": stop.get("max_labels")},
        "oracle_failures": {"total": sum(failures.values()), "by_kind": failures},
        "ensemble_versions": len(ensembles),
        "newest_ensemble": str(ensembles[-1][1]) if ensembles else None,
        "test_force_mae": latest.get("force_mae"),
        "test_force_mae_at": {"version": latest.get("version"), "labels": latest.get("labels")},
        "has_test_set": bool(test.get("file")) or test.get("n_structures", 1) > 0,
        "validation_force_mae": newest.get("validation_force_mae"),
        "exploration": newest.get("exploration"),
        "elapsed_s": elapsed_s(run, summary, state, state_name),
        "wall_budget_s": stop.get("max_wall_s"),
        "tasks": tasks_by_module(events),
    }


def run_state(run, state: dict, events: list[dict]) -> tuple[str, str | None]:
    """``running``, ``finished``, ``failed``, ``stopped early`` or ``not started``, and
    the whole reason of a run that has ended (the report says the same:
    :func:`~palflow.pipeline.observe.run_data.run_outcome`)."""
    from palflow.pipeline.observe.run_data import run_outcome

    status, reason = run_outcome(run.root)
    if status in ("running", "finished", "failed"):
        return status, reason
    return ("stopped early" if state or events else "not started"), None


def tasks_by_module(events: list[dict]) -> dict[str, dict[str, int]]:
    """Finished tasks per module, and how many of them failed (a task whose result
    could not be used counts once, as failed)."""
    from palflow.pipeline.state.run_files import one_per_task

    events = one_per_task(events)
    finished = Counter(e["module"] for e in events if "module" in e)
    failed = Counter(e["module"] for e in events if "module" in e and not e.get("ok"))
    return {
        module: {"finished": finished[module], "failed": failed[module]}
        for module in sorted(finished, key=_module_order)
    }


def count_labels(run) -> tuple[int | None, int | None]:
    """Active and initial labels in ``labels.db`` (``source`` of each row); zeros
    before it exists, and ``(None, None)`` when it cannot be read now."""
    import sqlite3

    from palflow.pipeline.state.rundir import LABELS_DB

    path = run.file(LABELS_DB)
    # ASE creates the tables of an empty file: never hand it one, or this reader
    # would write to the run.
    if not path.exists() or path.stat().st_size == 0:
        return 0, 0
    try:
        with run.labels() as database:
            return database.count(source="active"), database.count(source="initial")
    except (sqlite3.Error, OSError) as error:
        logger.warning("could not read %s: %s", path, error)
        return None, None


def elapsed_s(run, summary: dict, state: dict, state_name: str) -> float | None:
    """Wall time of the campaign (s): the summary's once stopped; while running, the
    last saved state's plus the time since it was saved."""
    from palflow.pipeline.state.rundir import STATE_FILE

    if state_name in ("finished", "failed") and "wall_s" in summary:
        return summary["wall_s"]
    if "elapsed_s" not in state:
        return None
    elapsed = state["elapsed_s"]
    if state_name == "running":
        try:
            elapsed += max(0.0, time.time() - run.file(STATE_FILE).stat().st_mtime)
        except OSError:
            pass
    return elapsed


def format_status(facts: dict[str, Any]) -> str:
    """The facts of :func:`run_status_facts` as aligned ``name: value`` lines."""
    labels, failures = facts["labels"], facts["oracle_failures"]
    state = facts["state"]
    if facts["stop_reason"]:
        state += f": {facts['stop_reason']}"
    elif state == "stopped early":
        state += " (killed or crashed; continue it: palflow run --site SITE --resume RUN_DIR)"
    budget = f" of {labels['budget']}" if labels["budget"] is not None else ""
    by_kind = ", ".join(f"{k} {n}" for k, n in sorted(failures["by_kind"].items()))
    mae = "-"
    if facts["test_force_mae"] is not None:
        at = facts["test_force_mae_at"]
        mae = f"{facts['test_force_mae']:.4f} eV/Å (version {at['version']}, {at['labels']} labels)"
    elif not facts.get("has_test_set", True):
        mae = "none: no held-out set (test.n_structures = 0), so no independent test error"
    label_line = f"{_count(labels['active'])}{budget} active, {_count(labels['initial'])} initial"
    wall = "-" if facts["elapsed_s"] is None else _clock(facts["elapsed_s"])
    if facts["wall_budget_s"] is not None:
        wall += f" of {_clock(facts['wall_budget_s'])}"
    tasks = ", ".join(
        f"{module} {n['finished']}" + (f" ({n['failed']} failed)" if n["failed"] else "")
        for module, n in facts["tasks"].items()
    )
    rows = [
        ("run", facts["run_dir"]),
        ("campaign", facts["campaign"]),
        ("state", state),
        ("labels", label_line),
        ("oracle failures", f"{failures['total']}" + (f" ({by_kind})" if by_kind else "")),
        ("ensemble versions", str(facts["ensemble_versions"])),
        ("test force MAE", mae),
        *_convergence_rows(facts),
        ("elapsed", wall),
        ("tasks finished", tasks or "none yet"),
    ]
    return "\n".join(f"{name + ':':<19}{value}" for name, value in rows)


def _convergence_rows(facts: dict[str, Any]) -> list[tuple[str, str]]:
    """The validation error and the exploration ratios, where the run records them."""
    rows = []
    if facts.get("validation_force_mae") is not None:
        rows.append(("validation MAE", f"{facts['validation_force_mae']:.4f} eV/Å (ensemble)"))
    ratios = facts.get("exploration") or {}
    shares = [
        f"{name} {r['accurate']:.2f} accurate, {r['candidate']:.2f} candidate, "
        f"{r['failed']:.2f} failed ({r['segments']} segments)"
        for name, r in ratios.items()
        if r.get("accurate") is not None
    ]
    if shares:
        rows.append(("exploration", "; ".join(shares)))
    return rows


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _module_order(module: str) -> int:
    from palflow.apps.contracts import MODULES

    return MODULES.index(module) if module in MODULES else len(MODULES)


# ------------------------------------------------------------------------ commands
def _status(args: argparse.Namespace) -> int:
    from palflow.pipeline.state import run_files

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
    from palflow import apps
    from palflow.pipeline.config.sites import load_site
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
    from palflow.pipeline.config.site_check import check_site

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
    from palflow.pipeline.config.starter import write_starter

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
    from palflow.pipeline.config.quick import first_look

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
