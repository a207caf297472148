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
and the streaming coordinator is paced to the same labels per ensemble version. After
the label budget, every loop trains on its final labels for ``--final-training-s``
(default 15 s), the same time for all.

Per ratio, every loop at every seed, interleaved, on one loaded site (default
``benchmarks/remote_site.py``: the laptop site with one oracle worker per oracle
slot, so that slots standing for remote nodes never queue) and one held-out set
labelled before the runs. Two serial loops: ``serial`` trains each member until its
validation error stops improving, the loop a user would write; ``serial_one_task``
trains each member one task per iteration. Per ratio, seed by seed (``ratios.py``):
streaming over each serial loop and over the stronger of the two
(``streaming_over_stronger``; the stronger is ``serial_one_task`` where its paired
area ratio to ``serial`` has a median below 1): the paired ratio of geometric-mean
test force MAE over the wall time from the later first version to the later run's
end, the run that ended first held at its last error (``area``), and, where
``--target`` fixed a force MAE before the runs, the ratio of wall times to it
(``time``; a run that never reaches it is censored at its wall time, never dropped).
The primary comparison is the area of streaming over the stronger serial loop at the
dearest oracle; every other one is secondary, its p corrected by Holm. PAL's ideal
speed-up S = (t_label + t_train + t_gen) / max(...) uses the phase times the
stronger serial loop measured (its oracle phase with its slots running
concurrently); ``measured_over_ideal`` is the measured speed-up (serial over
streaming, time to target) over S. The JSON records the oracle workers per slot and
the oracle concurrency measured (the mean number of oracle tasks running while any
is). The protocol is written into the results before the first run. Writes
``benchmarks/results/remote_oracle.json`` and ``.png``."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import common
from common import ROOT, cell, curve_of, first_at_or_below, named, run_on_site
from ratios import Cost, area_ratio_to_later_end, compare, held_to, holm, median, words

# The site's workers import RemoteSlot from this folder; Parsl's HTEX starts its
# interchange from PATH, so this interpreter's scripts folder comes first.
common.workers_import_benchmarks()
common.use_this_interpreter()

LOOPS = ("streaming", "serial", "serial_one_task", "unpaced")
"""``serial`` trains each member until validation stops improving, the loop a user
would write; ``serial_one_task`` gives each member one task per iteration, the
training time per version that streaming gets. ``unpaced`` is streaming without the
pace: labels as fast as the oracle and MD give them, PAL's idle oracle turned into
labels when training is the bottleneck."""
SERIALS = ("serial", "serial_one_task")
SERIAL_TRAINING = {"serial": "plateau", "serial_one_task": "one task"}


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
        # both loops train on their final labels for the same time after the budget
        "stop__final_training_s": args.final_training_s,
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


def ideal_against(serial_runs: list[dict], comparison: dict | None) -> dict | None:
    """PAL's ideal speed-up from the phase times that a serial loop's runs measured,
    and streaming's measured speed-up (time to target) over that loop against it;
    None without phase times."""
    phases = [r["phase_s"] for r in serial_runs if r.get("phase_s")]
    if not phases:
        return None
    measured = {
        phase: median([p[phase] or 0.0 for p in phases]) for phase in ("label", "train", "generate")
    }
    ideal_s = sum(measured.values()) / max(measured.values())
    out = {
        "measured_phase_s": measured,
        "pal_ideal_speedup": ideal_s,
        "pal_ideal_ratio": 1 / ideal_s,
    }
    to_target = (comparison or {}).get("time")
    if to_target and math.isfinite(to_target["median"]) and to_target["median"] > 0:
        out["measured_speedup"] = 1.0 / to_target["median"]
        out["measured_over_ideal"] = out["measured_speedup"] / ideal_s
    return out


def epochs_per_task(root: Path) -> float | None:
    """The median epochs of one training task in a run (they are bounded by time,
    ``training.min_task_s``, so a slower machine trains fewer); None for runs made
    before the events recorded them."""
    from palflow.pipeline.state.rundir import RunDirectory

    epochs = [
        e["epochs_this_task"]
        for e in RunDirectory.open(root).read_events()
        if e.get("kind") == "train" and e.get("ok") and e.get("epochs_this_task") is not None
    ]
    return statistics.median(epochs) if epochs else None


