"""Held-out sets and run measurements for ``benchmarks/extrapolation.py``.

- :func:`build_sets`: the held-out sets, each labelled once by the campaign's oracle
  before any run: ``same`` (oracle MD at the walkers' temperature), ``hot`` (oracle MD
  much hotter), ``strain`` (the structure scaled isotropically, and single outer atoms
  pulled out: bond stretches in a molecule), and for copper ``other_phase`` (oracle MD
  of periodic bulk fcc copper and a (111) slab), for any other molecule ``torsion``
  (rigid rotations about each rotatable bond of the start structure);
- :func:`evaluate_versions`: every saved ensemble version of a finished run on every
  set, with the active labels each version was published with (``state.json``);
- :class:`RecordingCoordinator`: the streaming coordinator, counting for every MD
  segment it scores the frames, those at or below the selection threshold in force
  at that moment, and the frames selection picks. The run directory keeps the
  frames' force spread (``generator/*.npz``) but not the percentile or calibrated
  threshold of the moment, so the benchmark records them as the coordinator decides.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
from common import ROOT, held_out_set, run_on_site

from palflow.apps.contracts import CalculatorSpec

STRUCTURES = ROOT / "examples" / "structures"
SETS = ("same", "hot", "strain", "other_phase", "torsion")
"""Every set a run may be scored on: ``other_phase`` for copper, ``torsion`` otherwise."""
DESCRIPTIONS = {
    "same": "oracle MD at the walkers' temperature (in distribution)",
    "hot": "oracle MD at {hot:.0f} K",
    "strain": "MD frames scaled isotropically 0.85-1.15, and single outer atoms pulled out",
    "other_phase": "oracle MD of bulk fcc Cu32 and a Cu27 (111) slab, periodic",
    "torsion": "the start structure rotated rigidly about each rotatable bond, 0-360 degrees",
}


def _md_frames(campaign_path, folder: Path, n: int, **overrides) -> list:
    """``n`` frames of oracle MD from the campaign's start (``overrides`` change the
    structure or the temperature), labelled (see ``common.held_out_set``)."""
    from ase.io import read

    from palflow.pipeline.config.settings import load_campaign

    folder.mkdir(parents=True, exist_ok=True)
    path = held_out_set(load_campaign(campaign_path, **overrides), folder, n)
    return read(path, index=":")


def _labelled(campaign, frames: list, scratch: Path) -> list:
    """``frames`` labelled by the campaign's oracle in this process."""
    from palflow.apps.oracles.calculators import label_structure, make_calculator

    spec = CalculatorSpec.of(campaign.oracle).as_dict()
    scratch.mkdir(parents=True, exist_ok=True)
    calculator = make_calculator(spec, scratch)
    return [label_structure(a, calculator, campaign.oracle.max_force) for a in frames]


