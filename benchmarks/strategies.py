"""Selection strategies compared on the default system: learning-curve area and
labels to a target MAE.

    python benchmarks/strategies.py --seeds 0 1 2

GFN2-xTB on ethanol, the default campaign with one label budget, the streaming
coordinator on one site (default ``laptop.py``), every strategy with every seed,
interleaved. Every run is scored on one held-out set labelled before the runs
(see ``time_to_accuracy.py``). Per strategy, medians over seeds of:

- the area under the test force MAE against labels, over the label range (mean
  MAE, eV/Å; lower is better; ``summary.json``'s ``learning_curve_area``);
- the labels at the first version at or below the target MAE (default: the
  largest of the strategies' median final MAEs, so that every typical run gets
  there);
- the final MAE, and the uncertainty's Spearman rho on the held-out set.

Writes ``benchmarks/results/strategies.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("PALFLOW_BENCH_OUT", ROOT / "benchmarks" / "results"))
# Parsl's HTEX starts interchange.py and process_worker_pool.py from PATH: make
# this interpreter's scripts folder (the venv's bin) win even when not activated.
os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))

# Run as a script, this file's folder heads sys.path: its sibling imports as is.
from time_to_accuracy import first_at_or_below, held_out_set, run_on_site  # noqa: E402

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
        seed=seed,
        selection__max_labels_per_version=args.pace,
        stop__max_labels=args.labels,
        stop__max_wall_s=args.max_wall,
        stop__final_training_s=0.0,
        test__file=test_file,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--site", default="laptop.py")
    parser.add_argument("--campaign", help="campaign TOML (default: ethanol with GFN2-xTB)")
    parser.add_argument("--labels", type=int, default=80, help="label budget of every run")
    parser.add_argument("--pace", type=int, default=8, help="labels per ensemble version")
    parser.add_argument("--max-wall", type=float, default=400.0, help="wall limit per run, s")
    parser.add_argument("--test-structures", type=int, default=32)
    parser.add_argument("--target", type=float, help="target test force MAE, eV/Å")
    args = parser.parse_args()

    import parsl
    from palflow.pipeline.config.settings import load_campaign
    from palflow.pipeline.config.sites import load_site, warm_up

    work = Path(tempfile.mkdtemp(prefix="palflow-strategies-"))
    print(f"runs in {work}", flush=True)
    test_file = held_out_set(load_campaign(args.campaign), work, args.test_structures)
    site = load_site(args.site)
    site.config.run_dir = str(work / "parsl")
    runs = []
    with parsl.load(site.config):
        warm_up(site.slots)
        for seed in args.seeds:
            for name in args.strategies:
                run = run_strategy(name, seed, args, site, work, test_file)
                runs.append(run)
                print(
                    f"{name:<22} seed {seed}: {run['labels']} labels in {run['wall_s']:.0f} s, "
                    f"area {run['learning_curve_area']:.4f}, final MAE "
                    f"{run['final_force_mae']:.4f} eV/Å",
                    flush=True,
                )
    table = analyse(runs, args.strategies, args.target)
    print(f"target test force MAE {table['target_force_mae']:.4f} eV/Å")
    print(
        f"{'strategy':<22}{'area (eV/Å)':>12}{'labels to target':>18}{'reached':>9}"
        f"{'final MAE':>11}{'rho':>7}"
    )
    for name, row in table["rows"].items():
        labels = row["median_labels_to_target"]
        rho = row["median_uncertainty_spearman"]
        print(
            f"{name:<22}{row['median_learning_curve_area']:>12.4f}"
            f"{labels if labels is not None else '-':>18}{row['reached']:>6}/{row['runs']:<2}"
            f"{row['median_final_force_mae']:>11.4f}{rho if rho is None else round(rho, 2):>7}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.update(site=args.site, labels=args.labels, seeds=args.seeds, runs=runs)
    (RESULTS / "strategies.json").write_text(json.dumps(table, indent=2))
    plot(table, RESULTS / "strategies.png")


def analyse(runs: list[dict], names: list[str], target: float | None) -> dict:
    """Medians per strategy, and labels to the target MAE."""
    by_name = {n: [r for r in runs if r["strategy"] == n] for n in names}
    if target is None:
        target = max(statistics.median(r["final_force_mae"] for r in rs) for rs in by_name.values())
    rows = {}
    for name, strategy_runs in by_name.items():
        hits = [first_at_or_below(r["curve"], target) for r in strategy_runs]
        hits = [h["labels"] for h in hits if h is not None]
        rhos = [r["final_uncertainty_spearman"] for r in strategy_runs]
        rhos = [r for r in rhos if r is not None]
        rows[name] = {
            "runs": len(strategy_runs),
            "reached": len(hits),
            "median_learning_curve_area": statistics.median(
                r["learning_curve_area"] for r in strategy_runs
            ),
            "median_labels_to_target": statistics.median(hits) if hits else None,
            "median_final_force_mae": statistics.median(
                r["final_force_mae"] for r in strategy_runs
            ),
            "median_uncertainty_spearman": statistics.median(rhos) if rhos else None,
        }
    return {"target_force_mae": target, "rows": rows}


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    curves.axhline(table["target_force_mae"], color="grey", linestyle=":", label="target")
    curves.set_yscale("log")
    curves.set_xlabel("active-learning labels")
    curves.set_ylabel("test force MAE, eV/Å")
    curves.legend(fontsize=8)
    areas.bar(
        names,
        [table["rows"][n]["median_learning_curve_area"] for n in names],
        color=[colours[n] for n in names],
    )
    areas.set_ylabel("area under the learning curve / labels (eV/Å)")
    areas.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
