"""Selection strategies compared on the default system: learning-curve area and
labels to a target MAE.

    python benchmarks/strategies.py --seeds 0 1 2

GFN2-xTB on ethanol, the default campaign with one label budget, the streaming
coordinator on one site (default ``laptop.py``), every strategy with every seed,
interleaved. Every run is scored on one held-out set labelled before the runs
(see ``time_to_accuracy.py``). Per strategy, medians over seeds of:

- against random, seed by seed (``ratios.py``): the paired ratio of geometric-mean
  test force MAE over the labels both runs cover (lower is better), its bootstrap
  interval and Wilcoxon p, Holm-corrected over the strategies;
- the labels at the first version at or below the target MAE, where ``--target``
  fixed one before the runs (never a figure of these runs); a run that never got
  there counts as never (``ratios.median``), and ``reached`` counts those that did;
- the final MAE, and the uncertainty's Spearman rho on the held-out set.

Writes ``benchmarks/results/strategies.json`` and ``.png``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import common
from common import cell, first_at_or_below, named, reached, run_on_site
from ratios import area_ratio, compare, held_to, holm, median, words

common.use_this_interpreter()

STRATEGIES = {
    "max force spread": {},
    "energy spread": {"selection__measure": "energy_spread", "selection__threshold": 0.002},
    "thompson": {"selection__measure": "thompson"},
    "hybrid 60/40 random": {"selection__random_fraction": 0.4},
    "coreset": {"selection__query": "coreset"},
    "random": {"selection__measure": "random"},
}
"""Campaign overrides per strategy; the energy spread is in eV/atom, hence its own
threshold."""


def run_strategy(name: str, seed: int, args, site, work: Path, test_file: str) -> dict:
    from palflow.pipeline.config.settings import load_campaign
    from palflow.pipeline.engine.coordinator import Coordinator

    campaign = load_campaign(
        args.campaign,
        selection__max_labels_per_version=args.pace,
        **common.budget(args, seed, test_file),
        **STRATEGIES[name],
    )
    root = work / f"{name.replace(' ', '_').replace('/', '-')}-seed{seed}"
    summary = run_on_site(Coordinator, campaign, root, site)
    errors = summary["test_errors"]
    return {
        "strategy": name,
        "seed": seed,
        "labels": summary["labels"],
        "wall_s": summary["wall_s"],
        "learning_curve_area": summary["learning_curve_area"] or float("nan"),
        "final_force_mae": errors[-1]["force_mae"] if errors else float("nan"),
        "final_uncertainty_spearman": errors[-1].get("uncertainty_spearman") if errors else None,
        "curve": [{"labels": e["labels"], "force_mae": e["force_mae"]} for e in errors],
    }


def area_cell(row: dict) -> str:
    found = row.get("area_over_random")
    if not found:
        return "-"
    low, high = found["interval_95"]
    return f"{words(found['median'])} [{words(low)}, {words(high)}]"


def print_table(table: dict) -> None:
    target = table["target_force_mae"]
    print(
        f"target test force MAE {target:.4f} eV/Å" if target else "no target fixed before the runs"
    )
    columns = [
        ("strategy", "<22", cell("name")),
        ("area / random [95%]", ">24", area_cell),
        ("labels to target", ">18", cell("median_labels_to_target", "g")),
        ("reached", ">9", reached),
        ("final MAE", ">11", cell("median_final_force_mae", ".4f")),
        ("rho", ">7", cell("median_uncertainty_spearman", ".2f")),
    ]
    common.print_table(columns, named(table["rows"]))


def area_over_random(mine: dict | None, theirs: dict | None) -> float | None:
    """Paired ratio of geometric-mean test force MAE over the labels both runs cover,
    each curve held at its last error to its run's labels; None where either run has
    no curve (the strategy's seed is then lost)."""
    if not (mine and theirs):
        return None
    mine_points, theirs_points = (
        held_to([(p["labels"], p["force_mae"]) for p in r["curve"]], r["labels"])
        for r in (mine, theirs)
    )
    return area_ratio(mine_points, theirs_points)


def analyse(runs: list[dict], target: float | None) -> dict:
    """Medians per strategy (in the order the runs came); each strategy against random
    seed by seed (:mod:`ratios`), by the paired area ratio (their p corrected together
    by Holm); labels to the target where one was fixed before the runs."""
    names = dict.fromkeys(r["strategy"] for r in runs)
    by_name = {n: [r for r in runs if r["strategy"] == n] for n in names}
    by = {(r["strategy"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    rows = {}
    for name, strategy_runs in by_name.items():
        points = [first_at_or_below(r["curve"], target) for r in strategy_runs if target]
        hits = [math.inf if p is None else p["labels"] for p in points]  # never: censored
        rhos = [r["final_uncertainty_spearman"] for r in strategy_runs]
        rhos = [r for r in rhos if r is not None]
        rows[name] = {
            "runs": len(strategy_runs),
            "reached": sum(math.isfinite(h) for h in hits) if target else None,
            "median_labels_to_target": median(hits) if hits else None,
            "median_final_force_mae": median([r["final_force_mae"] for r in strategy_runs]),
            "median_uncertainty_spearman": statistics.median(rhos) if rhos else None,
        }
        if name != "random" and "random" in by_name:
            rows[name]["area_over_random"] = compare(
                {s: area_over_random(by.get((name, s)), by.get(("random", s))) for s in seeds},
                dict.fromkeys(seeds, 1.0),
            )
    adjusted = holm(
        {n: r["area_over_random"]["wilcoxon_p"] for n, r in rows.items() if "area_over_random" in r}
    )
    for name, p_value in adjusted.items():
        rows[name]["area_over_random"]["holm_p"] = p_value
    return {"target_force_mae": target, "rows": rows}


def plot(table: dict, path: Path) -> None:
    plt = common.pyplot()
    names = list(table["rows"])
    colours = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    figure, (curves, areas) = plt.subplots(1, 2, figsize=(12, 4.5))
    seen = set()
    for run in table["runs"]:
        name = run["strategy"]
        curve = run["curve"]
        curves.plot(
            [p["labels"] for p in curve],
            [p["force_mae"] for p in curve],
            color=colours[name],
            alpha=0.7,
            label=None if name in seen else name,
        )
        seen.add(name)
    if table["target_force_mae"]:
        curves.axhline(table["target_force_mae"], color="grey", linestyle=":", label="target")
    curves.set_yscale("log")
    curves.set_xlabel("active-learning labels")
    curves.set_ylabel("test force MAE, eV/Å")
    curves.legend(fontsize=8)
    shown = [n for n in names if "area_over_random" in table["rows"][n]]
    medians = [table["rows"][n]["area_over_random"]["median"] for n in shown]
    areas.bar(
        shown, [m if math.isfinite(m) else 0.0 for m in medians], color=[colours[n] for n in shown]
    )
    areas.axhline(1.0, color="grey", linestyle=":")
    areas.set_ylabel("area / random's (median of paired ratios)")
    areas.tick_params(axis="x", rotation=30)
    common.save_figure(figure, path)


class Strategies(common.CampaignBenchmark):
    """Every strategy with every seed, scored on one held-out set."""

    analysis, report, plot = staticmethod(analyse), staticmethod(print_table), staticmethod(plot)
    name, prefix, finite = "strategies", "palflow-strategies-", True
    defaults = {"labels": 80, "max_wall": 400.0, "campaign_help": common.ETHANOL}
    line = (
        "{strategy:<22} seed {seed}: {labels} labels in {wall_s:.0f} s, "
        "area {learning_curve_area:.4f}, final MAE {final_force_mae:.4f} eV/Å"
    )

    def arguments(self, parser) -> None:
        parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
        parser.add_argument("--pace", type=int, default=8, help="labels per ensemble version")
        parser.add_argument("--target", type=float, help="target test force MAE, eV/Å")

    def variants(self, args, seed: int, runs: list[dict]) -> list[str]:
        return args.strategies

    def run(self, args, site, work: Path, variant: str, seed: int) -> dict:
        return run_strategy(variant, seed, args, site, work, self.test_file)


if __name__ == "__main__":
    Strategies(__doc__).main()
