"""Make ``water8_cp2k_test.extxyz``: the held-out set of ``examples/water_cp2k.toml``.

    python examples/structures/water8_cp2k_test.py [--frames 8] [--ranks 2]

Held-out frames from oracle-driven MD cost one CP2K call per MD step (the example's
first run spent 1030 s, more than half its 30 minutes, on 6 frames 4 steps apart).
This script spends that once: Langevin MD of ``water8.xyz`` at 300 K on periodic
GFN1-xTB (tblite, about 0.1 s a step), one frame every ``--stride`` steps after
``--equilibrate`` steps, so the frames are decorrelated; then each frame is labelled
by palflow's own oracle task with the example's CP2K settings (read from the TOML,
so the file and the campaign cannot drift apart) and written with its energy, forces
and stress. ``tests/test_cp2k.py`` checks a frame of the file against CP2K again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from palflow.apps.contracts import CalculatorSpec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUTPUT = HERE / "water8_cp2k_test.extxyz"
CAMPAIGN = ROOT / "examples" / "water_cp2k.toml"

# Open MPI as root, more ranks than cores: what site_configs/laptop.py sets.
os.environ.update(
    OMPI_ALLOW_RUN_AS_ROOT="1",
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    OMPI_MCA_rmaps_base_oversubscribe="1",
)


def oracle_spec(ranks: int) -> dict:
    """The example's calculator spec, on ``ranks`` MPI ranks."""
    from palflow.pipeline.config.settings import load_campaign

    oracle = load_campaign(CAMPAIGN).oracle
    spec = dataclasses.replace(CalculatorSpec.of(oracle), mpi_ranks=ranks).as_dict()
    if ranks == 1:
        spec["kwargs"]["launcher"] = ""  # no mpiexec for one rank
    return spec


def xtb_frames(n: int, stride: int, equilibrate: int, seed: int) -> list:
    """``n`` frames of GFN1-xTB Langevin MD at 300 K, ``stride`` steps apart."""
    from ase import units
    from ase.io import read
    from ase.md.langevin import Langevin
    from tblite.ase import TBLite

    from palflow.apps.common import draw_velocities

    atoms = read(HERE / "water8.xyz")
    atoms.calc = TBLite(method="GFN1-xTB", verbosity=0)
    rng = np.random.default_rng(seed)
    draw_velocities(atoms, 300.0, rng)
    dynamics = Langevin(
        atoms, 0.5 * units.fs, temperature_K=300, friction=0.02, fixcm=False, rng=rng
    )
    dynamics.run(equilibrate)
    frames = []
    for i in range(n):
        dynamics.run(stride)
        frames.append(atoms.copy())
        print(f"  xTB frame {i + 1}/{n}: {equilibrate + (i + 1) * stride} steps", flush=True)
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--stride", type=int, default=100, help="MD steps between frames")
    parser.add_argument("--equilibrate", type=int, default=200)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()

    from ase.io import write

    from palflow.apps.data.dataset import read_dataset, write_dataset
    from palflow.apps.oracle import _label_batch

    t0 = time.perf_counter()
    frames = xtb_frames(args.frames, args.stride, args.equilibrate, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(f"{tmp}/in.npz", frames)
        result = _label_batch(
            f"{tmp}/in.npz", f"{tmp}/out.npz", oracle_spec(args.ranks), f"{tmp}/scratch",
            max_force=20.0, timeout_s=0.0, isolate=False,
        )  # fmt: skip
        if result["failures"]:
            sys.exit(f"CP2K failed on frames {result['failures']}: nothing written")
        labelled = read_dataset(f"{tmp}/out.npz")
    write(args.output, labelled, format="extxyz")
    seconds = result["oracle_seconds"]
    print(
        f"wrote {len(labelled)} CP2K-labelled frames to {args.output.name} in "
        f"{time.perf_counter() - t0:.0f} s (CP2K median {np.median(seconds):.1f} s a label)"
    )


if __name__ == "__main__":
    main()
