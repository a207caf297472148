"""Exploration generators against plain MD, at the same label budget, scored on held-out sets.

    python benchmarks/exploration.py --seeds 0 1 2 3 4 5 6 7 8 9 --labels 48 --pace 8 --max-wall 600

Every generator of a system with every seed, interleaved (the order reversed on odd
seeds), one label budget, paced (``selection.max_labels_per_version``), the streaming
coordinator on one site (default ``laptop.py``). Only ``generator`` settings differ
between a system's runs (:mod:`exploration_sets`):

- **ethanol** (``examples/ethanol_xtb.toml``, GFN2-xTB, 4 walkers at 500 K): ``md``
  (plain Langevin MD, the baseline), ``biased_md`` (uncertainty-driven: a bias from the
  committee's energy disagreement, its defaults), ``metadynamics`` (well-tempered, on
  the H-O-C-C and O-C-C-H dihedrals, hills 0.35 rad wide), ``replica_exchange`` (4
  walkers on 500, 600, 720 and 860 K). Held-out sets labelled once before the runs
  (``extrapolation_sets.build_sets``): ``same`` (oracle MD at 500 K, in distribution,
  the campaigns' ``test.file``), ``hot`` (1000 K), ``strain`` (scaled frames and
  pulled-out atoms) and ``torsion`` (rigid rotations about each rotatable bond);
- **alanine** dipeptide in vacuum (``examples/alanine_xtb.toml``, GFN2-xTB, 300 K):
  ``md`` and ``metadynamics`` on φ/ψ. Held-out sets from the labelled φ/ψ grid
  (``benchmarks/data/alanine_phi_psi.extxyz``): ``grid`` (all of it, the ``test.file``)
  and ``c7ax`` (its frames with φ > 0). Besides, the share of the grid's basins among
  the φ/ψ of every frame the run's walkers wrote.

After each run every saved ensemble version is scored on every set of its system: a
learning curve (labels to force MAE) per run and set. Each generator is compared with
``md`` seed by seed (``ratios.py``): the paired ratio of learning-curve areas (the
geometric-mean force MAE over the labels both runs cover, the last error held to the
run's labels), median over seeds, bootstrap 95% interval, exact Wilcoxon signed-rank
p; and the wall time of a run over md's.

**Protocol, fixed before the runs** (written into the JSON first): the primary
comparison is ``biased_md`` / ``md``, learning-curve area on ethanol's ``strain`` set,
at least 10 paired seeds, with its bootstrap interval and exact Wilcoxon p. Every
other comparison (every other generator and set, and every wall-time ratio) is
secondary, their p corrected together (Holm). Goals: the primary median at or below
0.7 with its interval excluding 1; no generator above 1.1x md's area on ethanol's
``same`` set (median); on alanine, metadynamics' area on ``c7ax`` at or below 0.5x
md's (median). The analysis states each goal met or not with its numbers (``goals``).
A run that crashed is kept with its error (it loses its seed; a crashed md run makes
the seed a tie) and counted; a run stopped by the wall limit is kept, with the
labels it had (``under_budget``).

Writes ``benchmarks/results/NAME.json`` (``--name``, default ``exploration``; run
folders as ``WORK/...``) and ``NAME.png`` (learning curves per system and set: seeds
faint, medians bold; the visited φ/ψ of alanine's walkers per generator).
``--quick`` is a tiny run for tests; ``--reanalyse JSON`` recomputes the tables.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import common
from common import ROOT, cell, show
from exploration_sets import (
    GENERATORS,
    SYSTEMS,
    alanine_sets,
    campaign_of,
    failed,
    generators,
    overrides,
    plot,
    run_generator,
)
from extrapolation import pair_area_ratio
from extrapolation_sets import build_sets
from ratios import compare, holm, median, words

common.use_this_interpreter()

BASELINE = "md"
PRIMARY = {"system": "ethanol", "mine": "biased_md", "theirs": BASELINE, "set": "strain"}
"""The primary comparison, named before the runs."""
MIN_SEEDS = 10
PRIMARY_GOAL, SAME_LIMIT, C7AX_GOAL = 0.7, 1.1, 0.5


# ---------------------------------------------------------------------- analysis
def area_comparison(by: dict, system: str, generator: str, name_set: str, seeds) -> dict:
    """``generator`` over md seed by seed, by learning-curve area on ``name_set``. A
    crashed or diverged run of ``generator`` loses its seed (``inf``); where md's did,
    the seed is a tie."""
    mine, theirs = {}, {}
    for seed in seeds:
        a, b = by.get((system, generator, seed)), by.get((system, BASELINE, seed))
        base_lost = failed(b) or pair_area_ratio(b, b, name_set) is None
        theirs[seed] = None if base_lost else 1.0
        if failed(a):
            mine[seed] = None
        else:
            mine[seed] = 1.0 if base_lost else pair_area_ratio(a, b, name_set)
    return compare(mine, theirs)


def wall_comparison(by: dict, system: str, generator: str, seeds) -> dict:
    def wall(run):
        return None if failed(run) else run["wall_s"]

    return compare(
        {s: wall(by.get((system, generator, s))) for s in seeds},
        {s: wall(by.get((system, BASELINE, s))) for s in seeds},
    )


def summarise(runs: list[dict]) -> dict:
    """Per generator: its runs, the crashed and the short (under budget), median wall
    time and final force MAE per set, and (alanine) the share of basins visited."""
    done = [r for r in runs if not failed(r)]
    sets = list(done[0]["curves"]) if done else []
    row = {
        "runs": len(runs),
        "failed": len(runs) - len(done),
        "under_budget": sum(r["labels"] < r.get("budget", r["labels"]) for r in done),
        "median_wall_s": median([r["wall_s"] for r in done]) if done else None,
        "median_final_force_mae": {
            s: median(
                [r["curves"][s][-1]["force_mae"] if r["curves"][s] else math.inf for r in done]
            )
            for s in sets
        },
    }
    shares = [r["visited"]["share"] for r in done if r.get("visited")]
    if shares:
        row["median_basin_share"] = median(shares)
        row["basin_share_range"] = [min(shares), max(shares)]
    return row


def analyse(runs: list[dict]) -> dict:
    """Every generator against md on every set of its system (:mod:`ratios`), the
    primary comparison, Holm over the rest, the goals' verdicts, the failed runs."""
    by = {(r["system"], r["generator"], r["seed"]): r for r in runs}
    table: dict = {"rows": {}, "secondary": {}, "primary": None}
    family = {}
    for system in dict.fromkeys(r["system"] for r in runs):
        mine = [r for r in runs if r["system"] == system]
        names = list(dict.fromkeys(r["generator"] for r in mine))
        table["rows"][system] = {
            g: summarise([r for r in mine if r["generator"] == g]) for g in names
        }
        done = [r for r in mine if not failed(r)]
        sets = list(done[0]["curves"]) if done else []
        for generator in names:
            if generator == BASELINE or BASELINE not in names:
                continue
            seeds = sorted({r["seed"] for r in mine if r["generator"] in (generator, BASELINE)})
            found = table["secondary"].setdefault(system, {})[generator] = {
                s: area_comparison(by, system, generator, s, seeds) for s in sets
            }
            found["wall_time"] = wall_comparison(by, system, generator, seeds)
            for measure, result in found.items():
                key = (system, generator, measure)
                if key == (PRIMARY["system"], PRIMARY["mine"], PRIMARY["set"]):
                    table["primary"] = {"comparison": primary_words(), **result}
                else:
                    family[key] = result["wilcoxon_p"]
    for (system, generator, measure), adjusted in holm(family).items():
        table["secondary"][system][generator][measure]["holm_p"] = adjusted
    table["failed"] = [
        {k: r.get(k) for k in ("system", "generator", "seed", "error")} for r in runs if failed(r)
    ]
    table["n_failed"] = len(table["failed"])
    table["goals"] = goals(table)
    return table


