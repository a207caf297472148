"""What one MD step costs: K ensemble members batched against one after another,
W walkers evaluated together against one at a time, and whole generator tasks that
advance W walkers together against W tasks of one walker each.

    python benchmarks/batched_ensemble.py --repeat 200

One "step" is what the generator pays per MD step: neighbour list, energy and
forces of every member, for the default campaign's molecule (ethanol) and model.
Timings are medians over ``--repeat`` calls, the variants interleaved so that
machine noise hits them alike. Writes ``benchmarks/results/batched_ensemble.json``
and ``.png``.

The generator tasks are the real app (``palflow.apps.generator._run_md``, checkpoint loading
and file writing included) with the default campaign's generator settings; "one
walker per task" runs W such tasks one after another in one process, which is what
they cost on one core.

With ``--model mace`` (``examples/ethanol_mace.toml``'s members), the committee's
cost for K = 1, 4 and 8 members and W = 1 and 8 walkers: one ``build_batch`` and
one ensemble forward of all K members ("batched") against K ``build_batch`` calls
and K one-member forwards ("separate"), as K separate calculators would run.
Writes ``batched_ensemble_mace.json`` and ``.png``; ``--dtype float32 float64``
compares precisions in the same run.

    python benchmarks/batched_ensemble.py --model mace --repeat 30 --dtype float32 float64
"""

from __future__ import annotations

import statistics
import time
from functools import partial
from pathlib import Path

import common
from common import ROOT, cell, rattled


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--model", choices=("schnet", "mace"), default="schnet")
    parser.add_argument(
        "--repeat", type=int, help="timed rounds (default: 200 for SchNet, 30 for MACE)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=("float32", "float64"),
        help="MACE precisions to compare (default: the campaign's)",
    )
    args = parser.parse_args()
    if args.model == "mace":
        args.repeat = args.repeat or 30
        mace_committee_cost(args)
    else:
        args.repeat = args.repeat or 200
        schnet_step_cost(args)


