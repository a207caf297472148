"""Systems, generators and what is measured of their runs, for ``benchmarks/exploration.py``.

- :func:`generators`: the campaign overrides of every generator of a system (ethanol:
  plain MD, uncertainty-biased MD, metadynamics on its two main dihedrals, replica
  exchange on a 500-860 K ladder; alanine dipeptide: plain MD and metadynamics on
  its backbone φ/ψ);
- :func:`alanine_sets`: alanine's held-out sets, from the labelled φ/ψ grid
  (``benchmarks/data/alanine_phi_psi.extxyz``, GFN2-xTB): ``grid`` (every frame) and
  ``c7ax`` (:func:`c7ax`: the frames with φ > 0, the region plain MD at 300 K seldom
  reaches);
- :func:`visited`: the φ/ψ of every frame the run's walkers wrote
  (``generator/walker*.seg*.npz``) and the share of the grid's basins among them
  (:func:`basins_visited`: C7eq, alphaR, beta, C7ax, alphaL; the barriers between
  them, ``other``, are no basin). Every frame counts, a walker's last frames before a
  reset for blowing up included;
- :func:`run_generator`: one run of a generator with a seed, scored on its system's
  sets, a crash recorded with its error (never dropped);
- :func:`plot`: the learning curves per system and set, and alanine's visited φ/ψ.
"""

from __future__ import annotations

import math
import time
import traceback
from pathlib import Path

import common
import numpy as np
from common import ROOT
from extrapolation import QUICK
from extrapolation_sets import evaluate_versions, run_recorded

SYSTEMS = {
    "ethanol": ROOT / "examples" / "ethanol_xtb.toml",
    "alanine": ROOT / "examples" / "alanine_xtb.toml",
}
"""The campaign of each system (ethanol's may be replaced with ``--campaign``)."""
GRID = ROOT / "benchmarks" / "data" / "alanine_phi_psi.extxyz"
ETHANOL_DIHEDRALS = ([3, 2, 1, 0], [2, 1, 0, 6])
"""H-O-C-C and O-C-C-H of ``ase.build.molecule("CH3CH2OH")`` (C0 C1 O2 H3 H4 H5 H6
H7 H8: H3 on the oxygen, H6-H8 on the methyl carbon)."""
WIDTH = 0.35
"""The Gaussian hills' width on a dihedral, radians."""
LADDER = [500.0, 600.0, 720.0, 860.0]
"""Replica exchange's temperatures, K: one walker each, the lowest the plain MD's."""
SAMPLE = 300
"""φ/ψ pairs kept per run for the figure."""
NOT_A_BASIN = "other"
"""The grid's label for the barriers between the basins: not counted as a basin."""
GENERATORS = {
    "ethanol": ["md", "biased_md", "metadynamics", "replica_exchange"],
    "alanine": ["md", "metadynamics"],
}
"""The generators of each system, the baseline first (:func:`generators`)."""


def dihedrals(atoms: list[list[int]] | tuple) -> list[dict]:
    """Metadynamics' collective variables: one dihedral per list of four atoms."""
    return [{"kind": "dihedral", "atoms": list(a), "width": WIDTH} for a in atoms]


def generators(system: str) -> dict[str, dict]:
    """The campaign overrides of every generator of ``system``, the baseline ``md``
    first; every other setting is the campaign's (the biased MD's defaults)."""
    if system == "ethanol":
        return {
            "md": {},
            "biased_md": {"generator__kind": "biased_md"},
            "metadynamics": {
                "generator__kind": "metadynamics",
                "generator__collective_variables": dihedrals(ETHANOL_DIHEDRALS),
            },
            "replica_exchange": {
                "generator__kind": "replica_exchange",
                "generator__temperature_ladder_K": LADDER,
                "generator__n_walkers": len(LADDER),
            },
        }
    if system == "alanine":
        from alanine_grid import PHI, PSI

        return {
            "md": {},
            "metadynamics": {
                "generator__kind": "metadynamics",
                "generator__collective_variables": dihedrals([PHI, PSI]),
            },
        }
    raise ValueError(f"no system {system!r} (systems: {', '.join(SYSTEMS)})")


