"""Alanine's exploration runs scored again, on held-out frames at temperature.

    python benchmarks/exploration_rescore.py --results exploration_alanine_run2 \\
        --work-dir RUNS --grid benchmarks/data/alanine_phi_psi_300K.extxyz \\
        --name exploration_alanine_run2_300K

The φ/ψ grid of ``benchmarks/data/alanine_phi_psi.extxyz`` holds constrained minima:
their forces are small (0.058 eV/Å per component on average) against every model's
error (about 0.2 eV/Å), so a model that predicted no force at all would beat every
run, and the set cannot tell the generators apart (a second reader's finding).
``alanine_phi_psi_300K.extxyz`` holds frames of 300 K MD restrained at the same grid
points (``benchmarks/alanine_grid.py --thermal``). This script scores every saved
ensemble version of the runs of ``--results`` (their run folders, kept under
``--work-dir``) on that set, its φ > 0 part as ``c7ax``, and analyses them as
``benchmarks/exploration.py`` does (area ratios to md, paired by seed, bootstrap
interval, exact Wilcoxon, Holm over the family of this file).

This is a secondary analysis, named before it was run: the comparison and the goal
(metadynamics' area on the φ > 0 frames at most 0.5 × md's) are the benchmark's, only
the held-out frames change. It writes ``benchmarks/results/NAME.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common
from exploration import analyse, plot
from exploration_sets import alanine_sets
from extrapolation_sets import evaluate_versions


def rescore(results: list[str], work: Path, grid: Path, scratch: Path) -> dict:
    sets = alanine_sets(scratch, grid=grid)
    shown = str(grid.relative_to(common.ROOT))
    runs, protocols = [], {}
    for name in results:
        saved = json.loads((common.RESULTS / f"{name}.json").read_text())
        protocols[name] = saved["protocol"]
        for run in saved["runs"]:
            if run.get("system") != "alanine" or "run_dir" not in run:
                continue
            root = work / run["run_dir"].removeprefix("WORK/")
            runs.append({**run, "curves": evaluate_versions(root, sets), "scored_on": shown})
            print(f"{run['generator']:<14} seed {run['seed']}: rescored", flush=True)
    result = analyse(runs)
    result.update(
        status="finished",
        runs=runs,
        protocol={
            "secondary": "the runs of the files named, scored again on held-out frames at "
            "temperature; the benchmark's comparisons and goals unchanged",
            "grid_file": shown,
            "sets": {
                name: {k: v for k, v in s.items() if k not in ("path", "extxyz")}
                for name, s in sets.items()
            },  # fmt: skip
            "from": protocols,
        },
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", nargs="+", required=True, help="result stems to rescore")
    parser.add_argument("--work-dir", type=Path, required=True, help="where WORK/... lies")
    parser.add_argument("--grid", type=Path, required=True, help="the held-out extxyz")
    parser.add_argument("--name", required=True, help="results file stem")
    args = parser.parse_args()
    scratch = Path(args.work_dir) / "rescore"
    result = rescore(args.results, args.work_dir, args.grid.resolve(), scratch)
    for goal in result["goals"]:
        print(f"[{goal['verdict']}] {goal['goal']}\n    {goal['numbers']}")
    print(common.write_results(args.name, result, plot, finite=True, work=args.work_dir))


if __name__ == "__main__":
    main()