def schnet_step_cost(args) -> None:
    """The SchNet committee, walkers and generator tasks (see the module's description)."""
    import numpy as np
    import torch
    from ase.build import molecule

    from palflow.apps.models.calculator import _run
    from palflow.apps.models.core import build_batch
    from palflow.apps.models.schnet.network import ModelSpec, SchNetEnsemble
    from palflow.pipeline.config.settings import load_campaign

    torch.set_num_threads(args.threads)
    campaign = load_campaign()
    spec = ModelSpec(**campaign.model.model_dump(exclude={"name", "n_members"}))
    torch.manual_seed(0)
    ensembles = {k: SchNetEnsemble(spec, k).eval().to(args.device) for k in (1, 4, 8)}
    singles = {k: [ensembles[k].member(i).eval() for i in range(k)] for k in (4, 8)}
    rng = np.random.default_rng(0)
    base = molecule(campaign.system.structure)

    def frames(n):
        return rattled(base, n, rng)

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
    for name in variants:
        rows.append({"variant": name, "ms": median_ms[name], "over_K1": median_ms[name] / base_ms})
    common.print_table(
        [
            ("variant", "<22", cell("variant")),
            ("ms (median)", ">12", cell("ms", ".2f")),
            ("/ K=1", ">8", cell("over_K1", ".2f")),
        ],
        rows,
    )
    walker_rows = []
    for name, (walkers, _) in walker_variants.items():
        per = median_ms[name] / walkers
        walker_rows.append(
            {"variant": name, "walkers": walkers, "ms": median_ms[name], "ms_per_walker_step": per}
        )
    common.print_table(
        [
            ("walkers (K=4)", "<22", cell("variant")),
            ("ms per walker-step", ">20", cell("ms_per_walker_step", ".3f")),
        ],
        walker_rows,
    )
    rows += walker_rows
    tasks = generator_tasks(
        ensembles[4].to("cpu"), base, campaign, max(args.repeat // 40, 3), args.device
    )
    task_rows = []
    for walkers, (together, alone) in tasks.items():
        task_rows.append(
            {
                "variant": f"tasks W={walkers}",
                "task_walkers": walkers,
                "s_per_walker_segment_together": together,
                "s_per_walker_segment_one_per_task": alone,
                "one_per_task_over_together": alone / together,
            }
        )
    common.print_table(
        [
            ("generator tasks (K=4)", "<26", lambda row: f"W={row['task_walkers']}"),
            ("s per walker-segment", ">22", together_vs_alone),
            ("one per task / together", ">26", cell("one_per_task_over_together", ".2f")),
        ],
        task_rows,
    )
    rows += task_rows
    target = median_ms["K=4 batched"] / base_ms
    print(
        f"K=4 batched / K=1 = {target:.2f} (target <= 1.5); "
        f"one by one = {median_ms['K=4 one by one'] / base_ms:.2f}"
    )
    common.write_results("batched_ensemble", rows, plot)


def together_vs_alone(row: dict) -> str:
    """Seconds per walker-segment of W walkers in one task vs one walker a task."""
    together, alone = row["s_per_walker_segment_together"], row["s_per_walker_segment_one_per_task"]
    return f"{together:.3f} vs {alone:.3f}"


def generator_tasks(
    model, start, campaign, repeat: int, device: str = "cpu"
) -> dict[int, tuple[float, float]]:
    """Seconds per walker-segment of real generator tasks: W walkers in one task,
    and W tasks of one walker; medians over ``repeat`` rounds, interleaved."""
    import tempfile

    from ase.io import write

    from palflow.apps.generator import _run_md
    from palflow.apps.models.core import save_checkpoint

    # Every walker runs every step: an untrained ensemble would otherwise end some
    # segments early at its hard caps, and the timings would measure that.
    settings = {
        **campaign.generator.model_dump(),
        "max_force_disagreement": 1e9,
        "min_distance": 0.0,
        "min_distance_factor": 0.0,
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
    plt = common.pyplot()
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
    common.save_figure(figure, path)


# ------------------------------------------------------------------ MACE (--model mace)
MACE_CAMPAIGN = ROOT / "examples" / "ethanol_mace.toml"
MACE_MEMBERS = (1, 4, 8)
MACE_WALKERS = (1, 8)


def mace_committee_cost(args) -> None:
    """MACE: K members on one graph against K separate calculators; median ms per MD
    step over ``args.repeat`` interleaved rounds (see the module's description)."""
    import numpy as np
    import torch
    from ase.build import molecule

    from palflow.apps.models.calculator import _run
    from palflow.apps.models.core import build_batch
    from palflow.pipeline.config.settings import load_campaign

    torch.set_num_threads(args.threads)
    campaign = load_campaign(MACE_CAMPAIGN)
    dtypes = args.dtype or [campaign.model.dtype]
    base = molecule(campaign.system.structure)
    rng = np.random.default_rng(0)
    frames = {w: rattled(base, w, rng) for w in MACE_WALKERS}
    r_max = campaign.model.r_max

    def batched(committee, structures):
        _run(committee, build_batch(structures, r_max, args.device, with_targets=False))

    def separate(members, structures):
        for member in members:  # each calculator builds its own neighbour list
            _run(member, build_batch(structures, r_max, args.device, with_targets=False))

    calls, specs = {}, {}
    for dtype in dtypes:
        specs[dtype], committees, singles = mace_committees(dtype, base, rng, args.device)
        prefix = f"{dtype} " if len(dtypes) > 1 else ""
        for walkers, structures in frames.items():
            for k in MACE_MEMBERS:
                modes = {"batched": partial(batched, committees[k], structures)}
                if k > 1:  # one member alone is the same either way
                    modes["separate"] = partial(separate, singles[:k], structures)
                for mode, call in modes.items():
                    name = f"{prefix}K={k} W={walkers}" + (f" {mode}" if k > 1 else "")
                    calls[name] = ({"dtype": dtype, "members": k, "walkers": walkers}, mode, call)
    times = {name: [] for name in calls}
    for *_, call in calls.values():
        call()  # warm-up
    for _ in range(args.repeat):
        for name, (*_, call) in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    rows = [
        {"variant": name, **key, "mode": mode, "ms": 1e3 * statistics.median(times[name])}
        for name, (key, mode, _) in calls.items()
    ]
    summary = mace_summary(rows)
    print_mace(rows, summary, campaign.system.structure, args)
    result = {
        "model": "mace",
        "molecule": campaign.system.structure,
        "device": args.device,
        "threads": args.threads,
        "repeat": args.repeat,
        "specs": specs,
        "rows": rows,
        "summary": summary,
    }
    common.write_results("batched_ensemble_mace", result, lambda _, path: plot_mace(rows, path))


def mace_committees(dtype: str, base, rng, device: str):
    """The MACE campaign's member spec in ``dtype``, committees of K = 1, 4 and 8, and
    the eight members as K=1 models.

    The E0s are fitted on EMT labels of rattled frames: they shift energies only, and
    this benchmark times the passes.
    """
    from ase.calculators.emt import EMT

    from palflow.apps.models.core import new_ensemble
    from palflow.apps.models.mace.ensemble import MACEEnsemble
    from palflow.pipeline.config.models import resolve_model_spec
    from palflow.pipeline.config.settings import load_campaign

    campaign = load_campaign(MACE_CAMPAIGN, model__dtype=dtype)
    labelled = rattled(base, 8, rng)
    for atoms in labelled:
        atoms.calc = EMT()
        atoms.get_potential_energy()
    spec = resolve_model_spec(campaign, labelled, base)
    largest = new_ensemble(spec["name"], spec, max(MACE_MEMBERS), seed=0, device=device).eval()
    singles = [largest.member(i).eval() for i in range(largest.n_members)]
    committees = {k: MACEEnsemble.stack(singles[:k]).eval() for k in MACE_MEMBERS}
    return spec, committees, singles


def mace_summary(rows: list[dict]) -> list[dict]:
    """Per precision and walker count: batched over separate, and K over K=1."""
    ms = {(r["dtype"], r["members"], r["walkers"], r["mode"]): r["ms"] for r in rows}
    summary = []
    for dtype, k, walkers, mode in ms:
        if k != 1:
            continue
        one = ms[dtype, 1, walkers, mode]
        entry = {"dtype": dtype, "walkers": walkers, "K1_ms": one}
        for members in MACE_MEMBERS[1:]:
            batched = ms[dtype, members, walkers, "batched"]
            entry[f"K{members}_batched_over_separate"] = (
                batched / ms[dtype, members, walkers, "separate"]
            )
            entry[f"K{members}_over_K1"] = batched / one
        summary.append(entry)
    return summary


def print_mace(rows: list[dict], summary: list[dict], molecule: str, args) -> None:
    print(
        f"MACE: one MD step of {molecule} (neighbour list, energies and forces of every "
        f"member) on {args.device}, torch threads {args.threads}, {args.repeat} rounds"
    )
    common.print_table(
        [
            ("variant", "<34", cell("variant")),
            ("ms (median)", ">12", cell("ms", ".2f")),
            ("ms per walker-step", ">20", lambda row: f"{row['ms'] / row['walkers']:.2f}"),
        ],
        rows,
    )
    for entry in summary:
        print(
            f"{entry['dtype']} W={entry['walkers']}: K=4 batched / four separate = "
            f"{entry['K4_batched_over_separate']:.2f} (goal <= 0.6), "
            f"K=4 / K=1 = {entry['K4_over_K1']:.2f}; K=8 batched / eight separate = "
            f"{entry['K8_batched_over_separate']:.2f}, K=8 / K=1 = {entry['K8_over_K1']:.2f}"
        )


def plot_mace(rows: list[dict], path: Path) -> None:
    plt = common.pyplot()
    walkers = sorted({r["walkers"] for r in rows})
    kinds = sorted({(r["dtype"], r["mode"]) for r in rows if r["members"] > 1})
    figure, axes = plt.subplots(1, len(walkers), figsize=(5.5 * len(walkers), 4), squeeze=False)
    width = 0.8 / len(kinds)
    for axis, w in zip(axes[0], walkers, strict=True):
        for i, (dtype, mode) in enumerate(kinds):
            offset = (i - (len(kinds) - 1) / 2) * width
            chosen = [
                r
                for r in rows
                if r["walkers"] == w
                and r["dtype"] == dtype
                and (r["mode"] == mode or r["members"] == 1)
            ]
            axis.bar(
                [MACE_MEMBERS.index(r["members"]) + offset for r in chosen],
                [r["ms"] for r in chosen],
                width,
                label=f"{dtype} {mode}",
            )
        axis.set_xticks(range(len(MACE_MEMBERS)), [f"K={k}" for k in MACE_MEMBERS])
        axis.set_ylabel("ms per MD step")
        axis.set_title(f"MACE committee, W={w} walker(s)")
        axis.legend(fontsize=8)
    common.save_figure(figure, path)


if __name__ == "__main__":
    main()
