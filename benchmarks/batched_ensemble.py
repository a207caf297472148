"""What one MD step costs: K ensemble members batched against one after another,
and W walkers evaluated together against one at a time.

    python benchmarks/batched_ensemble.py --repeat 200

One "step" is what the generator pays per MD step: neighbour list, energy and
forces of every member, for the default campaign's molecule (ethanol) and model.
Timings are medians over ``--repeat`` calls, the variants interleaved so that
machine noise hits them alike. Writes ``benchmarks/results/batched_ensemble.json``
and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Tests point this elsewhere, so that tiny runs never overwrite the measured results.
RESULTS = Path(os.environ.get("PALFLOW_BENCH_OUT", ROOT / "benchmarks" / "results"))
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    import torch
    from ase.build import molecule

    from apps.calculator import _run
    from apps.model import ModelSpec, SchNetEnsemble, build_batch
    from pipeline.settings import load_campaign

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    campaign = load_campaign()
    spec = ModelSpec(**campaign.model.model_dump(exclude={"name", "n_members"}))
    torch.manual_seed(0)
    ensembles = {k: SchNetEnsemble(spec, k).eval() for k in (1, 4, 8)}
    singles = {k: [ensembles[k].member(i).eval() for i in range(k)] for k in (4, 8)}
    rng = np.random.default_rng(0)
    base = molecule(campaign.system.structure)

    def frames(n):
        out = []
        for _ in range(n):
            atoms = base.copy()
            atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
            out.append(atoms)
        return out

    def step(models, structures):
        batch = build_batch(structures, spec.cutoff, "cpu", with_targets=False)
        for model in models:
            _run(model, batch)

    variants = {
        "K=1": lambda: step([ensembles[1]], frames(1)),
        "K=4 batched": lambda: step([ensembles[4]], frames(1)),
        "K=4 one by one": lambda: step(singles[4], frames(1)),
        "K=8 batched": lambda: step([ensembles[8]], frames(1)),
        "K=8 one by one": lambda: step(singles[8], frames(1)),
    }
    walker_variants = {}
    for walkers in (1, 8, 32):
        structures = frames(walkers)
        walker_variants[f"W={walkers} together"] = (
            walkers,
            lambda s=structures: step([ensembles[4]], s),
        )
        walker_variants[f"W={walkers} one at a time"] = (
            walkers,
            lambda s=structures: [step([ensembles[4]], [a]) for a in s],
        )
    times = {name: [] for name in [*variants, *walker_variants]}
    for call in [*variants.values(), *(c for _, c in walker_variants.values())]:
        call()  # warm-up
    for _ in range(args.repeat):
        for name, call in variants.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    for _ in range(max(args.repeat // 10, 5)):
        for name, (_, call) in walker_variants.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)

    median_ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    base_ms = median_ms["K=1"]
    rows = []
    print(f"one MD step of {campaign.system.structure}, torch threads {args.threads}")
    print(f"{'variant':<22}{'ms (median)':>12}{'/ K=1':>8}")
    for name in variants:
        rows.append({"variant": name, "ms": median_ms[name], "over_K1": median_ms[name] / base_ms})
        print(f"{name:<22}{median_ms[name]:>12.2f}{median_ms[name] / base_ms:>8.2f}")
    print(f"{'walkers (K=4)':<22}{'ms per walker-step':>20}")
    for name, (walkers, _) in walker_variants.items():
        per = median_ms[name] / walkers
        rows.append(
            {"variant": name, "walkers": walkers, "ms": median_ms[name], "ms_per_walker_step": per}
        )
        print(f"{name:<22}{per:>20.3f}")
    target = median_ms["K=4 batched"] / base_ms
    print(
        f"K=4 batched / K=1 = {target:.2f} (target <= 1.5); "
        f"one by one = {median_ms['K=4 one by one'] / base_ms:.2f}"
    )
    out = RESULTS
    out.mkdir(exist_ok=True)
    (out / "batched_ensemble.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "batched_ensemble.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    members = [r for r in rows if "walkers" not in r]
    left.bar([r["variant"] for r in members], [r["ms"] for r in members], color="tab:blue")
    left.set_ylabel("ms per MD step")
    left.set_title("ensemble members")
    left.tick_params(axis="x", rotation=30)
    walkers = [r for r in rows if "walkers" in r]
    right.bar(
        [r["variant"] for r in walkers],
        [r["ms_per_walker_step"] for r in walkers],
        color="tab:orange",
    )
    right.set_ylabel("ms per walker-step (K=4)")
    right.set_title("walkers")
    right.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