def c7ax(frames: list) -> list:
    """The frames of the grid with φ > 0 (``info["phi"]``): the C7ax side."""
    return [atoms for atoms in frames if float(atoms.info["phi"]) > 0]


def alanine_sets(work: Path, grid: Path = GRID) -> dict[str, dict]:
    """Alanine's held-out sets from the labelled grid, each as palflow's ``.npz``
    (``path``), the grid as ``extxyz`` (``test.file``), with what they hold."""
    from ase.io import read

    from palflow.apps.data.dataset import write_dataset

    frames = read(grid, index=":")
    parts = {
        "grid": (frames, "the labelled φ/ψ grid, every frame"),
        "c7ax": (c7ax(frames), "the grid's frames with φ > 0 (C7ax, alphaL, barriers)"),
    }
    work.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name, (structures, description) in parts.items():
        path = work / f"heldout-{name}.npz"
        write_dataset(path, structures)
        forces = np.concatenate([a.get_forces() for a in structures])
        sets[name] = {
            "path": str(path),
            "extxyz": str(grid),
            "description": description,
            "n_structures": len(structures),
            "basins": sorted({str(a.info["basin"]) for a in structures}),
            "labels_finite": bool(np.isfinite(forces).all()),
            "mean_abs_force": float(np.abs(forces).mean()),
        }
    return sets


def basins_visited(angles, grid_basins, basin) -> dict:
    """Which of ``grid_basins`` (those the grid holds, but :data:`NOT_A_BASIN`) the
    ``angles`` (``(φ, ψ)`` pairs, degrees) fall in by ``basin(φ, ψ)``, and the frames
    in each region; a basin the grid lacks does not count."""
    present = {str(b) for b in grid_basins} - {NOT_A_BASIN}
    frames: dict[str, int] = {}
    for phi, psi in angles:
        name = str(basin(phi, psi))
        frames[name] = frames.get(name, 0) + 1
    seen = present & set(frames)
    return {
        "frames": len(angles),
        "frames_per_region": dict(sorted(frames.items())),
        "basins_visited": sorted(seen),
        "basins_in_grid": len(present),
        "share": len(seen) / len(present) if present else None,
    }


def walker_frames(run_root: Path) -> list:
    """Every frame the run's walkers wrote, segment by segment."""
    from palflow.apps.data.dataset import read_arrays, structures_from_arrays
    from palflow.pipeline.state.rundir import RunDirectory

    frames = []
    for _, path in RunDirectory(run_root).walker_segments():
        frames.extend(structures_from_arrays(read_arrays(path)))
    return frames


def visited(run_root: Path, grid_basins) -> dict:
    """The φ/ψ basins the run's walkers visited (:func:`basins_visited`), and a sample
    of at most :data:`SAMPLE` of their ``(φ, ψ)`` for the figure."""
    from alanine_grid import basin, phi_psi

    angles = [phi_psi(atoms) for atoms in walker_frames(run_root)]
    found = basins_visited(angles, grid_basins, basin)
    keep = np.linspace(0, len(angles) - 1, min(SAMPLE, len(angles))).astype(int)
    found["phi_psi_sample"] = [[round(angles[i][0], 1), round(angles[i][1], 1)] for i in keep]
    return found


TEST_SET = {"ethanol": "same", "alanine": "grid"}
"""Each system's set that is also its campaigns' ``test.file``."""


def campaign_of(args, system: str) -> str:
    return args.campaign if system == "ethanol" else args.alanine_campaign


def overrides(args, system: str, generator: str, seed: int, test_file: str | None) -> dict:
    """The campaign overrides of one run (merged: the generator's win over ``--quick``'s)."""
    given = {"selection__max_labels_per_version": args.pace}
    if test_file is not None:
        given |= common.budget(args, seed, test_file)
    extra = (getattr(args, "overrides", None) or {}).get(generator, {})
    return given | (QUICK if args.quick else {}) | generators(system)[generator] | extra