def run_one(loop: str, ratio: float, seed: int, args, site, work: Path, test_file: str) -> dict:
    from palflow.pipeline.engine.coordinator import Coordinator
    from palflow.pipeline.engine.serial import SerialLoop

    campaign = campaign_for(loop, ratio, seed, args, site.slots, test_file)
    root = work / f"r{ratio:g}-{loop}-seed{seed}"
    if loop in SERIALS:
        summary = run_on_site(SerialLoop, campaign, root, site, train=SERIAL_TRAINING[loop])
    else:
        summary = run_on_site(Coordinator, campaign, root, site)
    curve = curve_of(summary)
    members = campaign.model.n_members
    return {
        "loop": loop,
        "ratio": ratio,
        "seed": seed,
        "labels": summary["labels"],
        "wall_s": summary["wall_s"],
        "final_force_mae": curve[-1]["force_mae"] if curve else float("nan"),
        "task_s": task_seconds(root, site.slots, members),
        "phase_s": summary.get("serial", {}).get("phase_s"),
        "train_tasks": summary.get("serial", {}).get("train_tasks"),
        "oracle_concurrency": oracle_concurrency(root),
        "epochs_per_train_task": epochs_per_task(root),
        "curve": curve,
    }


def oracle_concurrency(root: Path) -> float | None:
    """The mean number of oracle tasks running while any was: their summed durations
    over the length of the union of their intervals (2 for two slots that never
    queue, 1 for slots that take turns)."""
    from palflow.pipeline.state.rundir import RunDirectory

    spans = sorted(
        (e["started"], e["ended"])
        for e in RunDirectory.open(root).read_events()
        if e.get("module") == "oracle" and e.get("started") and e.get("ended")
    )
    busy, end = 0.0, -math.inf
    for started, ended in spans:
        busy += max(0.0, ended - max(started, end))
        end = max(end, ended)
    total = sum(ended - started for started, ended in spans)
    return total / busy if busy > 0 else None


def wall_points(run: dict) -> list[tuple[float, float]]:
    """The run's test force MAE against wall time, its last error held to the run's end."""
    return held_to([(p["wall_s"], p["force_mae"]) for p in run["curve"]], run["wall_s"])


def pair_area_ratio(mine: dict | None, theirs: dict | None) -> float | None:
    """``mine``'s geometric-mean test force MAE over ``theirs``' from the later first
    version to the later run's end, the run that ended first held at its last error
    (a loop that is done sooner keeps its error, it does not leave the window): the
    primary figure. None where either has no curve."""
    if not (mine and theirs):
        return None
    return area_ratio_to_later_end(
        wall_points(mine), wall_points(theirs), mine["wall_s"], theirs["wall_s"]
    )


def time_to(run: dict, target: float) -> Cost:
    """Wall time of the run's first version at or below ``target``; censored at the
    run's wall time when it never got there."""
    hit = first_at_or_below(run["curve"], target)
    return Cost(hit["wall_s"]) if hit else Cost.never(run["wall_s"])


def analyse(runs: list[dict], target: float | None = None) -> dict:
    """Per oracle cost: streaming against serial (and unpaced against streaming),
    seed by seed (:mod:`ratios`), and PAL's ideal from the serial runs' task times.

    - ``area``: the primary figure, the paired ratio of geometric-mean test force MAE
      from the later first version to the later run's end (:func:`pair_area_ratio`);
    - ``time``: wall time to ``target`` (fixed before the runs; None: not compared), a
      run that never reaches it censored at its wall time, never dropped."""
    points = {}
    for ratio in sorted({r["ratio"] for r in runs}):
        at = {loop: [r for r in runs if (r["ratio"], r["loop"]) == (ratio, loop)] for loop in LOOPS}
        at = {loop: loop_runs for loop, loop_runs in at.items() if loop_runs}
        by = {loop: {r["seed"]: r for r in loop_runs} for loop, loop_runs in at.items()}
        row: dict = {"target_force_mae": target}
        for loop, loop_runs in at.items():
            row[loop] = {
                "runs": len(loop_runs),
                "median_final_force_mae": median([r["final_force_mae"] for r in loop_runs]),
                "median_versions": median([len(r["curve"]) for r in loop_runs]),
            }
            if target is not None:
                costs = [time_to(r, target) for r in loop_runs]
                row[loop]["reached"] = sum(c.reached for c in costs) / len(costs)
                row[loop]["median_wall_to_target_s"] = median(
                    [c.value if c.reached else math.inf for c in costs]
                )
        pairs = [("streaming", "serial"), ("streaming", "serial_one_task")]
        pairs += [("serial_one_task", "serial"), ("unpaced", "streaming")]
        for mine, theirs in pairs:
            if mine not in by or theirs not in by:
                continue
            seeds = sorted(set(by[mine]) | set(by[theirs]))
            row[f"{mine}_over_{theirs}"] = comparison = {
                "area": compare(
                    {s: pair_area_ratio(by[mine].get(s), by[theirs].get(s)) for s in seeds},
                    dict.fromkeys(seeds, 1.0),
                )
            }
            if target is not None:
                comparison["time"] = compare(
                    {s: time_to(r, target) for s, r in by[mine].items()},
                    {s: time_to(r, target) for s, r in by[theirs].items()},
                )
        # the stronger serial loop: serial_one_task where its paired area ratio to
        # serial has a median below 1, else serial (the rule is in the protocol)
        versus = row.get("serial_one_task_over_serial", {}).get("area", {}).get("median")
        stronger = "serial_one_task" if versus is not None and versus < 1 else "serial"
        ideals = {
            loop: ideal_against(at[loop], row.get(f"streaming_over_{loop}"))
            for loop in SERIALS
            if loop in at
        }
        if stronger in by:
            row["stronger_serial"] = stronger
            row["streaming_over_stronger"] = row.get(f"streaming_over_{stronger}")
            if ideals.get(stronger):
                row.update(ideals[stronger])
        # The same against each serial loop: where the loops train differently per
        # version, no one of them is a like-for-like ideal, so each is given.
        row["measured_over_ideal_by_loop"] = {
            loop: (ideal or {}).get("measured_over_ideal") for loop, ideal in ideals.items()
        }
        row["oracle_concurrency"] = median(
            [
                r["oracle_concurrency"]
                for r in runs
                if r["ratio"] == ratio and r.get("oracle_concurrency")
            ]
        )
        points[f"{ratio:g}"] = row
    return {"points": points, **primary_and_holm(points)}


