"""Time to accuracy when the oracle costs what DFT costs: streaming against the serial
loop, with oracle slots that stand for remote DFT nodes, swept over the oracle's cost.

    python benchmarks/remote_oracle.py --seeds 0 1 2 --ratios 0.1 1 10

**What the oracle is here.** Every label is real (EMT on the Cu13 cluster of
``examples/cu_emt.toml``), but each oracle call then waits, sleeping, until its set
time has passed (``benchmarks/delayed.py: RemoteSlot``). Waiting costs no CPU, so
the two local cores stay free for MD and training, as they would while DFT runs on
other nodes. This measures how palflow schedules around a slow remote oracle; it is
not a measurement of DFT on this machine (``benchmarks/cp2k_oracle.py`` is).

**The sweep.** One ensemble version costs ``t_train`` (the members' training tasks,
``training.min_task_s`` each, in rounds of the site's training slots). The oracle's
cost per batch is set to ``ratio × t_train`` for each ``--ratios`` value, so 0.1 is
PAL's case 2 (training is the bottleneck), 1 the balanced point and 10 an oracle as
slow as DFT. N = P: the serial loop labels one batch per oracle slot per iteration,
and the streaming coordinator is paced to the same labels per ensemble version.

Per ratio, both loops at every seed, interleaved, on one loaded site (default
``laptop.py``) and one held-out set labelled before the runs. The target is the
loosest final test force MAE of any streaming or serial run at that ratio, so every
one of them reaches it (``--target`` sets one; a run that never reaches a target
counts as taking for ever). Reported per ratio: median
wall time to the target of each loop, ``streaming_over_serial`` (their ratio, with a
bootstrap 95% interval over seeds), and PAL's ideal ratio 1/S for the task times
measured in the serial runs, S = (t_oracle + t_train + t_gen) / max(t_oracle,
t_train, t_gen). Writes ``benchmarks/results/remote_oracle.json`` and ``.png``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import common
from common import ROOT, cell, curve_of, first_at_or_below, named, run_on_site, show, span
from ratios import bootstrap_ratio, median_inf

# The site's workers import RemoteSlot from this folder; Parsl's HTEX starts its
# interchange from PATH, so this interpreter's scripts folder comes first.
common.workers_import_benchmarks()
common.use_this_interpreter()

LOOPS = ("streaming", "serial", "unpaced")
"""``unpaced`` is streaming without the pace: labels as fast as the oracle and MD give
them, PAL's idle oracle turned into labels when training is the bottleneck."""


def campaign_for(loop: str, ratio: float, seed: int, args, slots: dict, test_file: str):
    """The copper campaign with a remote-slot oracle costing ``ratio × t_train``."""
    from palflow.pipeline.config.settings import load_campaign

    t_train = nominal_train_s(args, slots)
    batch = args.batch_size
    overrides = {
        **common.budget(args, seed, test_file),
        "oracle__calculator": "delayed:RemoteSlot",
        "oracle__kwargs": {
            "calculator": "ase.calculators.emt:EMT",
            "seconds": ratio * t_train / batch,
        },
        "oracle__batch_size": batch,
        "oracle__trial": False,
        "training__min_task_s": args.train_task_s,
        # N = P batches per version; 0 lifts the pace.
        "selection__max_labels_per_version": 0 if loop == "unpaced" else slots["oracle"] * batch,
    }
    return load_campaign(args.campaign, **overrides)


def nominal_train_s(args, slots: dict) -> float:
    """Seconds per ensemble version: the members' tasks in rounds of the train slots."""
    from palflow.pipeline.config.settings import load_campaign

    members = load_campaign(args.campaign).model.n_members
    return math.ceil(members / slots["train"]) * args.train_task_s


def task_seconds(root: Path, slots: dict, members: int) -> dict[str, float]:
    """Measured t_oracle (per batch), t_train (per version) and t_gen (per segment
    round) of one run, from its events: PAL's times, medians of the tasks."""
    from palflow.pipeline.state.rundir import RunDirectory

    events = RunDirectory.open(root).read_events()

    def median(module: str, kind: str | None = None) -> float:
        times = [
            e["ended"] - e["started"]
            for e in events
            if e.get("module") == module and e.get("started") and e.get("ended")
            and (kind is None or e.get("kind") == kind)
        ]  # fmt: skip
        return statistics.median(times) if times else 0.0

    return {
        "oracle": median("oracle", "label"),
        "train": median("train") * math.ceil(members / slots["train"]),
        "generator": median("generator"),
    }


