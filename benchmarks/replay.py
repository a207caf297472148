"""Deterministic replay: the serial loop, one seed, one thread, and what it produced.

A refactor that claims "behaviour unchanged" is checked with this script rather than
by eye (versions swing too much for "within noise" to mean anything):

    python benchmarks/replay.py --out before.npz          # on the old commit
    python benchmarks/replay.py --compare before.npz      # on the new one

It runs :class:`~palflow.pipeline.engine.serial.SerialLoop` on copper with EMT
(``examples/cu_emt.toml``, seed 0) on thread pools of one thread each, with torch
and OpenMP on one thread, and records every label (positions, energy, forces, in
the order stored) and every member's newest weights. ``--compare`` reports the
largest difference of each and exits 1 when one exceeds ``--tolerance`` (1e-6).
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


def _run_serial(run_dir: Path, labels: int) -> None:
    """Run the serial loop on copper into ``run_dir`` (imports either layout)."""
    try:  # the package layout
        from palflow.pipeline.config.settings import load_campaign
        from palflow.pipeline.config.sites import load_site
        from palflow.pipeline.engine.coordinator import Apps
        from palflow.pipeline.engine.serial import SerialLoop
        from palflow.pipeline.state.rundir import RunDirectory
        from palflow.pipeline.state.structures import load_start_structure
    except ImportError:  # the flat layout before it
        from palflow.pipeline.config.settings import load_campaign
        from palflow.pipeline.config.sites import load_site
        from palflow.pipeline.engine.coordinator import Apps
        from palflow.pipeline.engine.serial import SerialLoop
        from palflow.pipeline.state.rundir import RunDirectory
        from palflow.pipeline.state.structures import load_start_structure
    import parsl
    import torch

    torch.set_num_threads(1)
    campaign = load_campaign(
        EXAMPLES / "cu_emt.toml",
        seed=0,
        stop__max_labels=labels,
        stop__max_wall_s=3600.0,
        stop__final_training_s=0.0,
        test__n_structures=8,
        training__min_task_s=0.0,
    )
    site = load_site("threads.py")
    site.slots = {module: 1 for module in site.slots}
    parsl.load(site.config)
    try:
        run = RunDirectory.create(run_dir, campaign.model_dump())
        first = campaign.all_systems()[0]
        start = load_start_structure(first.structure, first.vacuum)
        SerialLoop(campaign, run, Apps.parsl(), site.slots, start).run()
    finally:
        parsl.dfk().cleanup()


def record(run_dir: Path) -> dict[str, np.ndarray]:
    """Every label in storage order and every member's newest weights, as arrays."""
    import torch
    from ase.db import connect

    out: dict[str, np.ndarray] = {}
    with connect(run_dir / "labels.db") as db:
        rows = list(db.select(sort="id"))
    out["label_positions"] = np.stack([row.positions for row in rows])
    out["label_energies"] = np.array([row.energy for row in rows])
    out["label_forces"] = np.stack([row.forces for row in rows])
    for path in sorted((run_dir / "models").glob("member*.pt")):
        state = torch.load(path, weights_only=True, map_location="cpu")
        weights = state["state_dict"]
        for key, value in weights.items():
            if torch.is_tensor(value) and value.is_floating_point():
                out[f"{path.stem.split('.')[0]}/{key}"] = value.double().numpy()
    return out


def compare(new: dict[str, np.ndarray], old: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest absolute difference of the labels and of the weights."""
    if set(new) != set(old):
        missing = sorted(set(old) ^ set(new))[:5]
        raise SystemExit(f"replay: the two runs recorded different arrays: {missing}")
    worst = {"labels": 0.0, "weights": 0.0}
    for key in old:
        if new[key].shape != old[key].shape:
            raise SystemExit(f"replay: {key} has shape {new[key].shape}, was {old[key].shape}")
        kind = "labels" if key.startswith("label_") else "weights"
        worst[kind] = max(worst[kind], float(np.max(np.abs(new[key] - old[key]), initial=0.0)))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=int, default=24, help="label budget (default 24)")
    parser.add_argument("--out", type=Path, help="write the record here (.npz)")
    parser.add_argument("--compare", type=Path, help="a record to compare against (.npz)")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="palflow-replay-") as tmp:
        run_dir = Path(tmp) / "run"
        _run_serial(run_dir, args.labels)
        new = record(run_dir)
    print(
        f"replay: {len(new['label_energies'])} labels, "
        f"{sum(1 for k in new if not k.startswith('label_'))} weight arrays"
    )
    if args.out:
        np.savez_compressed(args.out, **new)
    if args.compare:
        with np.load(args.compare) as old:
            worst = compare(new, dict(old))
        print(
            f"replay: largest difference, labels {worst['labels']:.3g}, "
            f"weights {worst['weights']:.3g} (tolerance {args.tolerance:g})"
        )
        return int(max(worst.values()) > args.tolerance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
