"""Uncertainty against random selection, scored on held-out sets that need extrapolation.

    python benchmarks/extrapolation.py --seeds 0 1 2 3 4 --labels 64 --pace 8 --max-wall 300

EMT copper (``examples/cu_emt.toml``: a Cu13 cluster, walkers at 800 K), one label
budget, paced (``selection.max_labels_per_version``), the streaming coordinator on
one site (default ``laptop.py``), every strategy with every seed, interleaved. Four
held-out sets, labelled once by EMT before the runs (``extrapolation_sets.py``):
``same`` (oracle MD at 800 K, the in-distribution control and the campaigns'
``test.file``), ``hot`` (1600 K), ``strain`` (the cluster scaled 0.85-1.15, single
atoms pulled out) and ``other_phase`` (periodic bulk fcc and a (111) slab). With
``--campaign`` another system (the default campaign's ethanol, say), ``torsion`` (rigid
rotations about each rotatable bond) takes the place of ``other_phase``. After each
run, every saved ensemble version is scored on every set: a learning curve (labels
to test force MAE) per run and set. Per strategy and set:

- the learning-curve area: the mean force MAE over the label range (eV/Å);
- the labels at the first version at or below the set's target MAE (default: the
  largest of the strategies' median final MAEs on that set, so that typical runs
  get there; ``--target X`` or ``--target SET=X``), median over seeds;
- the ratio of that median to random's, with a bootstrap 95% interval: seeds
  resampled with replacement (paired: one draw of seeds for both strategies), 2000
  resamples, RNG seed 0. A run that never reaches the target needs infinitely many
  labels (an infinite ratio or bound is written as null); two that need none, 1;
- for every run, the MD frames scored, the fraction at or below the selection
  threshold then in force (frames the threshold filtered out), and the threshold.

Writes ``benchmarks/results/NAME.json`` (``--name``, default ``extrapolation``; run
folders as ``WORK/...``) and ``NAME.png`` (learning curves, one panel per set: seeds
faint, the median over seeds bold). ``--quick`` is a tiny run for tests;
``--reanalyse JSON`` recomputes the tables from a saved file.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

import common
import numpy as np
from common import (
    ROOT,
    cell,
    first_at_or_below,
    jsonable,  # noqa: F401 (for tests)
    named,
    reached,
    show,
    span,
)
from extrapolation_sets import SETS, build_sets, evaluate_versions, run_recorded
from ratios import bootstrap_ratio, median_inf

from palflow.pipeline.policies.metrology import learning_curve_area

common.use_this_interpreter()

CAMPAIGN = ROOT / "examples" / "cu_emt.toml"
STRATEGIES = {
    "max force spread": {},
    "calibrated threshold": {"selection__threshold_mode": "calibrated"},
    "percentile threshold": {"selection__threshold_mode": "percentile"},
    "coreset": {"selection__query": "coreset"},
    "thompson": {"selection__measure": "thompson"},
    "energy spread": {"selection__measure": "energy_spread", "selection__threshold": 0.002},
    "random": {"selection__measure": "random"},
}
"""Campaign overrides per strategy (the energy spread is in eV/atom: its own threshold)."""
DEFAULT = [name for name in STRATEGIES if name != "energy spread"]
QUICK = {
    "model__n_features": 16,
    "model__n_rbf": 8,
    "training__epochs_per_task": 4,
    "training__min_task_s": 0.5,
    "generator__steps_per_task": 40,
    "generator__n_walkers": 2,
    "initial__n_structures": 4,
}
"""A tiny campaign for ``--quick``."""


def run_strategy(name: str, seed: int, args, site, work: Path, sets: dict) -> dict:
    from palflow.pipeline.config.settings import load_campaign

    campaign = load_campaign(
        args.campaign,
        selection__max_labels_per_version=args.pace,
        **common.budget(args, seed, sets["same"]["extxyz"]),
        **(QUICK if args.quick else {}),
        **STRATEGIES[name],
    )
    folder = f"{name.replace(' ', '_')}-seed{seed}"
    summary, selection = run_recorded(campaign, work / folder, site)
    t0 = time.perf_counter()
    curves = evaluate_versions(work / folder, sets)
    return {
        "strategy": name,
        "seed": seed,
        "run_dir": f"WORK/{folder}",
        "labels": summary["labels"],
        "wall_s": summary["wall_s"],
        "evaluation_s": time.perf_counter() - t0,
        "stop_reason": summary["stop_reason"],
        "selection": selection,
        "curves": curves,
    }


def analyse(runs: list[dict], targets: dict[str, float] | None = None) -> dict:
    """Per set: the target; per strategy and set: medians over seeds of the area,
    labels to the target and final MAE, and the labels ratio against random."""
    targets = dict(targets or {})
    strategies = list(dict.fromkeys(r["strategy"] for r in runs))
    by_name = {n: [r for r in runs if r["strategy"] == n] for n in strategies}
    sets = [s for s in SETS if all(s in r["curves"] for r in runs)]
    table: dict = {"targets": {}, "rows": {}, "labels_ratio_vs_random": {}}
    for name_set in sets:
        target = targets.get(name_set)
        if target is None:
            target = max(
                statistics.median(r["curves"][name_set][-1]["force_mae"] for r in rs)
                for rs in by_name.values()
            )
        table["targets"][name_set] = target
        needed = {}
        for name, strategy_runs in by_name.items():
            hits = {}
            for run in strategy_runs:
                point = first_at_or_below(run["curves"][name_set], target)
                hits[run["seed"]] = math.inf if point is None else float(point["labels"])
            needed[name] = hits
            curves = [run["curves"][name_set] for run in strategy_runs]
            areas = [
                learning_curve_area([p["labels"] for p in c], [p["force_mae"] for p in c])
                for c in curves
            ]
            areas = [a for a in areas if a is not None]
            table["rows"].setdefault(name, {})[name_set] = {
                "runs": len(strategy_runs),
                "reached": sum(math.isfinite(h) for h in hits.values()),
                "median_labels_to_target": median_inf(list(hits.values())),
                "median_learning_curve_area": statistics.median(areas) if areas else None,
                "median_final_force_mae": statistics.median(c[-1]["force_mae"] for c in curves),
            }
        if "random" in needed:
            for name, hits in needed.items():
                table["labels_ratio_vs_random"].setdefault(name, {})[name_set] = bootstrap_ratio(
                    hits, needed["random"]
                )
    table["selection"] = {}
    for name, rs in by_name.items():
        row = table["selection"][name] = {}
        for key in ("frames_scored", "fraction_below_threshold", "frames_picked"):
            row[key] = statistics.median(r["selection"][key] or 0 for r in rs)
        fractions = [r["selection"]["fraction_below_threshold"] or 0 for r in rs]
        row["fraction_below_range"] = [min(fractions), max(fractions)]
        thresholds = [r["selection"]["threshold_median"] for r in rs]
        row["threshold_median"] = None if None in thresholds else statistics.median(thresholds)
    return table


def print_tables(table: dict) -> None:
    columns = [
        ("strategy", "<22", cell("name")),
        ("area", ">8", cell("median_learning_curve_area", ".4f")),
        ("final", ">8", cell("median_final_force_mae", ".4f")),
        ("labels", ">8", cell("median_labels_to_target", ".0f")),
        ("reached", ">9", reached),
        ("ratio vs random [95% CI]", ">28", cell("ratio")),
    ]
    for name_set, target in table["targets"].items():
        print(f"\n{name_set}: target test force MAE {target:.4f} eV/Å")
        rows = []
        for name, by_set in table["rows"].items():
            ratio = table["labels_ratio_vs_random"].get(name, {}).get(name_set)
            interval = (
                f"{show(ratio['median_ratio'], '.2f')} {span(ratio['ci95'])}" if ratio else None
            )
            rows.append({**by_set[name_set], "name": name, "ratio": interval})
        common.print_table(columns, rows)
    print("\nMD frames scored, and the share at or below the threshold then in force")
    columns = [
        ("strategy", "<22", cell("name")),
        ("frames", ">8", cell("frames_scored", ".0f")),
        ("below", ">8", cell("fraction_below_threshold", ".2f")),
        ("[min, max]", ">16", lambda row: span(row["fraction_below_range"])),
        ("picked", ">8", cell("frames_picked", ".0f")),
        ("threshold", ">11", cell("threshold_median", ".4f")),
    ]
    common.print_table(columns, named(table["selection"]))


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    names = list(result["rows"])
    colours = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    sets = list(result["targets"])
    columns = min(2, len(sets))
    rows = math.ceil(len(sets) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    for axis, name_set in zip(axes.flat, sets, strict=False):
        for name in names:
            curves = [r["curves"][name_set] for r in result["runs"] if r["strategy"] == name]
            for curve in curves:
                x, y = [p["labels"] for p in curve], [p["force_mae"] for p in curve]
                axis.plot(x, y, color=colours[name], alpha=0.35, linewidth=0.8)
            top = min(max(p["labels"] for p in c) for c in curves)
            grid = np.linspace(0, top, 40)
            median = np.median([_on_grid(c, grid) for c in curves], axis=0)
            axis.plot(grid, median, color=colours[name], linewidth=2.2, label=name)
        axis.axhline(result["targets"][name_set], color="grey", linestyle=":", label="target")
        axis.set_yscale("log")
        axis.set_title(name_set)
        axis.set_xlabel("active-learning labels")
        axis.set_ylabel("test force MAE, eV/Å")
    axes[0][0].legend(fontsize=7)
    common.save_figure(figure, path)


def _on_grid(curve: list[dict], grid: np.ndarray) -> np.ndarray:
    """The curve's MAE on ``grid`` (linear in labels; the newest version per label count)."""
    newest = {p["labels"]: p["force_mae"] for p in curve}
    x = np.array(sorted(newest), dtype=float)
    return np.interp(grid, x, [newest[k] for k in sorted(newest)])