def run_one(loop: str, ratio: float, seed: int, args, site, work: Path, test_file: str) -> dict:
    from palflow.pipeline.engine.coordinator import Coordinator
    from palflow.pipeline.engine.serial import SerialLoop

    campaign = campaign_for(loop, ratio, seed, args, site.slots, test_file)
    root = work / f"r{ratio:g}-{loop}-seed{seed}"
    summary = run_on_site(SerialLoop if loop == "serial" else Coordinator, campaign, root, site)
    curve = curve_of(summary)
    return {
        "loop": loop,
        "ratio": ratio,
        "seed": seed,
        "labels": summary["labels"],
        "wall_s": summary["wall_s"],
        "final_force_mae": curve[-1]["force_mae"] if curve else float("nan"),
        "task_s": task_seconds(root, site.slots, campaign.model.n_members),
        "curve": curve,
    }


def analyse(runs: list[dict], target: float | None = None) -> dict:
    """Per ratio: the target, each loop's time to it, their ratio and PAL's ideal.

    A run that never reaches the target counts as taking for ever (``inf``): medians
    are over every run, and the bootstrap pairs runs of the same seed."""
    points = {}
    for ratio in sorted({r["ratio"] for r in runs}):
        at = {loop: [r for r in runs if (r["ratio"], r["loop"]) == (ratio, loop)] for loop in LOOPS}
        at = {loop: loop_runs for loop, loop_runs in at.items() if loop_runs}
        # The loosest final MAE of the two loops' runs, so that every one of them
        # reaches it; unpaced is measured against it.
        goal = target or max(r["final_force_mae"] for loop in LOOPS[:2] for r in at.get(loop, []))
        row: dict = {"target_force_mae": goal}
        times: dict[str, dict[int, float]] = {}
        for loop, loop_runs in at.items():
            hits = [first_at_or_below(r["curve"], goal) for r in loop_runs]
            for run, hit in zip(loop_runs, hits, strict=True):
                run["to_target"] = hit
            times[loop] = {
                r["seed"]: math.inf if h is None else h["wall_s"]
                for r, h in zip(loop_runs, hits, strict=True)
            }
            labels = [math.inf if h is None else h["labels"] for h in hits]
            row[loop] = {
                "runs": len(loop_runs),
                "reached": sum(h is not None for h in hits),
                "median_wall_to_target_s": median_inf(list(times[loop].values())),
                "median_labels_to_target": median_inf(labels),
                "median_final_force_mae": median_inf([r["final_force_mae"] for r in loop_runs]),
            }
        for mine, theirs in (("streaming", "serial"), ("unpaced", "streaming")):
            if mine in times and theirs in times:
                ratio_of = bootstrap_ratio(times[mine], times[theirs])
                row[f"{mine}_over_{theirs}"] = ratio_of["median_ratio"]
                row[f"{mine}_over_{theirs}_ci95"] = ratio_of["ci95"]
        row.setdefault("streaming_over_serial", None)
        if "serial" in at:  # PAL's ideal for the times the serial loop measured
            measured = {
                m: median_inf([r["task_s"][m] for r in at["serial"]])
                for m in ("oracle", "train", "generator")
            }
            ideal_s = sum(measured.values()) / max(measured.values())
            row.update(measured_task_s=measured, pal_ideal_speedup=ideal_s)
            row["pal_ideal_ratio"] = 1.0 / ideal_s
        points[f"{ratio:g}"] = row
    return {
        "points": points,
        "streaming_over_serial": {k: p["streaming_over_serial"] for k, p in points.items()},
    }


