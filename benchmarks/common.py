"""What the benchmarks share: where results go and how they are written, how a table of
results is printed (:func:`print_table`), the held-out set and the run of one campaign
on a loaded site, and the skeleton of a benchmark of campaigns (:class:`CampaignBenchmark`).

Every script in this folder imports it as a sibling (``import common``): run as
``python benchmarks/x.py``, a script's own folder heads ``sys.path``. Results go to
``benchmarks/results/`` unless ``PALFLOW_BENCH_OUT`` names another folder (tests do,
so that tiny runs never overwrite the measured results).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from palflow.apps.contracts import CalculatorSpec

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("PALFLOW_BENCH_OUT", ROOT / "benchmarks" / "results"))
BENCHMARKS = ROOT / "benchmarks"


# ------------------------------------------------------------------ environment
def use_this_interpreter() -> None:
    """Put this interpreter's scripts folder (the venv's bin) first on ``PATH``: Parsl's
    HTEX starts ``interchange.py`` and ``process_worker_pool.py`` from it, even when
    the venv is not activated."""
    os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))


def workers_import_benchmarks() -> None:
    """Put this folder on ``PYTHONPATH``, for worker processes that unpickle or import
    what it defines (``delayed.Delayed``, ``delayed:RemoteSlot``)."""
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(BENCHMARKS), os.environ.get("PYTHONPATH")) if p
    )


def allow_mpi_as_root() -> None:
    """Open MPI refuses root and more ranks than cores unless told (as
    ``site_configs/laptop.py`` tells it)."""
    os.environ.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
    )


# ------------------------------------------------------------------ results
def jsonable(value: Any) -> Any:
    """``value`` with every infinite or NaN number as None (JSON has neither)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(
    name: str,
    result: Any,
    plot: Callable[[Any, Path], None] | None = None,
    *,
    finite: bool = False,
    work: Path | None = None,
) -> Path:
    """Write ``result`` as ``RESULTS/name.json`` and, with ``plot``, its figure as
    ``RESULTS/name.png``; returns the JSON's path.

    Parameters
    ----------
    finite
        Write infinite and NaN numbers as null (:func:`jsonable`).
    work
        A work folder whose path becomes ``WORK`` in the file (this machine's paths
        are no business of the results).
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    from ratios import for_json  # "never reached" in words, not null

    result = for_json(result)
    text = json.dumps(jsonable(result) if finite else result, indent=2)
    if work is not None:
        text = text.replace(str(work), "WORK")
    path = RESULTS / f"{name}.json"
    path.write_text(text)
    if plot is not None:
        plot(result, RESULTS / f"{name}.png")
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """Lay ``figure`` out tightly and save it as ``path`` at 100 dpi."""
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def rattled(base, n: int, rng, sigma: float = 0.05) -> list:
    """``n`` copies of ``base`` with Gaussian noise of ``sigma`` Å on every position."""
    frames = []
    for _ in range(n):
        atoms = base.copy()
        atoms.positions += rng.normal(0, sigma, atoms.positions.shape)
        frames.append(atoms)
    return frames


def palflow_run(site: str) -> list[str]:
    """The command that runs ``pipeline/run.py`` of this checkout on ``site``."""
    return [sys.executable, str(ROOT / "pipeline" / "run.py"), "--site", site]


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of a script's ``doc``."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


# ------------------------------------------------------------------ tables
def show(value: Any, fmt: str = "") -> str:
    """``value`` in ``fmt``, or ``-`` where it is None or NaN (a table's empty cell)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


Column = tuple[str, str, Callable[[Any], str]]
"""One column of :func:`print_table`: its header, the format spec that pads header and
cells alike (``"<22"``: left in 22 characters, ``">8"``: right in 8), and the function
that makes a row's cell."""


def print_table(columns: Sequence[Column], rows: Iterable) -> None:
    """Print a header line, then a line per row of ``rows``, every cell in its column."""
    print("".join(format(header, spec) for header, spec, _ in columns))
    for row in rows:
        print("".join(format(make(row), spec) for _, spec, make in columns))


def cell(key: str, fmt: str = "") -> Callable[[dict], str]:
    """The cell of a row (a dict) that shows its ``key`` in ``fmt`` (:func:`show`: ``-``
    where the key is missing, None or NaN)."""
    return lambda row: show(row.get(key), fmt)


def named(rows: dict[str, dict]) -> list[dict]:
    """The rows of a table keyed by name, each with its ``name``."""
    return [{**row, "name": name} for name, row in rows.items()]


def reached(row: dict) -> str:
    """The cell ``reached/runs`` of a row (the runs left-aligned in 2)."""
    return f"{row['reached']}/{row['runs']:<2}"


def span(pair: Sequence[float | None] | None, fmt: str = ".2f") -> str:
    """``[low, high]`` in ``fmt``, or ``-`` where there is no pair."""
    return f"[{show(pair[0], fmt)}, {show(pair[1], fmt)}]" if pair else "-"


# ------------------------------------------------------------------ campaigns
def commit() -> str:
    """The checkout's commit, with ``+changes to FILES`` naming the tracked files
    other than the results in ``benchmarks/results/`` that differ from it."""
    import subprocess

    def git(*words: str) -> str:
        done = subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    head = git("rev-parse", "HEAD")
    changed = git("diff", "HEAD", "--name-only", "--", ".", ":!benchmarks/results").split()
    return head + (f"+changes to {', '.join(changed)}" if changed else "")


def provenance(args: argparse.Namespace) -> dict:
    """What a results file records of how it was made, before the first measurement:
    the options, the commit (:func:`commit`) and the load average."""
    return {
        "options": dict(vars(args)),
        "commit": commit(),
        "load_average_before": list(os.getloadavg()),
    }


def held_out_set(campaign, folder: Path, n_structures: int) -> str:
    """Label the held-out MD frames once, as an extxyz file every run reads."""
    from ase.io import write

    from palflow.apps.data.dataset import read_dataset
    from palflow.apps.oracle import _oracle_md
    from palflow.pipeline.state.structures import load_start_structure

    start = folder / "start.extxyz"
    write(start, load_start_structure(campaign.system.structure, campaign.system.vacuum))
    output = folder / "test.npz"
    _oracle_md(
        str(start),
        str(output),
        CalculatorSpec.of(campaign.oracle).as_dict(),
        str(folder / "scratch"),
        n_structures,
        campaign.test.md_stride,
        campaign.generator.temperature_K,
        campaign.generator.timestep_fs,
        12345,
    )
    frames = read_dataset(output)  # labelled: energies and forces come along
    path = folder / "test.extxyz"
    write(path, frames, format="extxyz")
    return str(path)


def run_on_site(loop: Callable, campaign, root: Path, site, **options: Any) -> dict:
    """Run ``campaign`` with ``loop`` (a coordinator class, given ``options`` besides the
    site's) on the loaded ``site``, in a new run directory ``root``; return its summary."""
    from palflow.pipeline.engine.coordinator import Apps
    from palflow.pipeline.state.rundir import RunDirectory
    from palflow.pipeline.state.structures import load_start_structure

    run = RunDirectory.create(root, campaign.model_dump())
    first = campaign.all_systems()[0]
    start = load_start_structure(first.structure, first.vacuum)
    options = {**site.coordinator_options(campaign), **options}
    return loop(campaign, run, Apps.parsl(), site.slots, start, **options).run()


def budget(args, seed: int, test_file: str) -> dict:
    """The campaign overrides every run of a benchmark shares: its seed, the label
    budget and wall limit of ``args``, no final training, and the held-out set."""
    return {
        "seed": seed,
        "stop__max_labels": args.labels,
        "stop__max_wall_s": args.max_wall,
        "stop__final_training_s": 0.0,
        "test__file": test_file,
    }


def sections(**tables: dict) -> dict:
    """Campaign overrides from one table per section:
    ``sections(model={"n_rbf": 4})`` is ``{"model__n_rbf": 4}``."""
    return {
        f"{section}__{key}": value
        for section, table in tables.items()
        for key, value in table.items()
    }


def first_at_or_below(curve: list[dict], target: float) -> dict | None:
    """The first point of a learning curve whose force MAE is at or below ``target``."""
    return next((point for point in curve if point["force_mae"] <= target), None)


def curve_of(summary: dict) -> list[dict]:
    """A run's learning curve (labels, wall time, test force MAE) from its summary."""
    return [
        {"labels": e["labels"], "wall_s": e["wall_s"], "force_mae": e["force_mae"]}
        for e in summary["test_errors"]
    ]


ETHANOL = "campaign TOML (default: ethanol with GFN2-xTB)"
OPTIONS = {"max_wall_s": "max_wall"}
"""Results keys whose option is named otherwise."""


class CampaignBenchmark:
    """The skeleton of a benchmark of campaigns.

    :meth:`main` parses the options. With ``--reanalyse JSON`` it analyses the runs
    saved in JSON and prints the table (and, where :attr:`rewrite`, writes the
    results again). Otherwise it makes a work folder, loads the site (first: a site
    module may set OpenMP's environment before an oracle starts), lets
    :meth:`prepare` label what every run shares, and runs every variant of
    :meth:`variants` with every seed, interleaved, on the loaded site, one line a
    run; then it analyses, prints, and writes ``RESULTS/NAME.json`` and ``.png``.

    A script subclasses it and fills in the hooks.
    """

    name = ""
    """The results' file stem; a ``--name`` option takes its place."""
    prefix = "palflow-bench-"
    """The work folder's prefix."""
    defaults: dict = {}
    """Defaults of the common options: ``seeds``, ``labels``, ``max_wall``,
    ``test_structures`` (with ``test_help``), ``campaign`` (with ``campaign_help``),
    ``site``."""
    finite = False
    """Write infinite and NaN numbers as null."""
    analysis: Callable[[list[dict], Any], dict]
    """``analysis(runs, args.ANALYSED_WITH)``: the analysed table of the runs."""
    analysed_with = "target"
    report: Callable[[dict], None]
    """Print the analysed table."""
    line = ""
    """One line about a finished run, formatted with the run's fields."""
    recorded: tuple[str, ...] = ("site", "labels", "seeds")
    """The options the results file records (``max_wall_s``: ``--max-wall``)."""
    rewrite = False
    """``--reanalyse`` writes the results again."""

    def __init__(self, doc: str) -> None:
        self.parser = parser(doc)
        self.test_file = ""
        self.started = 0.0
        get = {"seeds": [0, 1, 2], "test_structures": 32, "site": "laptop.py"} | self.defaults
        option = self.parser.add_argument
        option("--seeds", nargs="+", type=int, default=get["seeds"])
        option("--site", default=get["site"])
        option("--campaign", default=get.get("campaign"), help=get.get("campaign_help"))
        option("--labels", type=int, default=get["labels"], help="label budget of every run")
        option("--max-wall", type=float, default=get["max_wall"], help="wall limit per run, s")
        test_help = get.get("test_help", "held-out frames")
        option("--test-structures", type=int, default=get["test_structures"], help=test_help)
        option("--reanalyse", metavar="JSON", help="no runs: analyse the runs saved in JSON")
        option(
            "--rule",
            default="",
            help="how the targets and budgets were fixed before the runs (in the protocol)",
        )
        self.arguments(self.parser)

    # ---------------------------------------------------------- hooks
    def arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the script's own options."""

    def parse(self, argv: list[str] | None) -> argparse.Namespace:
        return self.parser.parse_args(argv)

    def prepare(self, args: argparse.Namespace, work: Path, site) -> None:
        """Label what every run shares; by default the held-out set of ``--campaign``."""
        from palflow.pipeline.config.settings import load_campaign

        self.test_file = held_out_set(load_campaign(args.campaign), work, args.test_structures)

    def variants(self, args: argparse.Namespace, seed: int, runs: list[dict]) -> Iterable:
        """What runs with ``seed``, in order (``runs``: those done so far)."""
        return args.variants

    def run(self, args: argparse.Namespace, site, work: Path, variant, seed: int) -> dict:
        raise NotImplementedError

    def describe(self, run: dict) -> str:
        """One line about a finished run."""
        return self.line.format(**run)

    def analyse(self, runs: list[dict], args: argparse.Namespace) -> dict:
        return self.analysis(runs, getattr(args, self.analysed_with))

    def metadata(self, args: argparse.Namespace, site) -> dict:
        """What the results file says about the runs' settings: :attr:`recorded`."""
        return {key: getattr(args, OPTIONS.get(key, key)) for key in self.recorded}

    def protocol(self, args: argparse.Namespace) -> dict:
        """What the results file states before the first run (held-out sets, seeds,
        budgets, variants, targets): by default the options of :attr:`recorded`."""
        return CampaignBenchmark.metadata(self, args, None)

    plot: Callable[[dict, Path], None] | None = None

    def write(self, args: argparse.Namespace, result: dict, work: Path | None = None) -> None:
        """Write the results file and figure (``work``: the run's work folder)."""
        name = getattr(args, "name", None) or self.name
        plot = self.plot if "runs" in result else None  # not for the protocol alone
        write_results(name, result, plot, finite=self.finite, work=work)

    # ---------------------------------------------------------- skeleton
    def main(self, argv: list[str] | None = None) -> None:
        args = self.parse(argv)
        if args.reanalyse:
            saved = json.loads(Path(args.reanalyse).read_text())
            result = self.analyse(saved["runs"], args)
            if self.rewrite:
                saved.update(result)
                result = saved
            self.report(result)
            if self.rewrite:
                self.write(args, result)
            return

        import parsl

        from palflow.pipeline.config.sites import load_site, warm_up

        self.started = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=self.prefix))
        print(f"runs in {work}", flush=True)
        site = load_site(args.site)
        site.config.run_dir = str(work / "parsl")
        self.prepare(args, work, site)
        protocol = self.protocol(args)
        protocol |= {"rule": args.rule, "load_average_before": list(os.getloadavg())}
        protocol["commit"] = commit()
        self.write(args, {"status": "running", "protocol": protocol})  # before any run
        runs: list[dict] = []
        with parsl.load(site.config):
            warm_up(site.slots)
            for seed in args.seeds:
                for variant in self.variants(args, seed, runs):
                    runs.append(self.run(args, site, work, variant, seed))
                    print(self.describe(runs[-1]), flush=True)
                    # Every finished run is on disk at once: a run cut short keeps them.
                    so_far = {"status": "running", "protocol": protocol, "done": runs}
                    self.write(args, so_far, work)
        result = self.analyse(runs, args)
        self.report(result)
        result.update(self.metadata(args, site))
        result.update(status="finished", protocol=protocol, runs=runs)
        result["load_average_after"] = list(os.getloadavg())
        self.write(args, result, work)
