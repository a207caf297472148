"""Does a committee's force spread rank its force errors, and how does that change as
the members train? SchNet against MACE, offline, on one fixed training set.

    python benchmarks/committee_uncertainty.py [--mace-epochs 60] [--schnet-epochs 40]

Why offline: in ``models.py`` the MACE committee's Spearman rho came out near 0 at
the end of each campaign, against 0.46 for SchNet. Those campaigns stop MACE at a
wall limit, and their training sets are what each committee chose, so the two
differ in more than the model. Here both train on the same labels for a fixed
number of epochs, and the rho is followed along the training.

Data: ethanol, GFN2-xTB (xtb-python). Training set: 40 frames of Langevin MD at
400 K and 40 at 700 K (every 40th step of 0.5 fs, seeds 1 and 2). Held-out set: 24
frames at 500 K and 24 at 900 K (seeds 3 and 4). Each committee has 4 members
(seeds 0-3, each its own bootstrap) with the settings of ``examples/ethanol_xtb.toml``
(SchNet) and ``examples/ethanol_mace.toml`` (MACE), trained by palflow's own
training task, 5 epochs per task as a campaign would, one torch thread.

Reported per checkpoint of the training: the held-out force MAE of the committee's
mean, the median largest atomic force spread, and Spearman's rho between each
frame's spread and its mean absolute force error, over all 48 frames and within
each temperature (where the errors vary less and ranking is harder).

Writes ``benchmarks/results/committee_uncertainty.json``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common
import numpy as np
from common import ROOT

EPOCHS_PER_TASK = 5
MEMBERS = 4


def md_frames(temperature_K: float, n: int, every: int, seed: int) -> list:
    """``n`` GFN2-xTB-labelled frames of ethanol MD at ``temperature_K``."""
    from ase import units
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from xtb.ase.calculator import XTB

    atoms = molecule("CH3CH2OH")
    atoms.calc = XTB(method="GFN2-xTB")
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    md = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature_K, friction=0.02, rng=rng)
    frames = []
    for _ in range(n):
        md.run(every)
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(
            frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces()
        )
        frames.append(frame)
    return frames


def score(checkpoints: list[str], test: list, work: Path) -> dict:
    """Force MAE, median spread and Spearman rho of the committee of ``checkpoints``."""
    from palflow.apps.models.calculator import predict_structures
    from palflow.apps.models.core import load_checkpoint
    from palflow.apps.training import stack_member_checkpoints
    from palflow.pipeline.policies.metrology import spearman_rho

    stacked = work / "committee.pt"
    stack_member_checkpoints(checkpoints, str(stacked), {})
    model, _ = load_checkpoint(stacked)
    predicted = predict_structures(model, test)
    error = np.array(
        [np.abs(predicted["forces"][i] - a.get_forces()).mean() for i, a in enumerate(test)]
    )
    spread = np.asarray(predicted["force_disagreement"], dtype=float)
    half = len(test) // 2
    return {
        "force_mae": float(error.mean()),
        "median_spread": float(np.median(spread)),
        "rho_all": spearman_rho(spread, error),
        "rho_low_T": spearman_rho(spread[:half], error[:half]),
        "rho_high_T": spearman_rho(spread[half:], error[half:]),
    }


def train_committee(campaign_file: str, epochs: int, train: list, test: list, work: Path):
    """Train the committee task by task; score it after every task. Returns the curve."""
    from palflow.apps.data.dataset import write_dataset
    from palflow.apps.training import _train_member
    from palflow.pipeline.config.models import resolve_model_spec
    from palflow.pipeline.config.settings import load_campaign

    campaign = load_campaign(campaign_file)
    work.mkdir(parents=True, exist_ok=True)
    dataset = str(work / "train.npz")
    write_dataset(dataset, train)
    spec = resolve_model_spec(campaign, train, train[0])
    settings = campaign.training.model_dump()
    latest: list[str | None] = [None] * MEMBERS
    curve, t0 = [], time.perf_counter()
    for task in range(epochs // EPOCHS_PER_TASK):
        for k in range(MEMBERS):
            out = str(work / f"member{k}.{task}.pt")
            _train_member(
                k, dataset, latest[k], out, spec, settings, seed=k, n_epochs=EPOCHS_PER_TASK
            )
            latest[k] = out
        point = {"epochs": (task + 1) * EPOCHS_PER_TASK, **score(latest, test, work)}
        point["train_s"] = time.perf_counter() - t0
        curve.append(point)
        print(
            f"  {Path(campaign_file).stem:12s} {point['epochs']:3d} epochs: "
            f"force MAE {point['force_mae']:.3f} eV/Å, rho {point['rho_all']:.2f} "
            f"(low T {point['rho_low_T']:.2f}, high T {point['rho_high_T']:.2f})",
            flush=True,
        )
    return curve


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--mace-epochs", type=int, default=60)
    parser.add_argument("--schnet-epochs", type=int, default=40)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    train = md_frames(400, 40, 40, 1) + md_frames(700, 40, 40, 2)
    test = md_frames(500, 24, 40, 3) + md_frames(900, 24, 40, 4)
    result = {"train_frames": len(train), "test_frames": len(test), "members": MEMBERS}
    with tempfile.TemporaryDirectory() as tmp:
        for name, toml, epochs in (
            ("schnet", "ethanol_xtb.toml", args.schnet_epochs),
            ("mace", "ethanol_mace.toml", args.mace_epochs),
        ):
            print(f"{name}: {epochs} epochs", flush=True)
            result[name] = train_committee(
                str(ROOT / "examples" / toml), epochs, train, test, Path(tmp) / name
            )
    print("\nfinal:            force MAE   rho (all / low T / high T)")
    for name in ("schnet", "mace"):
        last = result[name][-1]
        print(
            f"  {name:8s} {last['epochs']:3d} ep  {last['force_mae']:.3f} eV/Å   "
            f"{last['rho_all']:.2f} / {last['rho_low_T']:.2f} / {last['rho_high_T']:.2f}"
        )
    ratio = result["mace"][-1]["force_mae"] / result["schnet"][-1]["force_mae"]
    print(f"MACE / SchNet final force MAE: {ratio:.2f}")
    result["mace_over_schnet_force_mae"] = ratio
    common.write_results("committee_uncertainty", result)


if __name__ == "__main__":
    main()