def primary_words() -> str:
    p = PRIMARY
    return (
        f"{p['mine']} / {p['theirs']} on {p['system']}: geometric-mean force MAE on "
        f"'{p['set']}' over the labels both runs cover"
    )


def _spread(result: dict) -> str:
    low, high = result["interval_95"]
    p = show(result["wilcoxon_p"], ".3f")
    return (
        f"median {words(result['median'])} [{words(low)}, {words(high)}] over "
        f"{result['seeds']} seeds, Wilcoxon p {p}"
    )


def _verdict(name: str, goal: str, met: bool | None, numbers: str) -> dict:
    verdict = "not tested" if met is None else ("met" if met else "not met")
    return {"name": name, "goal": goal, "met": met, "verdict": verdict, "numbers": numbers}


def goals(table: dict) -> list[dict]:
    """Each goal of the protocol, met or not, with its numbers (none: not tested)."""
    out = []
    p = table["primary"]
    goal = (
        f"primary median <= {PRIMARY_GOAL}, bootstrap 95% interval excluding 1, "
        f">= {MIN_SEEDS} paired seeds"
    )
    if p is None:
        out.append(_verdict("primary", goal, None, "no biased_md and md runs on ethanol"))
    else:
        low, high = p["interval_95"]
        met = p["median"] <= PRIMARY_GOAL and (high < 1 or low > 1) and p["seeds"] >= MIN_SEEDS
        out.append(_verdict("primary", goal, bool(met), _spread(p)))
    same = {
        g: found["same"]
        for g, found in table["secondary"].get("ethanol", {}).items()
        if "same" in found
    }
    goal = f"no generator above {SAME_LIMIT}x md's area on ethanol's 'same' set (median)"
    numbers = "; ".join(f"{g}: {_spread(r)}" for g, r in same.items()) or "no generator besides md"
    met = all(r["median"] <= SAME_LIMIT for r in same.values()) if same else None
    out.append(_verdict("in_distribution", goal, met, numbers))
    found = table["secondary"].get("alanine", {}).get("metadynamics", {}).get("c7ax")
    goal = f"alanine: metadynamics' area on 'c7ax' (phi > 0) <= {C7AX_GOAL}x md's (median)"
    if found is None:
        out.append(_verdict("c7ax", goal, None, "no metadynamics and md runs on alanine"))
    else:
        numbers = f"{_spread(found)}, Holm p {show(found.get('holm_p'), '.3f')}"
        out.append(_verdict("c7ax", goal, found["median"] <= C7AX_GOAL, numbers))
    return out


