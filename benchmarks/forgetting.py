"""Forgetting when a foundation is fine-tuned, and what replay and freezing do about it.

A small MACE "foundation" is trained on one domain (bulk fcc Cu, rattled and strained,
8 atoms), then fine-tuned with palflow's own training task
(:func:`palflow.apps.training._train_member`, in tasks as a campaign runs them) on a
few dozen labels of another (the same cells compressed by 10% and rattled harder), for
each variant: plain, replay from a file of the foundation's own training frames,
replay of the foundation's pseudo-labels, and the readout or the last interaction
alone trained. EMT is the oracle of everything, so every set has true labels.
Reported per variant, over the seeds: the force MAE on the fine-tuning domain's test
set and on the foundation domain's hold-out (the foundation's own error is the
"before"), and the wall time.

    python benchmarks/forgetting.py                  # 3 seeds, about 10 minutes on 2 cores
    python benchmarks/forgetting.py --quick          # a smoke run: 1 seed, fewer epochs

The replay file's energies are 1 eV/atom off EMT's (another energy reference, as a
user's PBE data would have): replay trains on forces and stress only, so this must not
matter. Results: ``benchmarks/results/forgetting.json`` (the protocol written before the
first run) and ``forgetting.png``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

NAME = "forgetting"
VARIANTS = {
    "plain": {},
    "replay file 0.25": {"replay_fraction": 0.25, "replay_source": "file"},
    "replay foundation 0.25": {"replay_fraction": 0.25, "replay_source": "foundation"},
    "readout only": {"train_only": "readout"},
    "last interaction only": {"train_only": "last_interaction"},
}
"""Each variant's training settings over the common ones."""
FREEZING = {"readout only", "last interaction only"}
FIRST_RUN = {
    "conditions": "the same protocol with 3 tasks per run (24 epochs) and no 'start' "
    "measurement, 3 seeds, 6 min, load ~3-4; replaced by 4 tasks so that the members "
    "learn the new domain further; force MAE in eV/Å, mean [min, max] of the seeds",
    "plain": {"new": [0.962, 0.488, 1.220], "holdout": [0.0655, 0.0562, 0.0762]},
    "replay file 0.25": {"new": [0.732, 0.433, 0.959], "holdout": [0.0481, 0.0437, 0.0520]},
    "replay foundation 0.25": {"new": [1.649, 0.494, 2.475], "holdout": [0.0716, 0.0595, 0.0824]},
    "readout only": {"new": [3.570, 3.547, 3.589], "holdout": [0.1588, 0.1485, 0.1678]},
    "last interaction only": {"new": [2.256, 1.666, 2.596], "holdout": [0.0869, 0.0527, 0.1065]},
}
"""The first full run (benchmarks/results/forgetting.json before the run that replaced it)."""
ARCHITECTURE = dict(
    r_max=4.0, num_channels=16, max_L=1, correlation=2, num_interactions=2, dtype="float32"
)  # fmt: skip
"""The foundation's MACE: small enough for 2 shared cores."""


# ------------------------------------------------------------------ data
def label(atoms, stress: bool = True, offset: float = 0.0):
    """``atoms`` with EMT's energy (plus ``offset`` eV/atom), forces and, where asked,
    stress attached."""
    atoms.calc = EMT()
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    values = {"stress": atoms.get_stress()} if stress else {}
    atoms.calc = SinglePointCalculator(
        atoms, energy=energy + offset * len(atoms), forces=forces, **values
    )
    return atoms


def bulk_frames(n: int, rng) -> list:
    """The foundation's domain: 8-atom fcc Cu cells, strained up to 4% (symmetric
    strain components) and rattled by 0.03-0.15 Å."""
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
        strain = rng.uniform(-0.04, 0.04, (3, 3))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + (strain + strain.T) / 2), scale_atoms=True)
        atoms.positions += rng.normal(0.0, rng.uniform(0.03, 0.15), atoms.positions.shape)
        frames.append(label(atoms))
    return frames


