"""Uncertainty against random selection, scored on held-out sets that need extrapolation.

    python benchmarks/extrapolation.py --seeds 0 1 2 3 4 --labels 64 --pace 8 --max-wall 300

EMT copper (``examples/cu_emt.toml``: a Cu13 cluster, walkers at 800 K), one label
budget, paced (``selection.max_labels_per_version``), the streaming coordinator on
one site (default ``laptop.py``), every strategy with every seed, interleaved (the
order reversed on odd seeds). Four held-out sets, labelled once by EMT before the
runs (``extrapolation_sets.py``): ``same`` (oracle MD at 800 K, the in-distribution
control and the campaigns' ``test.file``), ``hot`` (1600 K), ``strain`` (the cluster
scaled 0.85-1.15, single atoms pulled out) and ``other_phase`` (periodic bulk fcc and
a (111) slab). With ``--campaign`` another system (the default campaign's ethanol,
say), ``torsion`` (rigid rotations about each rotatable bond) takes the place of
``other_phase``. After each run, every saved ensemble version is scored on every
set: a learning curve (labels to test force MAE) per run and set. Every strategy is
compared with random seed by seed (``ratios.py``; ``--seeds``, default ten):

- **primary** (named before the runs, :data:`PRIMARY`): ``max force spread`` over
  ``random``, the paired ratio of learning-curve areas. Per seed and set, the
  geometric-mean force MAE over the labels both runs cover (the area under log error
  against labels); the seed's ratio is the geometric mean over the sets other than
  ``same``. Median over seeds, bootstrap 95% interval (10,000 resamples of the
  seeds), exact Wilcoxon signed-rank p;
- **secondary**, per strategy and set: the same area ratio, and the labels to the
  set's target force MAE (only where ``--target`` fixed one before the runs: a value,
  never a figure of these runs) with the share of seeds that reached it. A run that
  never reaches a target is censored, never dropped (``ratios.py``'s rule). Their
  Wilcoxon p are corrected together (Holm);
- for every run, the MD frames scored, the fraction at or below the selection
  threshold then in force (frames the threshold filtered out), and the threshold.

The ``calibrated threshold`` strategy is not in the default list: it calibrates on the
campaign's held-out set, which is also the scored ``same`` set.

The protocol (sets, seeds, budgets, strategies, targets, the primary comparison) is
written into the results file before the first run.

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
    show,
    span,
)
from extrapolation_sets import SETS, build_sets, evaluate_versions, run_recorded
from ratios import Cost, area_ratio, compare, held_to, holm, median, words

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
DEFAULT = [name for name in STRATEGIES if name not in ("energy spread", "calibrated threshold")]
"""Energy spread has its own units; the calibrated threshold is fitted on the scored
``same`` set (a leak)."""
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
        "initial_labels": summary["initial_labels"],
        "wall_s": summary["wall_s"],
        "evaluation_s": time.perf_counter() - t0,
        "stop_reason": summary["stop_reason"],
        "selection": selection,
        "curves": curves,
    }


PRIMARY = ("max force spread", "random")
"""The primary comparison, named before the runs: the default strategy against random,
by the paired ratio of learning-curve areas on the sets that need extrapolation."""


def curve_points(run: dict, name_set: str) -> list[tuple[float, float]]:
    """The run's learning curve on one set, its last error held to the run's labels."""
    points = [(p["labels"], p["force_mae"]) for p in run["curves"][name_set]]
    return held_to(points, run.get("labels", 0))


def pair_area_ratio(mine: dict | None, theirs: dict | None, name_set: str) -> float | None:
    """``mine``'s geometric-mean force MAE over ``theirs``' on the labels both cover;
    None where either run is missing or the window is empty."""
    if mine is None or theirs is None:
        return None
    return area_ratio(curve_points(mine, name_set), curve_points(theirs, name_set))


def labels_to(run: dict, name_set: str, target: float) -> Cost:
    """All the labels (the initial ones too) of the run's first version at or below
    ``target``; censored at all the labels it had when it never got there."""
    initial = run.get("initial_labels", 0)
    point = first_at_or_below(run["curves"][name_set], target)
    if point is None:
        return Cost.never(
            float(max(run.get("labels", 0), run["curves"][name_set][-1]["labels"]) + initial)
        )
    return Cost(float(point["labels"] + initial))


def analyse(runs: list[dict], targets: dict[str, float] | None = None) -> dict:
    """Every strategy against random, seed by seed (:mod:`ratios`).

    - ``primary``: :data:`PRIMARY`; per seed, the geometric mean over the sets other
      than ``same`` of the paired area ratio; its median, bootstrap interval and
      Wilcoxon p.
    - ``secondary``: per strategy and set, the area ratio and, for the sets with a
      target fixed before the runs (``targets``), the labels-to-target ratio with the
      share of seeds that reached it; their Wilcoxon p corrected together (Holm).
    - ``rows``: per strategy and set, medians over seeds.
    """
    targets = dict(targets or {})
    strategies = list(dict.fromkeys(r["strategy"] for r in runs))
    sets = list(runs[0]["curves"]) if runs else []
    by = {(r["strategy"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    table: dict = {"targets": targets, "rows": {}, "secondary": {}, "primary": None}
    baseline = PRIMARY[1]
    for name in strategies:
        mine_runs = [r for r in runs if r["strategy"] == name]
        for name_set in sets:
            row = table["rows"].setdefault(name, {})[name_set] = {
                "runs": len(mine_runs),
                "median_final_force_mae": median(
                    [r["curves"][name_set][-1]["force_mae"] for r in mine_runs]
                ),
            }
            if name_set in targets:
                costs = [labels_to(r, name_set, targets[name_set]) for r in mine_runs]
                row["reached"] = sum(c.reached for c in costs) / len(costs)
                row["median_labels_to_target"] = median(
                    [c.value if c.reached else math.inf for c in costs]
                )
            if name == baseline or baseline not in strategies:
                continue
            comparisons = table["secondary"].setdefault(name, {}).setdefault(name_set, {})
            comparisons["area_ratio"] = compare(
                {
                    s: pair_area_ratio(by.get((name, s)), by.get((baseline, s)), name_set)
                    for s in seeds
                },
                dict.fromkeys(seeds, 1.0),
            )
            if name_set in targets:
                comparisons["labels_ratio"] = compare(
                    {
                        s: labels_to(by[(name, s)], name_set, targets[name_set])
                        for s in seeds
                        if (name, s) in by
                    },
                    {
                        s: labels_to(by[(baseline, s)], name_set, targets[name_set])
                        for s in seeds
                        if (baseline, s) in by
                    },
                )
    family = {
        (name, name_set, measure): result["wilcoxon_p"]
        for name, per_set in table["secondary"].items()
        for name_set, measures in per_set.items()
        for measure, result in measures.items()
    }
    for key, adjusted in holm(family).items():
        name, name_set, measure = key
        table["secondary"][name][name_set][measure]["holm_p"] = adjusted
    mine, theirs = PRIMARY
    extrapolating = [name_set for name_set in sets if name_set != "same"]
    if mine in strategies and theirs in strategies and extrapolating:
        per_seed = {}
        for seed in seeds:
            ratios = [
                pair_area_ratio(by.get((mine, seed)), by.get((theirs, seed)), n)
                for n in extrapolating
            ]
            per_seed[seed] = None if None in ratios else float(np.exp(np.mean(np.log(ratios))))
        table["primary"] = {
            "comparison": f"{mine} / {theirs}: geometric-mean force MAE over the labels both "
            f"runs cover, geometric mean over the sets {', '.join(extrapolating)}",
            **compare(per_seed, dict.fromkeys(seeds, 1.0)),
        }
    table["selection"] = {}
    for name in strategies:
        rs = [r for r in runs if r["strategy"] == name]
        row = table["selection"][name] = {}
        for key in ("frames_scored", "fraction_below_threshold", "frames_picked"):
            row[key] = statistics.median(r["selection"][key] or 0 for r in rs)
        fractions = [r["selection"]["fraction_below_threshold"] or 0 for r in rs]
        row["fraction_below_range"] = [min(fractions), max(fractions)]
        thresholds = [r["selection"]["threshold_median"] for r in rs]
        row["threshold_median"] = None if None in thresholds else statistics.median(thresholds)
    return table


def print_tables(table: dict) -> None:
    primary = table.get("primary")
    if primary:
        low, high = primary["interval_95"]
        print(
            f"primary: {primary['comparison']}\n  median ratio {words(primary['median'])} "
            f"[{words(low)}, {words(high)}] over {primary['seeds']} seeds, "
            f"Wilcoxon p {show(primary['wilcoxon_p'], '.3f')}"
        )
    columns = [
        ("strategy", "<22", cell("name")),
        ("final", ">8", cell("median_final_force_mae", ".4f")),
        ("labels", ">8", cell("median_labels_to_target", ".0f")),
        ("reached", ">8", cell("reached", ".2f")),
        ("area / random [95%]", ">26", cell("area")),
        ("labels / random [95%]", ">26", cell("labels")),
        ("Holm p", ">14", cell("holm")),
    ]
    sets = list(next(iter(table["rows"].values()), {}))
    for name_set in sets:
        target = table["targets"].get(name_set)
        heading = f"target {target:.4f} eV/Å" if target else "no target fixed before the runs"
        print(f"\n{name_set}: {heading}")
        rows = []
        for name, by_set in table["rows"].items():
            measures = table["secondary"].get(name, {}).get(name_set, {})
            row = {**by_set[name_set], "name": name}
            for key, measure in (("area", "area_ratio"), ("labels", "labels_ratio")):
                if measure in measures:
                    found = measures[measure]
                    low, high = found["interval_95"]
                    row[key] = f"{words(found['median'])} [{words(low)}, {words(high)}]"
            holm_p = [
                measures[m].get("holm_p") for m in ("area_ratio", "labels_ratio") if m in measures
            ]
            row["holm"] = " ".join(show(p, ".3f") for p in holm_p) or None
            rows.append(row)
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
    sets = list(result["runs"][0]["curves"]) if result["runs"] else []
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
            middle = np.median([_on_grid(c, grid) for c in curves], axis=0)
            axis.plot(grid, middle, color=colours[name], linewidth=2.2, label=name)
        if name_set in result["targets"]:
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
    defaults = {"seeds": list(range(10)), "labels": 64, "max_wall": 300.0}
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
        # Alternate the order seed by seed: the first run of a session is the slowest.
        return args.strategies if seed % 2 == 0 else args.strategies[::-1]

    def run(self, args, site, work: Path, variant: str, seed: int) -> dict:
        return run_strategy(variant, seed, args, site, work, self.sets)

    def describe(self, run: dict) -> str:
        finals = ", ".join(f"{s} {c[-1]['force_mae']:.3f}" for s, c in run["curves"].items())
        return (
            f"{run['strategy']:<22} seed {run['seed']}: {run['labels']} labels in "
            f"{run['wall_s']:.0f} s (+{run['evaluation_s']:.0f} s scoring), final MAE {finals}"
        )

    def protocol(self, args) -> dict:
        sets = {
            name: {k: v for k, v in info.items() if k not in ("path", "extxyz")}
            for name, info in self.sets.items()
        }
        return {
            "campaign": os.path.relpath(args.campaign, ROOT),
            "sets": sets,
            "seeds": args.seeds,
            "labels": args.labels,
            "pace": args.pace,
            "max_wall_s": args.max_wall,
            "site": args.site,
            "strategies": args.strategies,
            "targets": args.targets,
            "primary": {"mine": PRIMARY[0], "theirs": PRIMARY[1], "sets": "all but same"},
        }

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
        super().write(args, result, work)
        if work is not None and "total_wall_s" in result:
            print(f"total {result['total_wall_s']:.0f} s")


if __name__ == "__main__":
    Extrapolation(__doc__).main()