def primary_and_holm(points: dict) -> dict:
    """The primary comparison, named before the runs: streaming over the stronger
    serial loop, by area, at the dearest oracle (the DFT-like point); every other
    comparison of every point is secondary, its Wilcoxon p corrected by Holm."""
    if not points:
        return {"primary": None, "secondary_holm_p": {}}
    dearest = max(points, key=float)
    primary = (points[dearest].get("streaming_over_stronger") or {}).get("area")
    family = {}
    for ratio, row in points.items():
        for key, value in row.items():
            if not key.endswith(("_over_serial", "_over_serial_one_task", "_over_streaming")):
                continue
            for measure, found in value.items():
                if found is not primary:
                    family[f"{ratio} {key} {measure}"] = found["wilcoxon_p"]
    return {
        "primary": None if primary is None else {"ratio": dearest, **primary},
        "secondary_holm_p": holm(family),
    }


def by_loop(point: dict) -> str:
    """Measured ÷ ideal against each serial loop's own phases."""
    found = point.get("measured_over_ideal_by_loop") or {}
    return ", ".join(common.show(found.get(loop), ".2f") for loop in SERIALS)


def print_table(result: dict) -> None:
    def ratio(key: str, measure: str):
        def show_ratio(point: dict) -> str:
            found = point.get(key, {}).get(measure)
            if not found:
                return "-"
            low, high = found["interval_95"]
            return f"{words(found['median'])} [{words(low)}, {words(high)}]"

        return show_ratio

    columns = [
        ("t_oracle/t_train", ">17", cell("name")),
        ("streaming/stronger area", ">24", ratio("streaming_over_stronger", "area")),
        ("time to target", ">24", ratio("streaming_over_stronger", "time")),
        ("streaming/serial area", ">24", ratio("streaming_over_serial", "area")),
        ("stronger serial", ">16", cell("stronger_serial")),
        ("PAL ideal", ">11", cell("pal_ideal_ratio", ".2f")),
        ("measured/ideal", ">15", cell("measured_over_ideal", ".2f")),
        ("by loop: serial, one task", ">26", by_loop),
        ("time to target, one task", ">25", ratio("streaming_over_serial_one_task", "time")),
        ("oracle conc.", ">13", cell("oracle_concurrency", ".2f")),
        ("unpaced/streaming area", ">24", ratio("unpaced_over_streaming", "area")),
    ]
    common.print_table(columns, named(result["points"]))
    primary = result.get("primary")
    if primary:
        low, high = primary["interval_95"]
        p_value = common.show(primary["wilcoxon_p"], ".3f")
        print(
            f"primary, at t_oracle/t_train = {primary['ratio']}: streaming / stronger serial "
            f"area {words(primary['median'])} [{words(low)}, {words(high)}] over "
            f"{primary['seeds']} seeds, Wilcoxon p {p_value}"
        )


def plot(result: dict, path: Path) -> None:
    """Learning curves against wall time, one panel per oracle cost."""
    plt = common.pyplot()
    points = result["points"]
    figure, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 4), squeeze=False)
    colours = {
        "streaming": "tab:blue",
        "serial": "tab:orange",
        "serial_one_task": "tab:red",
        "unpaced": "tab:grey",
    }
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
        if point["target_force_mae"]:
            axis.axhline(point["target_force_mae"], color="grey", linestyle=":", label="target")
        area = (point.get("streaming_over_stronger") or {}).get("area", {}).get("median")
        title = f"t_oracle / t_train = {ratio}"
        axis.set_title(
            title + (f"\nstreaming / stronger serial, area {words(area)}" if area else "")
        )
        axis.set_yscale("log")
        axis.set_xlabel("wall time, s")
    axes[0][0].set_ylabel("test force MAE, eV/Å")
    axes[0][0].legend()
    common.save_figure(figure, path)