def dense_frames(n: int, rng) -> list:
    """The fine-tuning domain: 8-atom fcc Cu cells at a = 3.25 Å (10% compressed, 27%
    denser), rattled by 0.1-0.25 Å.

    Chosen after single-seed pilots (:data:`PILOTS`): on Cu(111) slabs the foundation
    forgot nothing measurable, which leaves nothing for replay or freezing to save."""
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.25, cubic=True).repeat((2, 1, 1))
        atoms.positions += rng.normal(0.0, rng.uniform(0.1, 0.25), atoms.positions.shape)
        frames.append(label(atoms))
    return frames


PILOTS = {
    "conditions": "seed 0, plain fine-tuning (3 tasks of 8 epochs, 32 labels), the same "
    "foundation (60 epochs); force MAE in eV/Å before -> after on the new domain's test "
    "set, and on the bulk hold-out (0.0556 before); the machine loaded (load ~8)",
    "Cu(111) slabs 2x2x3, half with an adatom": {
        "learning_rate 3e-3": {"new": [0.0914, 0.0750], "holdout": 0.0561}
    },
    "compressed, a = 3.25 A, rattle 0.1-0.25": {
        "learning_rate 3e-3": {"new": [3.688, 0.488], "holdout": 0.0762},
        "learning_rate 1e-2": {"new": [3.688, 0.274], "holdout": 0.0495},
    },
    "hot, a = 3.61 A, rattle 0.2-0.35": {
        "learning_rate 3e-3": {"new": [3.776, 0.902], "holdout": 0.0841},
        "learning_rate 1e-2": {"new": [3.776, 0.458], "holdout": 0.0364},
    },
    "expanded, a = 3.9 A, rattle 0.1-0.25": {
        "learning_rate 3e-3": {"new": [0.114, 0.109], "holdout": 0.1020},
        "learning_rate 1e-2": {"new": [0.114, 0.116], "holdout": 0.1141},
    },
}
"""Single-seed pilots that chose the fine-tuning domain (the compressed cells at the
default learning rate), kept as measured; not results."""


def errors(model, frames) -> dict:
    """Force MAE (eV/Å) and energy MAE (eV/atom) of ``model`` on ``frames``."""
    from palflow.apps.models.calculator import evaluate_errors

    found = evaluate_errors(model, frames, "cpu")
    return {"force_mae": found["force_mae"], "energy_mae": found["energy_mae_per_atom"]}


# ------------------------------------------------------------------ runs
def train_foundation(folder: Path, frames: list, epochs: int) -> tuple[str, dict]:
    """One MACE member trained from scratch on ``frames``, exported as a MACE model
    file; returns its path and the training's time and record."""
    from palflow.apps.data.dataset import write_dataset
    from palflow.apps.models.core import load_checkpoint
    from palflow.apps.sections import TrainingSettings
    from palflow.apps.training import _train_member
    from palflow.pipeline.config.models import resolve_model_spec

    write_dataset(folder / "foundation.npz", frames)
    spec = resolve_model_spec(campaign(), frames, frames[0])
    settings = TrainingSettings(
        min_task_s=0.0, batch_size=8, learning_rate=1e-2, learning_rate_min=1e-3,
        learning_rate_half_life_steps=150, bootstrap=False,
    ).model_dump()  # fmt: skip
    started = time.time()
    result = _train_member(
        0, str(folder / "foundation.npz"), None, str(folder / "foundation.pt"), spec, settings,
        seed=1000, n_epochs=epochs, device="cpu",
    )  # fmt: skip
    model, _ = load_checkpoint(result["checkpoint"])
    (path,) = model.export(str(folder / "foundation"))
    return path, {"wall_s": time.time() - started, "epochs": result["epochs"], "model": model}


def campaign(**model):
    from palflow.pipeline.config.settings import load_campaign

    values = {f"model__{key}": value for key, value in {**ARCHITECTURE, **model}.items()}
    return load_campaign(
        None, model__name="mace", oracle__calculator="ase.calculators.emt:EMT",
        oracle__kwargs={}, **values,
    )  # fmt: skip


