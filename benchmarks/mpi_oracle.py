"""What one MPI oracle task costs with 1 and with 2 ranks: NWChem DFT on water.

    python benchmarks/mpi_oracle.py --repeat 5

Each task labels a batch of rattled water molecules (PBE/3-21G) through the oracle
app, with ``{mpi_prefix}`` becoming ``mpiexec -n RANKS``. Reports the median task
time and the median seconds per structure. Writes
``benchmarks/results/mpi_oracle.json``.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import common
from common import ROOT, cell

from palflow.apps.contracts import CalculatorSpec

common.allow_mpi_as_root()


def main() -> None:
    from ase.build import molecule

    from palflow.apps.data.dataset import write_dataset
    from palflow.apps.oracle import _label_batch
    from palflow.pipeline.config.settings import load_campaign

    parser = common.parser(__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2, help="structures per task")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="palflow-mpi-"))
    structures = []
    for seed in range(args.batch):
        atoms = molecule("H2O")
        atoms.rattle(0.05, seed=seed)
        structures.append(atoms)
    write_dataset(work / "in.npz", structures)
    oracle = load_campaign(ROOT / "examples" / "water_nwchem.toml").oracle
    spec = CalculatorSpec.of(oracle, mpi_command="mpiexec -n {ranks}")
    times: dict[int, list[float]] = {ranks: [] for ranks in args.ranks}
    for repeat in range(args.repeat):
        for ranks in args.ranks:  # interleaved, so machine noise hits both alike
            t0 = time.perf_counter()
            result = _label_batch(
                str(work / "in.npz"),
                str(work / f"out{repeat}.npz"),
                dataclasses.replace(spec, mpi_ranks=ranks).as_dict(),
                str(work / "failed"),
                max_force=50.0,
                timeout_s=0.0,
                isolate=True,
            )
            if result["n_ok"] != args.batch:
                raise RuntimeError(f"NWChem failed: {result['failures']}")
            times[ranks].append(time.perf_counter() - t0)
    rows = []
    for ranks in args.ranks:
        median = statistics.median(times[ranks])
        rows.append(
            {
                "ranks": ranks,
                "task_s": median,
                "per_structure_s": median / args.batch,
                "all_s": times[ranks],
            }
        )
    common.print_table(
        [
            ("ranks", ">5", cell("ranks")),
            ("task s (median)", ">18", cell("task_s", ".2f")),
            ("s per structure", ">17", cell("per_structure_s", ".2f")),
        ],
        rows,
    )
    if len(rows) > 1:
        print(
            f"speed-up {args.ranks[-1]} vs {args.ranks[0]} ranks: "
            f"{rows[0]['task_s'] / rows[-1]['task_s']:.2f}"
        )
    common.write_results("mpi_oracle", rows)


if __name__ == "__main__":
    main()