def print_table(result: dict) -> None:
    columns = [
        ("t_oracle/t_train", ">17", cell("name")),
        ("target", ">8", cell("target_force_mae", ".3f")),
        ("serial s", ">10", lambda p: show(p["serial"]["median_wall_to_target_s"], ".0f")),
        ("streaming s", ">13", lambda p: show(p["streaming"]["median_wall_to_target_s"], ".0f")),
        ("streaming/serial", ">18", cell("streaming_over_serial", ".2f")),
        ("95% interval", ">16", lambda p: span(p.get("streaming_over_serial_ci95"))),
        ("PAL ideal", ">11", cell("pal_ideal_ratio", ".2f")),
        ("unpaced/streaming", ">19", cell("unpaced_over_streaming", ".2f")),
    ]
    common.print_table(columns, named(result["points"]))


def plot(result: dict, path: Path) -> None:
    """Learning curves against wall time, one panel per oracle cost."""
    plt = common.pyplot()
    points = result["points"]
    figure, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 4), squeeze=False)
    colours = {"streaming": "tab:blue", "serial": "tab:orange", "unpaced": "tab:grey"}
    for axis, (ratio, point) in zip(axes[0], points.items(), strict=True):
        seen = set()
        for run in (r for r in result["runs"] if f"{r['ratio']:g}" == ratio):
            curve = run["curve"]
            axis.plot(
                [p["wall_s"] for p in curve],
                [p["force_mae"] for p in curve],
                color=colours[run["loop"]],
                alpha=0.7,
                label=None if run["loop"] in seen else run["loop"],
            )
            seen.add(run["loop"])
        axis.axhline(point["target_force_mae"], color="grey", linestyle=":", label="target")
        share = point["streaming_over_serial"]
        title = f"t_oracle / t_train = {ratio}"
        axis.set_title(title + (f"\nstreaming / serial = {share:.2f}" if share else ""))
        axis.set_yscale("log")
        axis.set_xlabel("wall time, s")
    axes[0][0].set_ylabel("test force MAE, eV/Å")
    axes[0][0].legend()
    common.save_figure(figure, path)


class RemoteOracle(common.CampaignBenchmark):
    """Per seed, every oracle cost with both loops (and unpaced where asked), the
    loops' order alternating."""

    name, prefix, finite, rewrite = "remote_oracle", "palflow-remote-", True, True
    defaults = {"campaign": str(ROOT / "examples" / "cu_emt.toml"), "labels": 64, "max_wall": 600.0}
    analysis, report, plot = staticmethod(analyse), staticmethod(print_table), staticmethod(plot)
    recorded = ("site", "campaign", "seeds", "labels", "batch_size")

    def arguments(self, parser) -> None:
        parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 1.0, 10.0])
        parser.add_argument("--batch-size", type=int, default=4, help="labels per oracle task")
        parser.add_argument("--train-task-s", type=float, default=1.0, help="s per train task")
        parser.add_argument("--target", type=float, help="target test force MAE, eV/Å")
        parser.add_argument(
            "--unpaced-at", nargs="*", type=float, default=[0.1], help="ratios also run unpaced"
        )

    def prepare(self, args, work: Path, site) -> None:
        super().prepare(args, work, site)
        nominal = nominal_train_s(args, site.slots)
        print(f"t_train per version (nominal) {nominal:.1f} s", flush=True)

    def variants(self, args, seed: int, runs: list[dict]):
        for ratio in args.ratios:
            loops = LOOPS if ratio in args.unpaced_at else LOOPS[:2]
            for loop in loops if (seed + len(runs)) % 2 == 0 else loops[::-1]:
                yield ratio, loop

    def run(self, args, site, work: Path, variant: tuple, seed: int) -> dict:
        ratio, loop = variant
        return run_one(loop, ratio, seed, args, site, work, self.test_file)

    def describe(self, run: dict) -> str:
        return (
            f"ratio {run['ratio']:g} {run['loop']:<10} seed {run['seed']}: {run['labels']} "
            f"labels in {run['wall_s']:.0f} s, test force MAE {run['final_force_mae']:.4f} eV/Å, "
            "tasks " + ", ".join(f"{k} {v:.1f} s" for k, v in run["task_s"].items())
        )

    def metadata(self, args, site) -> dict:
        recorded = super().metadata(args, site) | {"campaign": Path(args.campaign).name}
        return recorded | {
            "oracle_slots": site.slots["oracle"],
            "train_task_s": args.train_task_s,
            "t_train_nominal_s": nominal_train_s(args, site.slots),
        }


if __name__ == "__main__":
    RemoteOracle(__doc__).main()