def parse_targets(given: list[str] | None) -> dict[str, float]:
    targets: dict[str, float] = {}
    for item in given or []:
        name, _, value = item.rpartition("=")
        if name and name not in SETS:
            raise ValueError(f"--target {item}: no set {name!r} (sets: {', '.join(SETS)})")
        for name_set in [name] if name else SETS:
            targets[name_set] = float(value)
    return targets


class Extrapolation(common.CampaignBenchmark):
    """Every strategy with every seed, each run scored on every held-out set."""

    name, prefix, finite = "extrapolation", "palflow-extrapolation-", True
    defaults = {"seeds": [0, 1, 2, 3, 4], "labels": 64, "max_wall": 300.0}
    defaults |= {"campaign": str(CAMPAIGN), "campaign_help": "campaign TOML (default: Cu13, EMT)"}
    defaults |= {"test_structures": 24, "test_help": "frames per set"}
    analysis, report, plot = staticmethod(analyse), staticmethod(print_tables), staticmethod(plot)
    analysed_with = "targets"

    def arguments(self, parser) -> None:
        option = parser.add_argument
        option("--strategies", nargs="+", default=DEFAULT, choices=STRATEGIES)
        option("--pace", type=int, default=8, help="labels per ensemble version")
        option("--hot", type=float, default=1600.0, help="the hot set's MD, K")
        option("--target", nargs="+", metavar="[SET=]MAE", help="force MAE, eV/Å (all sets or one)")
        option("--name", default=self.name, help="results file stem (benchmarks/results/NAME.*)")
        option("--quick", action="store_true", help="a tiny run (tests)")

    def parse(self, argv: list[str] | None):
        args = super().parse(argv)
        try:
            args.targets = parse_targets(args.target)
        except ValueError as error:
            self.parser.error(str(error))
        if args.quick and not args.reanalyse:
            args.site, args.labels, args.pace, args.test_structures = "threads.py", 8, 4, 4
            given = sys.argv if argv is None else argv
            args.seeds = args.seeds[:2] if "--seeds" in given else [0, 1]
            if "--strategies" not in given:
                args.strategies = ["max force spread", "random"]
        return args

    def prepare(self, args, work: Path, site) -> None:
        self.sets = build_sets(args.campaign, work, args.test_structures, args.hot)
        for name_set, info in self.sets.items():
            print(
                f"set {name_set:<12} {info['n_structures']:>3} frames, mean |F| "
                f"{info['mean_abs_force']:.3f} eV/Å: {info['description']}",
                flush=True,
            )

    def variants(self, args, seed: int, runs: list[dict]) -> list[str]:
        return args.strategies

    def run(self, args, site, work: Path, variant: str, seed: int) -> dict:
        return run_strategy(variant, seed, args, site, work, self.sets)

    def describe(self, run: dict) -> str:
        finals = ", ".join(f"{s} {c[-1]['force_mae']:.3f}" for s, c in run["curves"].items())
        return (
            f"{run['strategy']:<22} seed {run['seed']}: {run['labels']} labels in "
            f"{run['wall_s']:.0f} s (+{run['evaluation_s']:.0f} s scoring), final MAE {finals}"
        )

    def metadata(self, args, site) -> dict:
        for info in self.sets.values():
            info.pop("path"), info.pop("extxyz")
        return {
            "campaign": os.path.relpath(args.campaign, ROOT),
            "site": args.site,
            "labels": args.labels,
            "pace": args.pace,
            "max_wall_s": args.max_wall,
            "seeds": args.seeds,
            "quick": args.quick,
            "total_wall_s": time.perf_counter() - self.started,
            "sets": self.sets,
        }

    def write(self, args, result: dict, work: Path | None = None) -> None:
        """The results with the work folder as ``WORK``, and the total wall time."""
        common.write_results(args.name, result, plot, finite=True, work=work)
        if work is not None:
            print(f"total {result['total_wall_s']:.0f} s")


if __name__ == "__main__":
    Extrapolation(__doc__).main()