def print_tables(table: dict) -> None:
    if table.get("primary"):
        print(f"primary: {table['primary']['comparison']}\n  {_spread(table['primary'])}")
    print("\ngoals:")
    for goal in table["goals"]:
        print(f"  [{goal['verdict']}] {goal['goal']}\n      {goal['numbers']}")
    for system, rows in table["rows"].items():
        comparisons = table["secondary"].get(system, {})
        sets = list(next(iter(rows.values()))["median_final_force_mae"])
        for name_set in [*sets, "wall_time"]:
            wall = name_set == "wall_time"
            print(f"\n{system}, {'wall time per run' if wall else name_set}")
            lines = []
            for generator, row in rows.items():
                found = comparisons.get(generator, {}).get(name_set)
                line = {**row, "name": generator}
                line["value"] = (
                    row["median_wall_s"] if wall else row["median_final_force_mae"][name_set]
                )
                if found is not None:
                    low, high = found["interval_95"]
                    line["ratio"] = f"{words(found['median'])} [{words(low)}, {words(high)}]"
                    line["p"], line["holm"] = found["wilcoxon_p"], found.get("holm_p")
                lines.append(line)
            header = "median s" if wall else "final MAE"
            common.print_table(
                [
                    ("generator", "<18", cell("name")),
                    ("runs", ">5", cell("runs")),
                    ("failed", ">7", cell("failed")),
                    ("short", ">6", cell("under_budget")),
                    (header, ">10", cell("value", ".1f" if wall else ".4f")),
                    ("/ md [95%]", ">24", cell("ratio")),
                    ("p", ">7", cell("p", ".3f")),
                    ("Holm p", ">8", cell("holm", ".3f")),
                    ("basins", ">7", cell("median_basin_share", ".2f")),
                ],
                lines,
            )
    print(f"\nfailed runs: {table['n_failed']}")
    for run in table["failed"]:
        print(f"  {run['system']} {run['generator']} seed {run['seed']}: {run['error']}")


def _outside(info: dict) -> dict:
    """A set's description without this machine's paths."""
    return {k: v for k, v in info.items() if k not in ("path", "extxyz")}


