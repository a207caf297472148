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

import statistics
from pathlib import Path

import common
from common import cell, curve_of, first_at_or_below, named, reached, run_on_site, show

common.use_this_interpreter()

VARIANTS = ("streaming", "serial", "random", "unpaced")
PACE = 8
"""Labels per ensemble version for the paced variants: the serial loop's N."""


def campaign_for(variant: str, seed: int, args, test_file: str):
    from palflow.pipeline.config.settings import load_campaign

    overrides = common.budget(args, seed, test_file)
    if variant == "random":
        overrides["selection__measure"] = "random"
    overrides["selection__max_labels_per_version"] = 0 if variant == "unpaced" else PACE
    return load_campaign(args.campaign, **overrides)


def run_variant(variant: str, seed: int, args, site, work: Path, test_file: str) -> dict:
    from palflow.pipeline.engine.coordinator import Coordinator
    from palflow.pipeline.engine.serial import SerialLoop

    campaign = campaign_for(variant, seed, args, test_file)
    loop = SerialLoop if variant == "serial" else Coordinator
    summary = run_on_site(loop, campaign, work / f"{variant}-seed{seed}", site)
    curve = curve_of(summary)
    return {
        "variant": variant,
        "seed": seed,
        "labels": summary["labels"],
        "wall_s": summary["wall_s"],
        "final_force_mae": curve[-1]["force_mae"] if curve else float("nan"),
        "curve": curve,
    }


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
    columns = [
        ("variant", "<10", cell("name")),
        ("reached", ">8", reached),
        ("final MAE", ">11", cell("median_final_force_mae", ".4f")),
        ("wall to target", ">16", lambda row: show(row["median_wall_to_target_s"], ".0f") + "s"),
        ("labels to target", ">18", cell("median_labels_to_target", ".0f")),
        ("wall ratio", ">12", cell("wall_to_target_s_over_streaming", ".2f")),
        ("labels ratio", ">14", cell("labels_to_target_over_streaming", ".2f")),
    ]
    common.print_table(columns, named(result["table"]))


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
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
    common.save_figure(figure, path)


class TimeToAccuracy(common.CampaignBenchmark):
    """Every variant with every seed, scored on one held-out set."""

    line = (
        "{variant:<10} seed {seed}: {labels} labels in {wall_s:.0f} s, test force MAE "
        "{curve[0][force_mae]:.4f} -> {final_force_mae:.4f} eV/Å"
    )
    name, prefix = "time_to_accuracy", "palflow-tta-"
    defaults = {"labels": 200, "max_wall": 400.0, "campaign_help": common.ETHANOL}
    analysis, report, plot = staticmethod(analyse), staticmethod(print_table), staticmethod(plot)

    def arguments(self, parser) -> None:
        parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
        parser.add_argument("--target", type=float, help="target test force MAE, eV/Å")
        parser.add_argument("--name", default=self.name, help="results file name (%(default)s)")

    def run(self, args, site, work: Path, variant: str, seed: int) -> dict:
        return run_variant(variant, seed, args, site, work, self.test_file)

    def metadata(self, args, site) -> dict:
        campaign = Path(args.campaign).name if args.campaign else "ethanol (default)"
        return {"site": args.site, "campaign": campaign, "labels": args.labels, "seeds": args.seeds}


if __name__ == "__main__":
    TimeToAccuracy(__doc__).main()