def strained_frames(base: list, n: int) -> list:
    """Half of ``n``: ``base`` frames scaled about their centre by 0.85-1.15; the
    rest: one outer atom of a ``base`` frame pulled out radially by 0.4-1.6 Å.
    Unlabelled."""
    rng = np.random.default_rng(2024)
    n_scaled = (n + 1) // 2
    frames = []
    for i, factor in enumerate(np.linspace(0.85, 1.15, n_scaled)):
        atoms = base[i % len(base)].copy()
        centre = atoms.positions.mean(axis=0)
        atoms.positions = centre + factor * (atoms.positions - centre)
        frames.append(atoms)
    for i, pull in enumerate(np.linspace(0.4, 1.6, n - n_scaled)):
        atoms = base[(i + 1) % len(base)].copy()
        centre = atoms.positions.mean(axis=0)
        radial = atoms.positions - centre
        outer = np.argsort(np.linalg.norm(radial, axis=1))[len(atoms) // 2 :]
        atom = int(rng.choice(outer))
        atoms.positions[atom] += pull * radial[atom] / np.linalg.norm(radial[atom])
        frames.append(atoms)
    return frames


def rotatable_bonds(atoms) -> list[tuple[int, int, list[int]]]:
    """``(i, j, side)`` per rotatable bond: two bonded atoms (closer than 1.2 × the sum
    of their covalent radii) with other neighbours on both sides, not in a ring;
    ``side``, the atoms on ``j``'s side of the bond (``j`` included)."""
    from ase.data import covalent_radii

    radii = covalent_radii[atoms.numbers]
    distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    close = distances < 1.2 * (radii[:, None] + radii[None, :])
    np.fill_diagonal(close, False)
    bonded = {k: set(np.flatnonzero(close[k]).tolist()) for k in range(len(atoms))}
    bonds = []
    for i in range(len(atoms)):
        for j in sorted(bonded[i]):
            if j < i or len(bonded[i]) < 2 or len(bonded[j]) < 2:
                continue
            side, stack = {j}, [j]
            while stack:  # j's side: every atom reached from j without the bond i-j
                at = stack.pop()
                for k in bonded[at] - ({i} if at == j else set()):
                    if k not in side:
                        side.add(k)
                        stack.append(k)
            if i not in side:  # reaching i round the other way means a ring
                bonds.append((i, j, sorted(side)))
    return bonds


def torsion_frames(start, n: int) -> list:
    """``n`` copies of ``start``, rotated rigidly about its rotatable bonds in turn by
    angles spread over 0-360 degrees (never 0 or 360), unlabelled."""
    bonds = rotatable_bonds(start)
    if not bonds:
        raise ValueError("no rotatable bond for a torsion set")
    per_bond = -(-n // len(bonds))
    frames = []
    for k in range(n):
        i, j, side = bonds[k % len(bonds)]
        turned = start.copy()
        axis = start.positions[j] - start.positions[i]
        turned.rotate(360.0 * (k // len(bonds) + 1) / (per_bond + 1), axis, start.positions[j])
        frame = start.copy()
        frame.positions[side] = turned.positions[side]
        frames.append(frame)
    return frames


def build_sets(campaign_path, work: Path, n: int, hot_K: float = 1600.0) -> dict[str, dict]:
    """Label the held-out sets once; per set its dataset file (``path``, palflow's
    ``.npz``), ``extxyz`` (for ``test.file``) and a description of its labels. Copper
    gets ``other_phase``; any other system gets ``torsion``."""
    from ase.io import write

    from palflow.apps.data.dataset import write_dataset
    from palflow.pipeline.config.settings import load_campaign
    from palflow.pipeline.state.structures import load_start_structure

    campaign = load_campaign(campaign_path)
    same = _md_frames(campaign_path, work / "set-same", n)
    frames = {
        "same": same,
        "hot": _md_frames(campaign_path, work / "set-hot", n, generator__temperature_K=hot_K),
        "strain": _labelled(campaign, strained_frames(same, n), work / "set-strain"),
    }
    start = load_start_structure(campaign.system.structure, campaign.system.vacuum)
    if set(start.get_chemical_symbols()) != {"Cu"}:
        frames["torsion"] = _labelled(campaign, torsion_frames(start, n), work / "set-torsion")
    else:
        frames["other_phase"] = [
            *_md_frames(
                campaign_path, work / "set-bulk", n - n // 2,
                system__structure=str(STRUCTURES / "cu32_bulk.xyz"),
            ),
            *_md_frames(
                campaign_path, work / "set-slab", n // 2,
                system__structure=str(STRUCTURES / "cu27_slab111.xyz"),
            ),
        ]  # fmt: skip
    sets = {}
    for name, structures in frames.items():
        path, extxyz = work / f"heldout-{name}.npz", work / f"heldout-{name}.extxyz"
        write_dataset(path, structures)
        write(extxyz, structures, format="extxyz")
        forces = np.concatenate([a.get_forces() for a in structures])
        energies = np.array([a.get_potential_energy() / len(a) for a in structures])
        sets[name] = {
            "path": str(path),
            "extxyz": str(extxyz),
            "description": DESCRIPTIONS[name].format(hot=hot_K),
            "n_structures": len(structures),
            "periodic_frames": int(sum(bool(a.pbc.any()) for a in structures)),
            "labels_finite": bool(np.isfinite(forces).all() and np.isfinite(energies).all()),
            "mean_abs_force": float(np.abs(forces).mean()),
            "max_abs_force": float(np.abs(forces).max()),
            "energy_per_atom_range": [float(energies.min()), float(energies.max())],
        }
    return sets


def evaluate_versions(run_root: Path, sets: dict[str, dict]) -> dict[str, list[dict]]:
    """Per set, the learning curve of the run at ``run_root``: every saved ensemble
    version (``models/ensemble.vNNNNN.pt``) with its active labels, force MAE (eV/Å)
    and energy MAE (eV/atom), oldest first."""
    from palflow.apps.inference import _evaluate_test
    from palflow.pipeline.state.rundir import RunDirectory

    run = RunDirectory(run_root)
    labels = {v["number"]: v["n_labels"] for v in run.read_state().get("versions", [])}
    curves: dict[str, list[dict]] = {name: [] for name in sets}
    for version, path in run.ensembles():
        if version not in labels:
            continue
        for name, held_out in sets.items():
            result = _evaluate_test(str(path), held_out["path"], device="cpu")
            curves[name].append(
                {
                    "version": version,
                    "labels": labels[version],
                    "force_mae": result["force_mae"],
                    "energy_mae_per_atom": result["energy_mae_per_atom"],
                }
            )
    return curves


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class _Counts:
    def __init__(self) -> None:
        self.scored = self.below = self.picked = self.segments = 0
        self.thresholds: list[float] = []

    def summary(self) -> dict:
        finite = [t for t in self.thresholds if math.isfinite(t)]
        return {
            "segments": self.segments,
            "frames_scored": self.scored,
            "frames_at_or_below_threshold": self.below,
            "fraction_below_threshold": self.below / self.scored if self.scored else None,
            "frames_picked": self.picked,
            "threshold_first": _finite(self.thresholds[0]) if self.thresholds else None,
            "threshold_median": statistics.median(finite) if finite else None,
            "threshold_last": _finite(self.thresholds[-1]) if self.thresholds else None,
        }


def _recording_coordinator():
    from palflow.pipeline.engine.coordinator import Coordinator
    from palflow.pipeline.policies.selection import select_frames
    from palflow.pipeline.policies.strategies import Selector

    class RecordingCoordinator(Coordinator):
        """The streaming coordinator; ``selection_counts()`` says, over the MD segments
        it scored, how many frames lay at or below the threshold then in force (those
        the threshold filtered out) and how many selection picked for the queue."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._counts = _Counts()
            selector, generator, last = self.selector, self.generator, {}
            queue_picks = generator.queue_picks

            def score(prediction, structures=None):
                last["scores"] = Selector.score(selector, prediction, structures)
                return last["scores"]

            def recording_queue_picks(outcome, version, system=""):
                last.clear()
                left_domain = queue_picks(outcome, version, system)
                if outcome["n_frames"]:
                    scores = np.asarray(
                        last.get("scores", outcome["force_disagreement"]), dtype=float
                    )
                    threshold = self.campaign.system_named(system).threshold
                    threshold = threshold or selector.threshold()
                    counts, settings = self._counts, self.campaign.selection
                    counts.segments += 1
                    counts.scored += len(scores)
                    counts.below += int((scores <= threshold).sum())
                    counts.picked += len(
                        select_frames(
                            scores, threshold, settings.max_per_trajectory, settings.min_frame_gap
                        )
                    )
                    counts.thresholds.append(float(threshold))
                return left_domain

            selector.score = score
            generator.queue_picks = recording_queue_picks

        def selection_counts(self) -> dict:
            return self._counts.summary()

    return RecordingCoordinator


def run_recorded(campaign, root: Path, site) -> tuple[dict, dict]:
    """Run ``campaign`` on the loaded ``site`` in a new run directory ``root`` with the
    recording coordinator; return its summary and its selection counts."""
    made = []

    def factory(*args, **kwargs):
        made.append(_recording_coordinator()(*args, **kwargs))
        return made[0]

    summary = run_on_site(factory, campaign, root, site)
    return summary, made[0].selection_counts()