def failed(run: dict | None) -> bool:
    return run is None or bool(run.get("error"))


def run_generator(system: str, generator: str, seed: int, args, site, work: Path, sets) -> dict:
    """One run, scored on its system's sets; a crash is recorded with its error."""
    from palflow.pipeline.config.settings import load_campaign

    folder = f"{system}-{generator}-seed{seed}"
    run = {"system": system, "generator": generator, "seed": seed, "run_dir": f"WORK/{folder}"}
    run["budget"], t0 = args.labels, time.perf_counter()
    try:
        test_file = sets[TEST_SET[system]]["extxyz"]
        campaign = load_campaign(
            campaign_of(args, system), **overrides(args, system, generator, seed, test_file)
        )
        run["walkers"] = campaign.generator.n_walkers
        summary, run["selection"] = run_recorded(campaign, work / folder, site)
        for key in ("labels", "initial_labels", "wall_s", "stop_reason"):
            run[key] = summary[key]
        t1 = time.perf_counter()
        run["curves"] = evaluate_versions(work / folder, sets)
        if system == "alanine":
            run["visited"] = visited(work / folder, sets["grid"]["basins"])
        run["evaluation_s"] = time.perf_counter() - t1
    except Exception as error:  # kept, never dropped: the run loses its seed
        traceback.print_exc()
        run["error"] = f"{type(error).__name__}: {error}"
        run.setdefault("wall_s", time.perf_counter() - t0)
    return run


def plot(result: dict, path: Path) -> None:
    """Learning curves per system and set (seeds faint, medians bold), then the φ/ψ
    of alanine's walkers per generator."""
    from extrapolation import _on_grid

    plt = common.pyplot()
    runs = [r for r in result["runs"] if not r.get("error")]
    names = list(dict.fromkeys(g for system in SYSTEMS for g in GENERATORS[system]))
    colours = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    panels = list(dict.fromkeys((r["system"], s) for r in runs for s in r["curves"]))
    scatter = list(dict.fromkeys(r["generator"] for r in runs if r.get("visited")))
    total = max(1, len(panels) + len(scatter))
    columns = min(2, total)
    rows = math.ceil(total / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    for axis, (system, name_set) in zip(axes.flat, panels, strict=False):
        for name in names:
            curves = [
                r["curves"][name_set]
                for r in runs
                if (r["system"], r["generator"]) == (system, name)
            ]
            curves = [c for c in curves if c]
            for c in curves:
                axis.plot(
                    [p["labels"] for p in c],
                    [p["force_mae"] for p in c],
                    color=colours[name],
                    alpha=0.35,
                    linewidth=0.8,
                )
            if curves:
                grid = np.linspace(0, min(max(p["labels"] for p in c) for c in curves), 40)
                middle = np.median([_on_grid(c, grid) for c in curves], axis=0)
                axis.plot(grid, middle, color=colours[name], linewidth=2.2, label=name)
        axis.set(
            yscale="log",
            title=f"{system}: {name_set}",
            xlabel="active-learning labels",
            ylabel="test force MAE, eV/Å",
        )
        axis.legend(fontsize=7)
    for axis, name in zip(axes.flat[len(panels) :], scatter, strict=False):
        points = np.array(
            [
                p
                for r in runs
                if r["generator"] == name and r.get("visited")
                for p in r["visited"]["phi_psi_sample"]
            ]
        ).reshape(-1, 2)
        axis.scatter(points[:, 0], points[:, 1], s=3, alpha=0.3, color=colours[name])
        axis.set(
            xlim=(-180, 180),
            ylim=(-180, 180),
            xlabel="φ, degrees",
            ylabel="ψ, degrees",
            title=f"alanine: {name}'s walkers, every seed",
        )
    for axis in axes.flat[len(panels) + len(scatter) :]:
        axis.set_visible(False)
    common.save_figure(figure, path)