class Exploration(common.CampaignBenchmark):
    """Every generator of every system with every seed, each run scored on its sets."""

    name, prefix, finite = "exploration", "palflow-exploration-", True
    defaults = {"seeds": list(range(10)), "labels": 48, "max_wall": 600.0}
    defaults |= {"campaign": str(SYSTEMS["ethanol"]), "campaign_help": "ethanol's campaign TOML"}
    defaults |= {"test_structures": 24, "test_help": "frames per ethanol set"}
    report, plot = staticmethod(print_tables), staticmethod(plot)

    def arguments(self, parser) -> None:
        option = parser.add_argument
        option("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
        every = list(dict.fromkeys(g for s in SYSTEMS for g in GENERATORS[s]))
        option("--generators", nargs="+", choices=every, help="default: all of each system's")
        option("--alanine-campaign", default=str(SYSTEMS["alanine"]), help="alanine's TOML")
        option("--pace", type=int, default=8, help="labels per ensemble version")
        option("--hot", type=float, default=1000.0, help="ethanol's hot set's MD, K")
        option("--name", default=self.name, help="results file stem (benchmarks/results/NAME.*)")
        option("--quick", action="store_true", help="a tiny run (tests)")
        option(
            "--overrides",
            type=json.loads,
            default=None,
            help='more campaign overrides per generator, as JSON: {"metadynamics": '
            '{"generator__hill_height_eV": 0.1}} (recorded in the protocol)',
        )

    def parse(self, argv: list[str] | None):
        args = super().parse(argv)
        if args.quick and not args.reanalyse:
            args.site, args.labels, args.pace, args.test_structures = "threads.py", 8, 4, 4
            given = sys.argv if argv is None else argv
            args.seeds = args.seeds[:2] if "--seeds" in given else [0, 1]
        return args

    def chosen(self, args, system: str) -> list[str]:
        return [g for g in GENERATORS[system] if not args.generators or g in args.generators]

    def analyse(self, runs: list[dict], args) -> dict:
        return analyse(runs)

    def prepare(self, args, work: Path, site) -> None:
        from palflow.pipeline.config.settings import load_campaign

        self.resolved = {}  # every campaign must load before a run: refuse early
        for system in args.systems:
            for g in self.chosen(args, system):
                campaign = load_campaign(
                    campaign_of(args, system), **overrides(args, system, g, 0, None)
                )
                self.resolved.setdefault(system, {})[g] = {
                    "overrides": generators(system)[g] | (args.overrides or {}).get(g, {}),
                    "generator_settings": campaign.generator.model_dump(),
                }
        self.sets = {}
        if "ethanol" in args.systems:
            self.sets["ethanol"] = build_sets(
                args.campaign, work / "ethanol", args.test_structures, args.hot
            )
        if "alanine" in args.systems:
            self.sets["alanine"] = alanine_sets(work / "alanine")
        for system, sets in self.sets.items():
            for name_set, info in sets.items():
                print(
                    f"{system} set {name_set:<8} {info['n_structures']:>4} frames, mean |F| "
                    f"{info['mean_abs_force']:.3f} eV/Å: {info['description']}",
                    flush=True,
                )

    def variants(self, args, seed: int, runs: list[dict]) -> list[tuple[str, str]]:
        order = [(s, g) for s in args.systems for g in self.chosen(args, s)]
        return order if seed % 2 == 0 else order[::-1]  # the first run is the slowest

    def run(self, args, site, work: Path, variant, seed: int) -> dict:
        system, generator = variant
        return run_generator(system, generator, seed, args, site, work, self.sets[system])

    def describe(self, run: dict) -> str:
        head = f"{run['system']:<8} {run['generator']:<17} seed {run['seed']}"
        if failed(run):
            return f"{head}: FAILED after {run['wall_s']:.0f} s: {run['error']}"
        finals = ", ".join(f"{s} {c[-1]['force_mae']:.3f}" for s, c in run["curves"].items() if c)
        basins = f", basins {run['visited']['share']:.2f}" if run.get("visited") else ""
        return (
            f"{head}: {run['labels']} labels in {run['wall_s']:.0f} s "
            f"(+{run['evaluation_s']:.0f} s scoring), final MAE {finals}{basins}"
        )

    def protocol(self, args) -> dict:
        return {
            "campaigns": {s: os.path.relpath(campaign_of(args, s), ROOT) for s in args.systems},
            "sets": {s: {n: _outside(i) for n, i in sets.items()} for s, sets in self.sets.items()},
            "grid_file": "benchmarks/data/alanine_phi_psi.extxyz",
            "seeds": args.seeds,
            "labels": args.labels,
            "pace": args.pace,
            "max_wall_s": args.max_wall,
            "site": args.site,
            "quick": args.quick,
            "generators": self.resolved,
            "baseline": BASELINE,
            "primary": {
                **PRIMARY,
                "measure": "learning-curve area ratio",
                "min_seeds": MIN_SEEDS,
                "tests": "bootstrap 95% interval of the median; exact Wilcoxon signed-rank",
            },
            "secondary": "every other generator/set area ratio and every wall-time ratio; Holm",
            "goals": [g["goal"] for g in goals({"primary": None, "secondary": {}})],
            "failures": "a crashed run is kept with its error and loses its seed (inf); "
            "a crashed md run makes the seed a tie",
        }

    def metadata(self, args, site) -> dict:
        return {
            "sets": {s: {n: _outside(i) for n, i in sets.items()} for s, sets in self.sets.items()},
            "total_wall_s": time.perf_counter() - self.started,
        }


if __name__ == "__main__":
    Exploration(__doc__).main()
