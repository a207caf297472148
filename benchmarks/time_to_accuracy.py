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
``streaming`` is compared with every other variant seed by seed (``ratios.py``,
streaming the side a claim is about): the paired ratio of geometric-mean test force
MAE over the wall time both runs cover (and, beside it, over the labels), each curve
held at its last error to its run's end; where ``--target`` fixed a test force MAE
before the runs, the wall-time and label ratios to it, a run that never got there
censored, never dropped, with the share of seeds that reached it. The primary
comparison is streaming over serial by the area against wall time; the others are
secondary, their p corrected by Holm. The protocol
is written into the results before the first run.
Writes ``benchmarks/results/time_to_accuracy.json`` and ``.png`` (``--name`` renames
them, for another campaign).
"""

from __future__ import annotations

import math
from pathlib import Path

import common
import ratios
from common import cell, curve_of, first_at_or_below, named, run_on_site
from ratios import Cost, compare, held_to, holm, median, words

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


def costs(run: dict, target: float) -> tuple[Cost, Cost]:
    """Wall time and labels of the run's first version at or below ``target``; both
    censored at the run's end when it never got there."""
    hit = first_at_or_below(run["curve"], target)
    if hit is None:
        return Cost.never(run["wall_s"]), Cost.never(float(run["labels"]))
    return Cost(hit["wall_s"]), Cost(float(hit["labels"]))


def points_of(run: dict, x: str) -> list[tuple[float, float]]:
    """The run's test force MAE against ``x``, its last error held to the run's end."""
    end = run["wall_s"] if x == "wall_s" else run["labels"]
    return held_to([(p[x], p["force_mae"]) for p in run["curve"]], end)


def area_ratio(mine: dict | None, theirs: dict | None, x: str) -> float | None:
    """Paired ratio of geometric-mean test force MAE against ``x`` (``wall_s`` or
    ``labels``) from the later first version to the later run's end, the run that
    ended first held at its last error; None where either run is missing."""
    if not (mine and theirs):
        return None
    ends = [run["wall_s"] if x == "wall_s" else run["labels"] for run in (mine, theirs)]
    return ratios.area_ratio_to_later_end(points_of(mine, x), points_of(theirs, x), *ends)


PRIMARY = ("serial", "area_wall_s")
"""The primary comparison, named before the runs: streaming over the serial loop, by
the area against wall time. Every other comparison is secondary (Holm)."""


def analyse(runs: list[dict], target: float | None) -> dict:
    """Per variant, medians over seeds; streaming against each other variant, seed by
    seed (:mod:`ratios`; streaming is the side a claim is about): the paired area
    ratios against wall time and labels and, where ``target`` was fixed before the
    runs, the wall-time and label ratios to it."""
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    by_variant = {v: rs for v, rs in by_variant.items() if rs}
    by = {(r["variant"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    table = {}
    for variant, variant_runs in by_variant.items():
        row = table[variant] = {
            "runs": len(variant_runs),
            "median_final_force_mae": median([r["final_force_mae"] for r in variant_runs]),
            "median_wall_s": median([r["wall_s"] for r in variant_runs]),
        }
        if target is not None:
            walls, labels = zip(*(costs(r, target) for r in variant_runs), strict=True)
            row["reached"] = sum(c.reached for c in walls) / len(walls)
            row["median_wall_to_target_s"] = median(
                [c.value if c.reached else math.inf for c in walls]
            )
            row["median_labels_to_target"] = median(
                [c.value if c.reached else math.inf for c in labels]
            )
        if variant == "streaming" or "streaming" not in by_variant:
            continue
        pairs = {s: (by.get(("streaming", s)), by.get((variant, s))) for s in seeds}
        row["streaming_over_this"] = versus = {
            f"area_{x}": compare(
                {s: area_ratio(mine, theirs, x) for s, (mine, theirs) in pairs.items()},
                dict.fromkeys(seeds, 1.0),
            )
            for x in ("wall_s", "labels")
        }
        if target is not None:
            for index, key in enumerate(("wall_to_target", "labels_to_target")):
                versus[key] = compare(
                    {s: costs(mine, target)[index] for s, (mine, _) in pairs.items() if mine},
                    {s: costs(theirs, target)[index] for s, (_, theirs) in pairs.items() if theirs},
                )
    variant, measure = PRIMARY
    primary = table.get(variant, {}).get("streaming_over_this", {}).get(measure)
    family = {
        f"{name} {key}": found["wilcoxon_p"]
        for name, row in table.items()
        for key, found in row.get("streaming_over_this", {}).items()
        if found is not primary
    }
    return {
        "target_force_mae": target,
        "table": table,
        "primary": primary,
        "secondary_holm_p": holm(family),
    }


def print_table(result: dict) -> None:
    target = result["target_force_mae"]
    print(
        f"target test force MAE {target:.4f} eV/Å" if target else "no target fixed before the runs"
    )

    def versus(key: str):
        def shown(row: dict) -> str:
            found = row.get("streaming_over_this", {}).get(key)
            if not found:
                return "-"
            low, high = found["interval_95"]
            return f"{words(found['median'])} [{words(low)}, {words(high)}]"

        return shown

    columns = [
        ("variant", "<10", cell("name")),
        ("reached", ">8", cell("reached", ".2f")),
        ("final MAE", ">11", cell("median_final_force_mae", ".4f")),
        ("wall to target", ">15", cell("median_wall_to_target_s", ".0f")),
        ("streaming/this, time", ">24", versus("area_wall_s")),
        ("streaming/this, labels", ">24", versus("area_labels")),
        ("time to target", ">24", versus("wall_to_target")),
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
        if result["target_force_mae"]:
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
    name, prefix, finite = "time_to_accuracy", "palflow-tta-", True
    defaults = {"labels": 200, "max_wall": 400.0, "campaign_help": common.ETHANOL}
    analysis, report, plot = staticmethod(analyse), staticmethod(print_table), staticmethod(plot)

    def arguments(self, parser) -> None:
        parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
        parser.add_argument("--target", type=float, help="target test force MAE, eV/Å")
        parser.add_argument("--name", default=self.name, help="results file name (%(default)s)")

    def run(self, args, site, work: Path, variant: str, seed: int) -> dict:
        return run_variant(variant, seed, args, site, work, self.test_file)

    def protocol(self, args) -> dict:
        return self.metadata(args, None) | {
            "variants": args.variants,
            "target": args.target,
            "max_wall_s": args.max_wall,
            "test_structures": args.test_structures,
            "primary": "streaming / serial: paired ratio of geometric-mean test force MAE "
            "over the wall time both runs cover; the rest secondary, Holm-corrected",
        }

    def metadata(self, args, site) -> dict:
        campaign = Path(args.campaign).name if args.campaign else "ethanol (default)"
        return {"site": args.site, "campaign": campaign, "labels": args.labels, "seeds": args.seeds}


if __name__ == "__main__":
    TimeToAccuracy(__doc__).main()
