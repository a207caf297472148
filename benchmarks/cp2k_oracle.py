"""What a CP2K label costs through palflow's oracle task, on 1 MPI rank and on 2.

    python benchmarks/cp2k_oracle.py [--structures 3] [--repeat 2]

The 8-water box of ``examples/water_cp2k.toml`` and rattled copies of it (0.03 Å,
seed 0), PBE/DZVP-MOLOPT-SR-GTH/GTH-PBE at 400 Ry (the example's settings), labelled
by ``palflow.apps.oracle._label_batch`` as one batch task per rank count: one CP2K shell
for the batch, one OpenMP thread per rank. Rank counts alternate, ``--repeat``
times, so that both see the same machine. Prints the median seconds per label of
each, their ratio, and the largest energy difference between the two (the same
numbers from a different parallel layout), and writes
``benchmarks/results/cp2k_oracle.json``.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from common import ROOT

from palflow.apps.contracts import CalculatorSpec

common.allow_mpi_as_root()


def boxes(n: int) -> list:
    from ase.io import read

    box = read(ROOT / "examples" / "structures" / "water8.xyz")
    return [box, *common.rattled(box, n - 1, np.random.default_rng(0), sigma=0.03)]


def label(structures: list, ranks: int, work: Path) -> tuple[list[float], np.ndarray]:
    """Seconds per label and energies of one batch task on ``ranks`` ranks."""
    from palflow.apps.data.dataset import read_arrays, write_dataset
    from palflow.apps.oracle import _label_batch
    from palflow.pipeline.config.settings import load_campaign

    campaign = load_campaign(ROOT / "examples" / "water_cp2k.toml")
    spec = dataclasses.replace(CalculatorSpec.of(campaign.oracle), mpi_ranks=ranks).as_dict()
    if ranks == 1:
        spec["kwargs"]["launcher"] = ""  # no mpiexec for one rank
    work.mkdir(parents=True, exist_ok=True)
    write_dataset(work / "in.npz", structures)
    result = _label_batch(
        str(work / "in.npz"), str(work / "out.npz"), spec, str(work / "scratch"),
        max_force=50.0, timeout_s=0.0, isolate=False,
    )  # fmt: skip
    if result["failures"]:
        raise RuntimeError(f"CP2K failed: {result['failures']}")
    return result["oracle_seconds"], np.asarray(read_arrays(work / "out.npz")["energy"])


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--structures", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    structures = boxes(args.structures)
    seconds: dict[int, list[float]] = {1: [], 2: []}
    energies: dict[int, np.ndarray] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeat):
            for ranks in (1, 2) if repeat % 2 == 0 else (2, 1):
                took, energy = label(structures, ranks, Path(tmp) / f"r{repeat}-{ranks}")
                seconds[ranks] += took
                energies[ranks] = energy
                print(f"  {ranks} rank(s): " + ", ".join(f"{s:.1f}" for s in took) + " s")
    medians = {ranks: statistics.median(s) for ranks, s in seconds.items()}
    spread = {ranks: [min(s), max(s)] for ranks, s in seconds.items()}
    difference = float(np.abs(energies[1] - energies[2]).max())
    print(f"8 waters, {args.structures} structures x {args.repeat} repeats:")
    for ranks in (1, 2):
        print(f"  {ranks} rank(s): median {medians[ranks]:.1f} s per label {spread[ranks]}")
    print(f"  2 ranks / 1 rank: {medians[2] / medians[1]:.2f}")
    print(f"  largest energy difference between the layouts: {difference:.2e} eV")
    result = {
        "structures": args.structures,
        "repeat": args.repeat,
        "seconds_per_label": {str(k): v for k, v in seconds.items()},
        "median_s": {str(k): v for k, v in medians.items()},
        "ratio_2_over_1": medians[2] / medians[1],
        "energy_difference_eV": difference,
        "wall_s": time.perf_counter() - t0,
    }
    common.write_results("cp2k_oracle", result)


if __name__ == "__main__":
    main()