def fine_tune(folder: Path, spec: dict, variant: dict, seed: int, args) -> dict:
    """``args.tasks`` training tasks of ``args.epochs`` epochs each, from a fresh
    member of the foundation, as a campaign runs them; returns the published member,
    its record and the wall time."""
    from palflow.apps.models.core import load_checkpoint
    from palflow.apps.sections import TrainingSettings
    from palflow.apps.training import _train_member

    values = dict(variant)
    if values.get("replay_source") == "file":
        values["replay_file"] = str(folder / "replay.extxyz")
    settings = TrainingSettings(min_task_s=0.0, batch_size=8, **values).model_dump()
    started, checkpoint, records = time.time(), None, []
    for task in range(args.tasks):
        out = str(folder / f"member.s{seed}.t{task}.pt")
        records.append(
            _train_member(
                0,
                str(folder / "tune.npz"),
                checkpoint,
                out,
                spec,
                settings,
                seed=seed,
                n_epochs=args.epochs,
                validation_path=str(folder / "validation.npz"),
                device="cpu",
            )  # fmt: skip
        )
        checkpoint = out
    wall = time.time() - started
    model, _ = load_checkpoint(checkpoint)
    published = sum(bool(r["published"]) for r in records)
    return {"model": model, "wall_s": wall, "published_tasks": published, "records": records}


