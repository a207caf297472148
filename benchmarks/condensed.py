"""Copper in three forms: does one committee learn them all, and does it give EMT's
density at constant pressure?

    python benchmarks/condensed.py [--labels 300] [--steps 4000] [--seed 0]

One campaign, ``examples/cu_systems.toml`` (EMT; a periodic bulk cell at 1 atm, a
(111) slab and a 13-atom cluster, each at 300 K and 1200 K; stress labels and a
stress weight; on the ``threads.py`` site by default), then the same NPT dynamics of
the bulk cell (palflow's batched walkers, stochastic cell rescaling, ``--steps``
steps of 2 fs at ``--temperature`` after a fifth as many of equilibration) driven
once by the final ensemble and once by EMT itself, from the same start. Prints and
writes to ``benchmarks/results/condensed.json``:

- per system and overall, the test force MAE of the first and the final ensemble
  version, and their ratio (issue 14's goal: every system's at least halves);
- the mean volume per atom under each potential, with the block standard error, and
  the density ratio (goal: within 2%).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common
import numpy as np
from common import ROOT, run_on_site

common.use_this_interpreter()

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

    from palflow.apps.common import draw_velocities
    from palflow.apps.generator import BatchedDynamics

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
    parser = common.parser(__doc__)
    parser.add_argument("--labels", type=int, default=300, help="label budget")
    parser.add_argument("--max-wall", type=float, default=600.0, help="wall limit, s")
    md = parser.add_argument_group("the NPT dynamics of the bulk cell")
    md.add_argument("--steps", type=int, default=4000)
    md.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--site", default="threads.py")
    args = parser.parse_args()

    import parsl
    from ase.calculators.emt import EMT

    from palflow.apps.models.core import load_checkpoint
    from palflow.pipeline.config.settings import load_campaign
    from palflow.pipeline.config.sites import load_site, warm_up
    from palflow.pipeline.engine.coordinator import Coordinator
    from palflow.pipeline.state.rundir import RunDirectory

    work = Path(tempfile.mkdtemp(prefix="palflow-condensed-"))
    campaign = load_campaign(
        ROOT / "examples" / "cu_systems.toml",
        seed=args.seed,
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
    systems = {}
    for name, last in final.get("systems", {}).items():
        start = first["systems"][name]["force_mae"]
        systems[name] = {
            "labels": summary["systems"][name]["labels"],
            "first_force_mae": start,
            "final_force_mae": last["force_mae"],
            "ratio": last["force_mae"] / start,
        }
        print(f"  {name:8s} {systems[name]['labels']:4d} labels, test force MAE {start:.4f} -> "
              f"{last['force_mae']:.4f} eV/Å ({last['force_mae'] / start:.2f}x)")  # fmt: skip

    model, _ = load_checkpoint(RunDirectory(work / "run").ensembles()[-1][1])
    bulk_system = campaign.system_named("bulk")
    settings = campaign.generator_for(bulk_system) | {
        "timestep_fs": 2.0,
        "friction": 0.01,
        "temperature_K": args.temperature,
    }
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
        "systems": systems,
        "mean_volume_per_atom": {k: float(v.mean()) for k, v in volumes.items()},
        "volume_standard_error": {k: block_error(v) for k, v in volumes.items()},
        "density_ratio_ensemble_over_emt": density_ratio,
        "settings": vars(args),
    }
    print(f"final/first test force MAE {result['force_mae_ratio']:.2f} (goal <= 0.5); "
          f"density ensemble/EMT {density_ratio:.4f} (goal within 0.98-1.02)")  # fmt: skip
    common.write_results("condensed", result)


if __name__ == "__main__":
    main()
