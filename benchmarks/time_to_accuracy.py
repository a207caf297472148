"""Time to accuracy on a real oracle: streaming, the serial loop, and random selection.

    python benchmarks/time_to_accuracy.py --seeds 0 1 2

GFN2-xTB on the default molecule (ethanol), the default campaign with one label
budget for every run, on one site (default ``laptop.py``), whose executors all runs
share in turn. Three variants, each with every seed, interleaved:

- ``streaming``: the streaming coordinator, selection by ensemble force spread,
  paced at ``selection.max_labels_per_version = 8`` (the serial loop's N);
- ``serial``: :class:`palflow.pipeline.engine.serial.SerialLoop` on the same apps (label, train,
  generate in turn, 8 labels per iteration);
- ``random``: as ``streaming``, with ``selection.measure = "random"``;
- ``unpaced``: as ``streaming`` without pacing: labels as fast as MD and the
  oracle make them.

Every run is scored on one held-out set (GFN2-xTB MD at the generator's
temperature, labelled once before the runs), so learning curves compare directly.
The target MAE is the largest of the variants' median final test force MAEs, unless
``--target`` sets one: the loosest level that every variant's typical run reaches.
For each run, the wall time and the labels at the first ensemble version whose test
force MAE is at or below it; ratios are medians over seeds against ``streaming``.
Writes ``benchmarks/results/time_to_accuracy.json`` and ``.png`` (``--name`` renames
them, for another campaign).
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
# Tests point this elsewhere, so that tiny runs never overwrite the measured results.
RESULTS = Path(os.environ.get("PALFLOW_BENCH_OUT", ROOT / "benchmarks" / "results"))
# Parsl's HTEX starts interchange.py and process_worker_pool.py from PATH: make
# this interpreter's scripts folder (the venv's bin) win even when not activated.
os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))

VARIANTS = ("streaming", "serial", "random", "unpaced")
PACE = 8
"""Labels per ensemble version for the paced variants: the serial loop's N."""


