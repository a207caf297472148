"""Deterministic replay: the serial loop, one seed, one thread, and what it produced.

A refactor that claims "behaviour unchanged" is checked with this script rather than
by eye (versions swing too much for "within noise" to mean anything):

    python benchmarks/replay.py --out before.npz          # on the old commit
    python benchmarks/replay.py --compare before.npz      # on the new one

It runs :class:`~palflow.pipeline.engine.serial.SerialLoop` on copper with EMT
(``examples/cu_emt.toml``, seed 0) on thread pools of one thread each, with torch
and OpenMP on one thread, and records every label (positions, energy, forces and
stress where given, in the order stored, with its source), the held-out set, the
weights of every published ensemble version and of every member's newest
checkpoint, the members' spec (E0s and element table for MACE), and each version's
test errors. ``--model mace`` runs the same with a small MACE committee. ``--compare``
reports the largest difference of each kind (a NaN on one side only is an infinite
difference) and exits 1 when one exceeds ``--tolerance`` (1e-6) or when the two runs
recorded different things.

The baseline of a commit from before the package layout (``pipeline.*`` and
``apps.*`` imported at the top level) is made from a checkout of it, with that
checkout first on the path: ``PYTHONPATH=OLD python OLD/benchmarks/replay.py --out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODELS = {
    "schnet": "cutoff = 5.0",
    "mace": 'name = "mace"\nn_members = 2\nnum_channels = 8\nmax_L = 0\nr_max = 4.0',
}
"""The ``[model]`` table of each model the replay can run (a small MACE, so that the
replay takes minutes on two cores)."""


def _run_serial(run_dir: Path, labels: int, model: str) -> None:
    """Run the serial loop on copper into ``run_dir`` (imports either layout)."""
    try:  # the flat layout of older commits, when its checkout is on the path
        from pipeline.coordinator import Apps
        from pipeline.rundir import RunDirectory
        from pipeline.serial import SerialLoop
        from pipeline.settings import load_campaign
        from pipeline.sites import load_site
        from pipeline.structures import load_start_structure
    except ImportError:  # the package layout
        from palflow.pipeline.config.settings import load_campaign
        from palflow.pipeline.config.sites import load_site
        from palflow.pipeline.engine.coordinator import Apps
        from palflow.pipeline.engine.serial import SerialLoop
        from palflow.pipeline.state.rundir import RunDirectory
        from palflow.pipeline.state.structures import load_start_structure
    import parsl
    import torch

    torch.set_num_threads(1)
    # Copper's campaign with the chosen [model] table in place of its own.
    copper = (EXAMPLES / "cu_emt.toml").read_text()
    start, end = copper.index("[model]"), copper.index("[training]")
    campaign_file = run_dir.parent / "campaign.toml"
    campaign_file.write_text(f"{copper[:start]}[model]\n{MODELS[model]}\n\n{copper[end:]}")
    campaign = load_campaign(
        campaign_file,
        system__structure=str(EXAMPLES / "structures" / "cu13.xyz"),
        seed=0,
        stop__max_labels=labels,
        stop__max_wall_s=3600.0,
        stop__final_training_s=0.0,
        test__n_structures=8,
        training__min_task_s=0.0,
    )
    site = load_site("threads.py")
    site.slots = {module: 1 for module in site.slots}
    site.config.run_dir = str(run_dir.parent / "runinfo")  # Parsl's logs, not in the cwd
    parsl.load(site.config)
    try:
        run = RunDirectory.create(run_dir, campaign.model_dump())
        first = campaign.all_systems()[0]
        start = load_start_structure(first.structure, first.vacuum)
        SerialLoop(campaign, run, Apps.parsl(), site.slots, start).run()
    finally:
        parsl.dfk().cleanup()


def record(run_dir: Path) -> dict[str, np.ndarray]:
    """What the run produced, as arrays named by kind (``label/``, ``test/``,
    ``weights/``, ``spec/``, ``errors/``)."""
    import json

    import torch
    from ase.db import connect

    out: dict[str, np.ndarray] = {}
    with connect(run_dir / "labels.db") as db:
        rows = list(db.select(sort="id"))
    out["label/positions"] = np.stack([row.positions for row in rows])
    out["label/energies"] = np.array([row.energy for row in rows])
    out["label/forces"] = np.stack([row.forces for row in rows])
    out["label/stress"] = np.array([row.get("stress", np.full(6, np.nan)) for row in rows])
    out["label/source"] = np.array([str(row.get("source", "")) for row in rows])
    for path in sorted((run_dir / "data").glob("test*.npz")):
        with np.load(path) as test:
            out.update({f"test/{path.stem}/{key}": test[key] for key in test.files})
    for path in sorted((run_dir / "models").glob("*.pt")):
        state = torch.load(path, weights_only=True, map_location="cpu")
        for key, value in state["state_dict"].items():
            if torch.is_tensor(value) and value.is_floating_point():
                out[f"weights/{path.stem}/{key}"] = value.double().numpy()
    spec = json.loads((run_dir / "state.json").read_text()).get("model_spec") or {}
    for key, value in spec.items():
        if isinstance(value, (int, float, list)) and not isinstance(value, bool):
            out[f"spec/{key}"] = np.asarray(value, dtype=float)
    summary = json.loads((run_dir / "summary.json").read_text())
    out["errors/test_force_mae"] = np.array(
        [point[2] for point in summary["test_force_mae"]], dtype=float
    )
    out["errors/oracle_failures"] = np.array(summary["oracle_failures"], dtype=float)
    return out


def difference(new: np.ndarray, old: np.ndarray) -> float:
    """Largest absolute difference; a NaN on one side only is infinite, NaN on both
    sides is none; strings differ by 0 or infinity."""
    if new.dtype.kind in "US" or old.dtype.kind in "US":
        return 0.0 if np.array_equal(new, old) else float("inf")
    new, old = np.atleast_1d(new.astype(float)), np.atleast_1d(old.astype(float))
    gap = np.abs(new - old)
    gap[np.isnan(new) & np.isnan(old)] = 0.0
    gap[np.isnan(new) ^ np.isnan(old)] = np.inf
    return float(np.max(gap, initial=0.0))


def compare(new: dict[str, np.ndarray], old: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest difference of each kind of record."""
    if set(new) != set(old):
        differ = sorted(set(old) ^ set(new))[:5]
        raise SystemExit(f"replay: the two runs recorded different arrays: {differ}")
    worst: dict[str, float] = {}
    for key in sorted(old):
        if new[key].shape != old[key].shape:
            raise SystemExit(f"replay: {key} has shape {new[key].shape}, was {old[key].shape}")
        kind = key.split("/")[0]
        worst[kind] = max(worst.get(kind, 0.0), difference(new[key], old[key]))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=int, default=24, help="label budget (default 24)")
    parser.add_argument("--out", type=Path, help="write the record here (.npz)")
    parser.add_argument("--compare", type=Path, help="a record to compare against (.npz)")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--model", choices=sorted(MODELS), default="schnet")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="palflow-replay-") as tmp:
        run_dir = Path(tmp) / "run"
        _run_serial(run_dir, args.labels, args.model)
        new = record(run_dir)
    kinds = sorted({key.split("/")[0] for key in new})
    counts = ", ".join(f"{sum(k.startswith(kind + '/') for k in new)} {kind}" for kind in kinds)
    print(f"replay ({args.model}): {len(new['label/energies'])} labels; arrays: {counts}")
    if args.out:
        np.savez_compressed(args.out, **new)
    if args.compare:
        with np.load(args.compare) as old:
            worst = compare(new, dict(old))
        shown = ", ".join(f"{kind} {gap:.3g}" for kind, gap in worst.items())
        print(f"replay: largest difference: {shown} (tolerance {args.tolerance:g})")
        return int(max(worst.values()) > args.tolerance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