def shown_site(site: str) -> str:
    """The site as the results file names it: relative to the checkout where inside it."""
    path = Path(site)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else site


def loops_at(ratio: float, args) -> list[str]:
    """The loops run at ``ratio``: the three, and unpaced where asked."""
    return list(LOOPS if ratio in args.unpaced_at else LOOPS[:3])


class RemoteOracle(common.CampaignBenchmark):
    """Per seed, every oracle cost with the three loops (and unpaced where asked), the
    loops' order rotating."""

    name, prefix, finite, rewrite = "remote_oracle", "palflow-remote-", True, True
    defaults = {"campaign": str(ROOT / "examples" / "cu_emt.toml"), "labels": 64, "max_wall": 600.0}
    defaults |= {"seeds": list(range(10)), "site": str(ROOT / "benchmarks" / "remote_site.py")}
    analysis, report, plot = staticmethod(analyse), staticmethod(print_table), staticmethod(plot)
    recorded = ("site", "campaign", "seeds", "labels", "batch_size", "ratios", "target")

    def arguments(self, parser) -> None:
        parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 1.0, 10.0])
        parser.add_argument("--batch-size", type=int, default=4, help="labels per oracle task")
        parser.add_argument("--train-task-s", type=float, default=1.0, help="s per train task")
        parser.add_argument("--target", type=float, help="target test force MAE, eV/Å")
        parser.add_argument(
            "--final-training-s",
            type=float,
            default=15.0,
            help="s every loop trains on its final labels after the label budget",
        )
        parser.add_argument(
            "--unpaced-at", nargs="*", type=float, default=[0.1], help="ratios also run unpaced"
        )

    def prepare(self, args, work: Path, site) -> None:
        super().prepare(args, work, site)
        nominal = nominal_train_s(args, site.slots)
        print(f"t_train per version (nominal) {nominal:.1f} s", flush=True)

    def variants(self, args, seed: int, runs: list[dict]):
        # The order rotates by seed and by ratio, so that each loop runs first, in the
        # middle and last alike (reversing three loops always left one in the middle).
        for index, ratio in enumerate(args.ratios):
            loops = loops_at(ratio, args)
            turn = (seed + index) % len(loops)
            yield from ((ratio, loop) for loop in loops[turn:] + loops[:turn])

    def run(self, args, site, work: Path, variant: tuple, seed: int) -> dict:
        ratio, loop = variant
        return run_one(loop, ratio, seed, args, site, work, self.test_file)

    def describe(self, run: dict) -> str:
        return (
            f"ratio {run['ratio']:g} {run['loop']:<10} seed {run['seed']}: {run['labels']} "
            f"labels in {run['wall_s']:.0f} s, test force MAE {run['final_force_mae']:.4f} eV/Å, "
            "tasks " + ", ".join(f"{k} {v:.1f} s" for k, v in run["task_s"].items())
        )

    def protocol(self, args) -> dict:
        return super().protocol(args) | {
            "site": shown_site(args.site),
            "campaign": shown_site(args.campaign),  # relative to the checkout, as sites are
            "loops": sorted(
                {loop for r in args.ratios for loop in loops_at(r, args)}, key=LOOPS.index
            ),
            "max_wall_s": args.max_wall,
            "held_out": f"{args.test_structures} frames of oracle MD from the start "
            "structure (benchmarks/common.py: held_out_set, seed 12345)",
            "unpaced_at": args.unpaced_at,
            "train_task_s": args.train_task_s,
            "final_training_s": args.final_training_s,
            "primary": "streaming / the stronger serial loop at the dearest oracle: paired "
            "ratio of geometric-mean test force MAE from the later first version to the "
            "later run's end, the run that ended first held at its last error; every other "
            "comparison secondary, Holm-corrected",
            "stronger_serial": "serial_one_task where its paired area ratio to serial has a "
            "median below 1, else serial",
        }

    def metadata(self, args, site) -> dict:
        recorded = super().metadata(args, site) | {"campaign": Path(args.campaign).name}
        recorded["site"] = shown_site(args.site)
        oracle = next(e for e in site.config.executors if e.label == "oracle")
        workers = getattr(oracle, "max_workers_per_node", None)
        return recorded | {
            "oracle_slots": site.slots["oracle"],
            "oracle_workers": workers,
            "workers_per_oracle_slot": workers / site.slots["oracle"] if workers else None,
            "train_task_s": args.train_task_s,
            "t_train_nominal_s": nominal_train_s(args, site.slots),
        }


if __name__ == "__main__":
    RemoteOracle(__doc__).main()
