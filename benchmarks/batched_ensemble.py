"""What one MD step costs: K ensemble members batched against one after another,
W walkers evaluated together against one at a time, and whole generator tasks that
advance W walkers together against W tasks of one walker each.

    python benchmarks/batched_ensemble.py --repeat 200

One "step" is what the generator pays per MD step: neighbour list, energy and
forces of every member, for the default campaign's molecule (ethanol) and model.
Timings are medians over ``--repeat`` calls, the variants interleaved so that
machine noise hits them alike. Writes ``benchmarks/results/batched_ensemble.json``
and ``.png``.

The generator tasks are the real app (``apps.generator._run_md``, checkpoint loading
and file writing included) with the default campaign's generator settings; "one
walker per task" runs W such tasks one after another in one process, which is what
they cost on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Tests point this elsewhere, so that tiny runs never overwrite the measured results.
RESULTS = Path(os.environ.get("PALFLOW_BENCH_OUT", ROOT / "benchmarks" / "results"))


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
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    campaign = load_campaign()
    spec = ModelSpec(**campaign.model.model_dump(exclude={"name", "n_members"}))
    torch.manual_seed(0)
    ensembles = {k: SchNetEnsemble(spec, k).eval().to(args.device) for k in (1, 4, 8)}
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
        batch = build_batch(structures, spec.cutoff, args.device, with_targets=False)
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
    print(
        f"one MD step of {campaign.system.structure} on {args.device}, torch threads {args.threads}"
    )
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
    tasks = generator_tasks(
        ensembles[4].to("cpu"), base, campaign, max(args.repeat // 40, 3), args.device
    )
    print(
        f"{'generator tasks (K=4)':<26}{'s per walker-segment':>22}{'one per task / together':>26}"
    )
    for walkers, (together, alone) in tasks.items():
        rows.append(
            {
                "variant": f"tasks W={walkers}",
                "task_walkers": walkers,
                "s_per_walker_segment_together": together,
                "s_per_walker_segment_one_per_task": alone,
                "one_per_task_over_together": alone / together,
            }
        )
        print(f"{f'W={walkers}':<26}{together:>10.3f} vs {alone:<9.3f}{alone / together:>26.2f}")
    target = median_ms["K=4 batched"] / base_ms
    print(
        f"K=4 batched / K=1 = {target:.2f} (target <= 1.5); "
        f"one by one = {median_ms['K=4 one by one'] / base_ms:.2f}"
    )
    out = RESULTS
    out.mkdir(exist_ok=True)
    (out / "batched_ensemble.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "batched_ensemble.png")


def generator_tasks(
    model, start, campaign, repeat: int, device: str = "cpu"
) -> dict[int, tuple[float, float]]:
    """Seconds per walker-segment of real generator tasks: W walkers in one task,
    and W tasks of one walker; medians over ``repeat`` rounds, interleaved."""
    import tempfile

    from ase.io import write

    from apps.generator import _run_md
    from apps.model import save_checkpoint

    # Every walker runs every step: an untrained ensemble would otherwise end some
    # segments early at its hard caps, and the timings would measure that.
    settings = {
        **campaign.generator.model_dump(),
        "max_force_disagreement": 1e9,
        "min_distance": 0.0,
        "max_neighbour_distance": 1e9,
    }
    work = Path(tempfile.mkdtemp(prefix="palflow-bench-"))
    checkpoint = str(work / "ensemble.pt")
    save_checkpoint(checkpoint, model, {"version": 1})
    start_path = str(work / "start.extxyz")
    write(start_path, start)

    def task(walkers: int, seed: int) -> None:
        result = _run_md(
            [start_path] * walkers,
            checkpoint,
            [str(work / f"w{i}.npz") for i in range(walkers)],
            [str(work / f"w{i}.extxyz") for i in range(walkers)],
            settings,
            seed,
            device=device,
        )
        assert not any(w["blew_up"] for w in result["walkers"])

    timings: dict[int, tuple[list[float], list[float]]] = {w: ([], []) for w in (1, 4, 8)}
    task(1, 0)  # warm-up
    for round_ in range(repeat):
        for walkers, (together, alone) in timings.items():
            t0 = time.perf_counter()
            task(walkers, round_)
            together.append((time.perf_counter() - t0) / walkers)
            t0 = time.perf_counter()
            for walker in range(walkers):
                task(1, round_ * 100 + walker)
            alone.append((time.perf_counter() - t0) / walkers)
    return {
        w: (statistics.median(together), statistics.median(alone))
        for w, (together, alone) in timings.items()
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4))
    members = [r for r in rows if "over_K1" in r]
    left.bar([r["variant"] for r in members], [r["ms"] for r in members], color="tab:blue")
    left.set_ylabel("ms per MD step")
    left.set_title("ensemble members")
    left.tick_params(axis="x", rotation=30)
    walkers = [r for r in rows if "ms_per_walker_step" in r]
    middle.bar(
        [r["variant"] for r in walkers],
        [r["ms_per_walker_step"] for r in walkers],
        color="tab:orange",
    )
    middle.set_ylabel("ms per walker-step (K=4)")
    middle.set_title("walkers in one pass")
    middle.tick_params(axis="x", rotation=30)
    tasks = [r for r in rows if "task_walkers" in r]
    x = range(len(tasks))
    right.bar(
        [i - 0.2 for i in x],
        [r["s_per_walker_segment_together"] for r in tasks],
        0.4,
        label="W walkers in one task",
    )
    right.bar(
        [i + 0.2 for i in x],
        [r["s_per_walker_segment_one_per_task"] for r in tasks],
        0.4,
        label="one walker per task",
    )
    right.set_xticks(list(x), [f"W={r['task_walkers']}" for r in tasks])
    right.set_ylabel("s per walker-segment")
    right.set_title("generator tasks")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
