"""Bulk copper at constant pressure: does the committee a campaign learns give EMT's
density, and how far does its test error fall?

    python benchmarks/condensed.py [--labels 100] [--steps 4000] [--seed 0]

One campaign (EMT on a 32-atom periodic copper cell, NPT walkers at ``--temperature``
and 1 atm, stress labels and a stress weight, on the ``threads.py`` site by default),
then the same NPT dynamics (palflow's batched walkers, stochastic cell rescaling,
``--steps`` steps of 2 fs after a fifth as many of equilibration) driven once by
the final ensemble and once by EMT itself, from the same start. Prints and writes to
``benchmarks/results/condensed.json``:

- the test force and stress MAE of the first and the final ensemble version, and
  their ratio (issue 14's goal: the force MAE at least halves);
- the mean volume per atom under each potential, with the block standard error, and
  the density ratio (goal: within 2%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("PALFLOW_BENCH_OUT", ROOT / "benchmarks" / "results"))
os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))

from time_to_accuracy import run_on_site  # noqa: E402

KEYS = ("labels", "force_mae", "energy_mae_per_atom", "stress_mae")
"""What the summary says about an ensemble version, kept for the first and last."""


def block_error(values: np.ndarray, blocks: int = 8) -> float:
    size = len(values) // blocks
    means = [values[i * size : (i + 1) * size].mean() for i in range(blocks)]
    return float(np.std(means, ddof=1) / np.sqrt(blocks))


def npt_volumes(driver, settings: dict, steps: int, seed: int) -> np.ndarray:
    """Volume per atom (Å³) every 5 steps of NPT MD of bulk copper on ``driver`` (an
    ensemble or an ASE calculator), after ``steps // 5`` steps of equilibration."""
    from ase.build import bulk

    from apps.common import draw_velocities
    from apps.generator import BatchedDynamics

    atoms = bulk("Cu", cubic=True).repeat(2)
    rng = np.random.default_rng(seed)
    draw_velocities(atoms, settings["temperature_K"], rng)
    dynamics = BatchedDynamics(driver, [atoms], settings, rng)
    volumes = []
    for step in range(steps // 5 + steps):
        dynamics.step([0])
        if step >= steps // 5 and step % 5 == 0:
            volumes.append(atoms.get_volume() / len(atoms))
    return np.asarray(volumes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--max-wall", type=float, default=600.0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--site", default="threads.py")
    args = parser.parse_args()

    import parsl
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.io import write

    from apps.model import load_checkpoint
    from pipeline.coordinator import Coordinator
    from pipeline.rundir import RunDirectory
    from pipeline.settings import load_campaign
    from pipeline.sites import load_site, warm_up

    work = Path(tempfile.mkdtemp(prefix="palflow-condensed-"))
    write(work / "cu32.extxyz", bulk("Cu", cubic=True).repeat(2))
    campaign = load_campaign(
        ROOT / "examples" / "cu_emt.toml",
        name="cu32-npt",
        seed=args.seed,
        system__structure=str(work / "cu32.extxyz"),
        generator__temperature_K=args.temperature,
        generator__pressure_bar=1.01325,
        generator__compressibility_per_bar=7e-7,
        generator__barostat_time_fs=100.0,
        selection__threshold=0.02,
        stop__max_labels=args.labels,
        stop__max_wall_s=args.max_wall,
        stop__final_training_s=30.0,
    )
    site = load_site(args.site)
    site.config.run_dir = str(work / "parsl")
    t0 = time.perf_counter()
    with parsl.load(site.config):
        warm_up(site.slots)
        summary = run_on_site(Coordinator, campaign, work / "run", site)
    parsl.clear()
    campaign_s = time.perf_counter() - t0
    curve = summary["test_errors"]
    first, final = curve[0], curve[-1]
    print(f"campaign: {summary['labels']} labels in {campaign_s:.0f} s; test force MAE "
          f"{first['force_mae']:.4f} -> {final['force_mae']:.4f} eV/Å", flush=True)  # fmt: skip

    model, _ = load_checkpoint(RunDirectory(work / "run").ensembles()[-1][1])
    settings = campaign.generator.model_dump() | {"timestep_fs": 2.0, "friction": 0.01}
    volumes = {}
    for name, driver in (("ensemble", model.eval()), ("emt", EMT())):
        t = time.perf_counter()
        volumes[name] = npt_volumes(driver, settings, args.steps, args.seed + 1)
        print(f"NPT on {name}: {volumes[name].mean():.4f} ± {block_error(volumes[name]):.4f} "
              f"Å³/atom ({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
    density_ratio = volumes["emt"].mean() / volumes["ensemble"].mean()
    result = {
        "labels": summary["labels"],
        "initial_labels": summary["initial_labels"],
        "campaign_s": campaign_s,
        "first": {k: first.get(k) for k in KEYS},
        "final": {k: final.get(k) for k in KEYS},
        "force_mae_ratio": final["force_mae"] / first["force_mae"],
        "mean_volume_per_atom": {k: float(v.mean()) for k, v in volumes.items()},
        "volume_standard_error": {k: block_error(v) for k, v in volumes.items()},
        "density_ratio_ensemble_over_emt": density_ratio,
        "settings": vars(args),
    }
    print(f"final/first test force MAE {result['force_mae_ratio']:.2f} (goal <= 0.5); "
          f"density ensemble/EMT {density_ratio:.4f} (goal within 0.98-1.02)")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "condensed.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