def held_out_set(campaign, folder: Path, n_structures: int) -> str:
    """Label the held-out MD frames once, as an extxyz file every run reads."""
    from ase.io import write
    from palflow.apps.data.dataset import read_dataset
    from palflow.apps.oracle import _oracle_md
    from palflow.pipeline.state.campaign_state import load_start_structure

    start = folder / "start.extxyz"
    write(start, load_start_structure(campaign.system.structure, campaign.system.vacuum))
    output = folder / "test.npz"
    _oracle_md(
        str(start),
        str(output),
        {"calculator": campaign.oracle.calculator, "kwargs": dict(campaign.oracle.kwargs)},
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


def campaign_for(variant: str, seed: int, args, test_file: str):
    from palflow.pipeline.config.settings import load_campaign

    overrides = {
        "seed": seed,
        "stop__max_labels": args.labels,
        "stop__max_wall_s": args.max_wall,
        "stop__final_training_s": 0.0,
        "test__file": test_file,
    }
    if variant == "random":
        overrides["selection__measure"] = "random"
    overrides["selection__max_labels_per_version"] = 0 if variant == "unpaced" else PACE
    return load_campaign(args.campaign, **overrides)


def run_on_site(loop: type, campaign, root: Path, site) -> dict:
    """Run ``campaign`` with ``loop`` (a coordinator class) on the loaded ``site``, in
    a new run directory ``root``; return its summary."""
    from palflow.pipeline.engine.coordinator import Apps
    from palflow.pipeline.state.campaign_state import load_start_structure
    from palflow.pipeline.state.rundir import RunDirectory

    run = RunDirectory.create(root, campaign.model_dump())
    first = campaign.all_systems()[0]
    start = load_start_structure(first.structure, first.vacuum)
    options = site.coordinator_options(campaign)
    return loop(campaign, run, Apps.parsl(), site.slots, start, **options).run()


def run_variant(variant: str, seed: int, args, site, work: Path, test_file: str) -> dict:
    from palflow.pipeline.engine.coordinator import Coordinator
    from palflow.pipeline.engine.serial import SerialLoop

    campaign = campaign_for(variant, seed, args, test_file)
    loop = SerialLoop if variant == "serial" else Coordinator
    summary = run_on_site(loop, campaign, work / f"{variant}-seed{seed}", site)
    curve = [
        {"labels": e["labels"], "wall_s": e["wall_s"], "force_mae": e["force_mae"]}
        for e in summary["test_errors"]
    ]
    return {
        "variant": variant,
        "seed": seed,
        "labels": summary["labels"],
        "wall_s": summary["wall_s"],
        "final_force_mae": curve[-1]["force_mae"] if curve else float("nan"),
        "curve": curve,
    }


def first_at_or_below(curve: list[dict], target: float) -> dict | None:
    return next((point for point in curve if point["force_mae"] <= target), None)


def analyse(runs: list[dict], target: float | None) -> dict:
    """Target, per-run time and labels to it, and medians and ratios per variant."""
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    by_variant = {v: rs for v, rs in by_variant.items() if rs}
    if target is None:
        target = max(
            statistics.median(r["final_force_mae"] for r in rs) for rs in by_variant.values()
        )
    table = {}
    for variant, variant_runs in by_variant.items():
        reached = [first_at_or_below(r["curve"], target) for r in variant_runs]
        for run, point in zip(variant_runs, reached, strict=True):
            run["to_target"] = point
        hits = [p for p in reached if p is not None]
        table[variant] = {
            "runs": len(variant_runs),
            "reached": len(hits),
            "median_final_force_mae": statistics.median(r["final_force_mae"] for r in variant_runs),
            "median_wall_s": statistics.median(r["wall_s"] for r in variant_runs),
            "median_wall_to_target_s": statistics.median(p["wall_s"] for p in hits)
            if hits
            else None,
            "median_labels_to_target": statistics.median(p["labels"] for p in hits)
            if hits
            else None,
        }
    reference = table.get("streaming", {})
    for row in table.values():
        for key in ("wall_to_target_s", "labels_to_target"):
            mine, theirs = row[f"median_{key}"], reference.get(f"median_{key}")
            row[f"{key}_over_streaming"] = mine / theirs if mine and theirs else None
    return {"target_force_mae": target, "table": table}


def print_table(result: dict) -> None:
    print(f"target test force MAE {result['target_force_mae']:.4f} eV/Å")
    print(
        f"{'variant':<10}{'reached':>8}{'final MAE':>11}{'wall to target':>16}"
        f"{'labels to target':>18}{'wall ratio':>12}{'labels ratio':>14}"
    )
    for variant, row in result["table"].items():

        def show(value, fmt):
            return format(value, fmt) if value is not None else "-"

        print(
            f"{variant:<10}{row['reached']:>5}/{row['runs']:<2}"
            f"{row['median_final_force_mae']:>11.4f}"
            f"{show(row['median_wall_to_target_s'], '.0f'):>15}s"
            f"{show(row['median_labels_to_target'], '.0f'):>18}"
            f"{show(row['wall_to_target_s_over_streaming'], '.2f'):>12}"
            f"{show(row['labels_to_target_over_streaming'], '.2f'):>14}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--site", default="laptop.py")
    parser.add_argument("--campaign", help="campaign TOML (default: ethanol with GFN2-xTB)")
    parser.add_argument("--labels", type=int, default=200, help="label budget of every run")
    parser.add_argument("--max-wall", type=float, default=400.0, help="wall limit per run, s")
    parser.add_argument("--test-structures", type=int, default=32)
    parser.add_argument("--target", type=float, help="target test force MAE, eV/Å")
    parser.add_argument(
        "--name", default="time_to_accuracy", help="results file name (default: %(default)s)"
    )
    parser.add_argument(
        "--reanalyse",
        metavar="JSON",
        help="no runs: analyse the runs saved in JSON (e.g. with another --target)",
    )
    args = parser.parse_args()
    if args.reanalyse:
        saved = json.loads(Path(args.reanalyse).read_text())
        print_table(analyse(saved["runs"], args.target))
        return

    import parsl
    from palflow.pipeline.config.settings import load_campaign
    from palflow.pipeline.config.sites import load_site, warm_up

    work = Path(tempfile.mkdtemp(prefix="palflow-tta-"))
    print(f"runs in {work}", flush=True)
    test_file = held_out_set(load_campaign(args.campaign), work, args.test_structures)
    site = load_site(args.site)
    site.config.run_dir = str(work / "parsl")
    runs = []
    with parsl.load(site.config):
        warm_up(site.slots)
        for seed in args.seeds:
            for variant in args.variants:
                run = run_variant(variant, seed, args, site, work, test_file)
                runs.append(run)
                print(
                    f"{variant:<10} seed {seed}: {run['labels']} labels in {run['wall_s']:.0f} s, "
                    f"test force MAE {run['curve'][0]['force_mae']:.4f} -> "
                    f"{run['final_force_mae']:.4f} eV/Å",
                    flush=True,
                )
    result = analyse(runs, args.target)
    print_table(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    campaign = Path(args.campaign).name if args.campaign else "ethanol (default)"
    result.update(site=args.site, campaign=campaign, labels=args.labels, seeds=args.seeds)
    result["runs"] = runs
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{args.name}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green", "tab:grey"), strict=True))
    figure, (by_labels, by_wall) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    seen = set()
    for run in result["runs"]:
        label = run["variant"] if run["variant"] not in seen else None
        seen.add(run["variant"])
        curve = run["curve"]
        style = {"color": colours[run["variant"]], "alpha": 0.8, "label": label}
        by_labels.plot([p["labels"] for p in curve], [p["force_mae"] for p in curve], **style)
        by_wall.plot([p["wall_s"] for p in curve], [p["force_mae"] for p in curve], **style)
    for axis in (by_labels, by_wall):
        axis.axhline(result["target_force_mae"], color="grey", linestyle=":", label="target")
        axis.set_yscale("log")
    by_labels.set_xlabel("active-learning labels")
    by_wall.set_xlabel("wall time, s")
    by_labels.set_ylabel("test force MAE, eV/Å")
    by_labels.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