def summary(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def plot(result: dict, path: Path) -> None:
    """Force MAE per variant on each domain (mean, min-max over the seeds), with the
    foundation's own error dashed."""
    plt = common.pyplot()
    rows = result["summary"]
    names = list(rows)
    x = np.arange(len(names))
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (
        ("tune_force_mae", "tune_test", "fine-tuning domain (compressed Cu), test"),
        ("holdout_force_mae", "holdout", "foundation domain (bulk Cu), hold-out"),
    )
    for axis, (key, before, title) in zip(axes, panels, strict=True):
        means = np.array([rows[n][key]["mean"] for n in names])
        low = means - [rows[n][key]["min"] for n in names]
        high = np.array([rows[n][key]["max"] for n in names]) - means
        axis.bar(x, means, 0.6, yerr=[low, high], capsize=3, color="tab:blue")
        axis.axhline(result["foundation"][before]["force_mae"], color="k", ls="--", lw=1)
        fresh = [start[before]["force_mae"] for start in result["start"].values()]
        axis.axhline(statistics.fmean(fresh), color="k", ls=":", lw=1)
        axis.set_yscale("log")
        axis.set_title(
            f"{title}\n(dashed: the foundation; dotted: the fresh members, mean)", fontsize=9
        )
        axis.set_xticks(x, names, rotation=20, fontsize=8)
        axis.set_ylabel("force MAE (eV/Å)")
    common.save_figure(figure, path)


def main() -> None:
    options = common.parser(__doc__)
    options.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    options.add_argument("--tasks", type=int, default=4, help="training tasks per run")
    options.add_argument("--epochs", type=int, default=8, help="epochs per task")
    options.add_argument("--foundation-epochs", type=int, default=60)
    options.add_argument("--quick", action="store_true", help="1 seed, 1 task, few epochs")
    args = options.parse_args()
    if args.quick:
        args.seeds, args.tasks, args.epochs, args.foundation_epochs = [0], 1, 2, 4
    logging.basicConfig(level=logging.WARNING)
    from palflow.apps.data.dataset import write_dataset
    from palflow.apps.models import registry
    from palflow.pipeline.config.models import resolve_model_spec

    freezable = hasattr(registry.ensemble_class("mace"), "trainable_parameters")
    variants = {n: v for n, v in VARIANTS.items() if freezable or n not in FREEZING}
    sizes = {"foundation_train": 64, "foundation_holdout": 32, "tune_train": 32,
             "tune_validation": 8, "tune_test": 32}  # fmt: skip
    result = {
        "provenance": common.provenance(args),
        "protocol": {
            "oracle": "ASE EMT (every set's labels)",
            "foundation_domain": bulk_frames.__doc__.split("\n\n")[0].replace("\n", " "),
            "tune_domain": dense_frames.__doc__.split("\n\n")[0].replace("\n", " "),
            "sizes": sizes,
            "replay_file": "the foundation's 64 training frames, energies +1 eV/atom",
            "architecture": ARCHITECTURE,
            "seeds": args.seeds,
            "seed_changes": "the member's readout perturbation, bootstrap, shuffles and "
            "pseudo-label rattles; the data sets are the same for every seed",
            "tasks": args.tasks,
            "epochs_per_task": args.epochs,
            "training": "palflow defaults but min_task_s 0, batch_size 8",
            "variants": variants,
            "pilots": PILOTS,
            "not_run": sorted(set(VARIANTS) - set(variants)),
            "measured": "force MAE (eV/Å) of the published member after the last task; "
            "'start': the fresh member of each seed before any step",
            "first_full_run": FIRST_RUN,
        },
    }
    common.write_results(NAME, result, finite=True)  # the protocol, before any run
    rng = np.random.default_rng(12345)
    found_train = bulk_frames(sizes["foundation_train"], rng)
    holdout = bulk_frames(sizes["foundation_holdout"], rng)
    tune_train = dense_frames(sizes["tune_train"], rng)
    validation = dense_frames(sizes["tune_validation"], rng)
    tune_test = dense_frames(sizes["tune_test"], rng)
    with tempfile.TemporaryDirectory(prefix="forgetting-") as work:
        folder = Path(work)
        replay = [label(a.copy(), offset=1.0) for a in found_train]
        write(folder / "replay.extxyz", replay, format="extxyz")
        write_dataset(folder / "tune.npz", tune_train)
        write_dataset(folder / "validation.npz", validation)
        path, trained = train_foundation(folder, found_train, args.foundation_epochs)
        foundation = trained.pop("model")
        result["foundation"] = {
            **trained,
            "holdout": errors(foundation, holdout),
            "tune_test": errors(foundation, tune_test),
        }
        print(f"foundation: {trained['wall_s']:.0f} s, {result['foundation']}", flush=True)
        spec = resolve_model_spec(campaign(foundation=path), tune_train, tune_train[0])
        runs, result["start"] = [], {}
        for seed in args.seeds:
            # The fresh member (the foundation, its readout perturbed by the seed, its
            # energy refitted) before any step: what each run starts from.
            fresh = fine_tune(folder, spec, {}, seed, argparse.Namespace(tasks=1, epochs=0))
            result["start"][seed] = {
                "tune_test": errors(fresh["model"], tune_test),
                "holdout": errors(fresh["model"], holdout),
            }
            for name, variant in variants.items():
                done = fine_tune(folder, spec, variant, seed, args)
                run = {
                    "variant": name, "seed": seed, "wall_s": done["wall_s"],
                    "published_tasks": done["published_tasks"],
                    "tune_test": errors(done["model"], tune_test),
                    "holdout": errors(done["model"], holdout),
                }  # fmt: skip
                runs.append(run)
                print(
                    f"{name:24s} seed {seed}: compressed {run['tune_test']['force_mae']:.4f}, "
                    f"bulk {run['holdout']['force_mae']:.4f} eV/Å, {run['wall_s']:.0f} s",
                    flush=True,
                )
                result["runs"] = runs
                common.write_results(NAME, result, finite=True)
    result["summary"] = {
        name: {
            "tune_force_mae": summary([r["tune_test"]["force_mae"] for r in mine]),
            "holdout_force_mae": summary([r["holdout"]["force_mae"] for r in mine]),
            "wall_s": summary([r["wall_s"] for r in mine]),
        }
        for name in variants
        if (mine := [r for r in runs if r["variant"] == name])
    }
    result["load_average_after"] = list(__import__("os").getloadavg())
    common.write_results(NAME, result, plot, finite=True)
    columns = [
        ("variant", "<26", common.cell("name")),
        ("compressed", ">12", lambda r: common.show(r["tune_force_mae"]["mean"], ".4f")),
        ("bulk hold-out", ">15", lambda r: common.show(r["holdout_force_mae"]["mean"], ".4f")),
        ("wall s", ">8", lambda r: common.show(r["wall_s"]["mean"], ".0f")),
    ]
    start = {key: statistics.fmean(s[key]["force_mae"] for s in result["start"].values())
             for key in ("tune_test", "holdout")}  # fmt: skip
    print(f"force MAE, eV/Å, mean of {len(args.seeds)} seeds; the foundation before: compressed "
          f"{result['foundation']['tune_test']['force_mae']:.4f}, bulk "
          f"{result['foundation']['holdout']['force_mae']:.4f}; the fresh members: "
          f"{start['tune_test']:.4f}, {start['holdout']:.4f}")  # fmt: skip
    common.print_table(columns, common.named(result["summary"]))


if __name__ == "__main__":
    sys.exit(main())
