"""The generators: new candidate structures from the current ensemble.

``generator.kind`` names one; :func:`_generate` (the app) runs it:

- ``"md"`` (:func:`_run_md`): one task advances a group of walkers by a short MD
  segment, all of them in one batched ensemble pass per step (NVT with the Langevin
  integrator, NVE with velocity Verlet, NPT with ``pressure_bar`` set: stochastic cell
  rescaling on top of either), records every ``sample_interval``-th frame with the
  ensemble's disagreement on it, and stops a walker early when it blows up;
- ``"rattle"`` (:func:`_rattle`): random displacements and cell strains around each
  walker's start and around the labelled structures, scored in one batched pass;
- ``"module:function"`` or ``"path/to/file.py:function"``: a user's function with the
  :class:`pipeline.protocols.Generator` signature (``examples/plugins/``).

The coordinator decides what to label and where each walker goes next; this module
only proposes.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, NamedTuple

import numpy as np
from ase import Atoms, units
from ase.io import read, write

from apps.common import draw_velocities, require_settings, where_and_when
from apps.dataset import write_dataset

logger = logging.getLogger(__name__)

SETTINGS_READ = (
    "integrator",
    "pressure_bar",
    "barostat_time_fs",
    "compressibility_per_bar",
    "steps_per_task",
    "timestep_fs",
    "temperature_K",
    "friction",
    "sample_interval",
    "max_force_disagreement",
    "min_distance",
    "max_neighbour_distance",
)
"""The keys of the campaign's generator section that an MD task reads."""


def blow_up_reason(
    atoms: Atoms,
    force_disagreement: float,
    settings: dict[str, Any],
) -> str | None:
    """Say why a walker's frame is unphysical, or None when it is fine.

    A walker has blown up when the ensemble disagrees beyond the hard cap, when two
    atoms come closer than ``min_distance`` (Å), or, for a non-periodic system, when
    an atom has flown farther than ``max_neighbour_distance`` (Å) from all others.
    """
    if not np.isfinite(force_disagreement):
        return "non-finite force disagreement"
    if force_disagreement > settings["max_force_disagreement"]:
        return f"force disagreement {force_disagreement:.3g} eV/Å above the hard cap"
    if len(atoms) < 2:
        return None
    distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    np.fill_diagonal(distances, np.inf)
    if distances.min() < settings["min_distance"]:
        return f"atoms {distances.min():.3g} Å apart"
    if not atoms.pbc.any() and distances.min(axis=1).max() > settings["max_neighbour_distance"]:
        return "an atom flew away from the rest"
    return None


class Evaluation(NamedTuple):
    """What the driving potential says about one walker's frame."""

    forces: np.ndarray
    """[n, 3] the members' mean forces, eV/Å."""
    force_disagreement: float
    energy_disagreement: float
    member_energies: np.ndarray
    """[K] eV."""
    member_forces: np.ndarray
    """[K, n, 3] eV/Å."""
    stress: np.ndarray | None = None
    """[3, 3] the members' mean stress, eV/Å³ (None without a cell)."""
    member_stress: np.ndarray | None = None
    """[K, 3, 3] eV/Å³ (None without a cell)."""


class BatchedDynamics:
    """Langevin (BAOAB) or velocity-Verlet MD of several walkers in lockstep, at
    constant volume or, with ``pressure_bar``, at constant pressure.

    Every step evaluates all walkers in one batched ensemble pass
    (:func:`apps.calculator.predict_structures`), which costs little more than one
    walker's pass (``benchmarks/batched_ensemble.py``). Any ASE calculator can drive
    the dynamics instead (one walker at a time), which is how the integrator is checked
    against ASE's own (``tests/test_npt.py``). Walkers are ASE ``Atoms`` whose
    positions, momenta and cells advance in place; units are ASE's.

    Constant pressure is the isotropic stochastic cell rescaling of Bernetti and Bussi
    (J. Chem. Phys. 153, 114107, 2020): after each step the volume's logarithm ε moves
    by ``-(β/τ)(P0 - P - kT/V) dt + sqrt(2 kT β dt / (V τ)) ξ``, and positions and the
    cell scale by ``exp(Δε/3)``, momenta by its inverse. ``P`` is the instantaneous
    pressure, kinetic part included; β (``compressibility_per_bar``) and τ
    (``barostat_time_fs``) set only how fast the volume relaxes, not where to.

    Parameters
    ----------
    model
        The ensemble driving the dynamics, or an ASE calculator.
    walkers
        Structures with momenta.
    settings
        The campaign's generator section as a dict (integrator, timestep, temperature,
        friction, pressure).
    rng
        Random numbers for the thermostat and the barostat.
    device
        Device for the ensemble passes.
    """

    def __init__(self, model, walkers: list[Atoms], settings: dict[str, Any], rng, device=None):
        self.model, self.device, self.rng = model, device, rng
        self.walkers = walkers
        self.dt = settings["timestep_fs"] * units.fs
        self.kT = units.kB * settings["temperature_K"]
        self.langevin = settings["integrator"] == "langevin"
        self.c1 = float(np.exp(-settings["friction"] / units.fs * self.dt))
        self.pressure = settings.get("pressure_bar")
        if self.pressure is not None:
            not_periodic = [i for i, atoms in enumerate(walkers) if not atoms.pbc.all()]
            if not_periodic:
                raise ValueError(
                    f"walkers {not_periodic} have no cell periodic in all directions: "
                    "constant pressure (generator.pressure_bar) needs one"
                )
            self.pressure *= units.bar
            self.barostat_time = settings["barostat_time_fs"] * units.fs
            self.compressibility = settings["compressibility_per_bar"] / units.bar
        self.results = self._evaluate(range(len(walkers)))

    @property
    def constant_pressure(self) -> bool:
        return self.pressure is not None

    def _evaluate(self, active) -> dict[int, Evaluation]:
        """What the potential says about each active walker."""
        from ase.calculators.calculator import Calculator

        active = list(active)
        if isinstance(self.model, Calculator):
            return {i: self._evaluate_with_calculator(self.walkers[i]) for i in active}
        from apps.calculator import predict_structures

        out = predict_structures(
            self.model, [self.walkers[i] for i in active], self.device, batch_size=len(active)
        )
        with_stress = "stress" in out
        return {
            i: Evaluation(
                out["forces"][n],
                float(out["force_disagreement"][n]),
                float(out["energy_disagreement"][n]),
                out["member_energies"][:, n],
                out["member_forces"][n],
                out["stress"][n] if with_stress else None,
                out["member_stress"][:, n] if with_stress else None,
            )
            for n, i in enumerate(active)
        }

    def _evaluate_with_calculator(self, atoms: Atoms) -> Evaluation:
        work = atoms.copy()
        work.calc = self.model
        forces = work.get_forces()
        energy = work.get_potential_energy()
        stress = work.get_stress(voigt=False) if self.constant_pressure else None
        member_stress = None if stress is None else stress[None]
        return Evaluation(forces, 0.0, 0.0, np.array([energy]), forces[None], stress, member_stress)

    def step(self, active: list[int]) -> None:
        """Advance the ``active`` walkers by one step: B A O A, [cell], forces, B."""
        half = 0.5 * self.dt
        for i in active:
            atoms = self.walkers[i]
            masses = atoms.get_masses()[:, None]
            momenta = atoms.get_momenta() + half * self.results[i].forces
            positions = atoms.get_positions() + half * momenta / masses
            if self.langevin:
                noise = self.rng.standard_normal(momenta.shape)
                momenta = self.c1 * momenta + np.sqrt((1 - self.c1**2) * masses * self.kT) * noise
            atoms.set_positions(positions + half * momenta / masses)
            atoms.set_momenta(momenta)
            if self.constant_pressure:
                self._rescale_cell(atoms, self.results[i].stress)
        self.results.update(self._evaluate(active))
        for i in active:
            atoms = self.walkers[i]
            atoms.set_momenta(atoms.get_momenta() + half * self.results[i].forces)

    def _rescale_cell(self, atoms: Atoms, stress: np.ndarray) -> None:
        """One stochastic cell rescaling step (isotropic) from the last stress (3x3)."""
        volume = atoms.get_volume()
        momenta, masses = atoms.get_momenta(), atoms.get_masses()[:, None]
        kinetic_pressure = float((momenta**2 / masses).sum()) / (3 * volume)
        pressure = kinetic_pressure - float(np.trace(stress)) / 3
        rate = self.compressibility / self.barostat_time
        drift = -rate * (self.pressure - pressure - self.kT / volume) * self.dt
        noise = np.sqrt(2 * self.kT * rate * self.dt / volume) * self.rng.standard_normal()
        scale = float(np.exp((drift + noise) / 3))
        atoms.set_cell(atoms.cell[:] * scale, scale_atoms=True)
        atoms.set_momenta(momenta / scale)


def _run_md(
    start_paths: list[str],
    ensemble_path: str,
    output_paths: list[str],
    last_frame_paths: list[str],
    settings: dict[str, Any],
    seed: int,
    device: str | None = None,
) -> dict[str, Any]:
    """Advance several walkers together with MD on the ensemble; record candidates.

    The walkers step in lockstep (:class:`BatchedDynamics`); one that blows up stops
    there while the others go on.

    Parameters
    ----------
    start_paths
        One one-frame structure file per walker to start from. Momenta are used
        when present; otherwise velocities are drawn at ``settings["temperature_K"]``.
    ensemble_path
        Stacked ensemble checkpoint to drive the dynamics.
    output_paths
        Per walker, where its sampled frames go (dataset ``.npz`` with
        ``force_disagreement`` eV/Å, ``energy_disagreement`` eV/atom, ``step``, and
        the members' ``member_energies`` [F, K] eV and ``member_forces``
        [F, K, n, 3] eV/Å).
    last_frame_paths
        Per walker, where its last sound frame, with momenta, goes, for its next task.
    settings
        The campaign's validated generator section
        (``pipeline.settings.GeneratorSettings.model_dump()``); this task reads the
        keys in :data:`SETTINGS_READ`.

    Raises
    ------
    ValueError
        When ``settings`` lacks a key the task reads, naming every missing key.

    Returns
    -------
    dict
        ``walkers``: per walker, in order, its frame count, per-frame disagreement,
        whether and why it blew up, and its file paths; the ensemble ``version``
        used; and where and when the task ran.
    """
    import torch

    from apps.model import default_device, load_checkpoint

    t_start = time.time()
    require_settings(settings, SETTINGS_READ, "generator")
    # One thread per task: a site runs tasks side by side in its slots.
    torch.set_num_threads(1)
    model, extra = load_checkpoint(ensemble_path, device=device or default_device())
    model.eval()
    version = int(extra.get("version", -1))
    rng = np.random.default_rng(seed)
    walkers = [read(path) for path in start_paths]
    for atoms in walkers:
        if not atoms.get_momenta().any():
            draw_velocities(atoms, settings["temperature_K"], rng)
    dynamics = BatchedDynamics(model, walkers, settings, rng, device)

    records = [new_record() for _ in walkers]
    last_good = [atoms.copy() for atoms in walkers]
    reasons: list[str | None] = [None] * len(walkers)
    active = list(range(len(walkers)))
    interval = settings["sample_interval"]
    for step in range(1, settings["steps_per_task"] + 1):
        dynamics.step(active)
        if step % interval:
            continue
        for i in list(active):
            evaluation = dynamics.results[i]
            reasons[i] = blow_up_reason(walkers[i], evaluation.force_disagreement, settings)
            if reasons[i] is not None:
                active.remove(i)
                continue
            frame = walkers[i].copy()
            frame.calc = None
            add_frame(records[i], frame, evaluation, step)
            last_good[i] = frame
        if not active:
            break

    results = write_walkers(
        records, last_good, reasons, output_paths, last_frame_paths, version, model.n_members
    )
    return {
        "walkers": results,
        "n_frames": sum(r["n_frames"] for r in results),
        "version": version,
        **where_and_when(t_start),
    }


def new_record() -> dict[str, list]:
    """One walker's frames and what the potential said on each, for :func:`write_walkers`."""
    return {key: [] for key in ("frames", "force", "energy", "steps", "members_e", "members_f",
                                "members_s")}  # fmt: skip


def add_frame(record: dict[str, list], frame: Atoms, evaluation: Evaluation, step: int) -> None:
    record["frames"].append(frame)
    record["force"].append(evaluation.force_disagreement)
    record["energy"].append(evaluation.energy_disagreement)
    record["steps"].append(step)
    record["members_e"].append(evaluation.member_energies)
    record["members_f"].append(evaluation.member_forces)
    record["members_s"].append(evaluation.member_stress)


def write_walkers(
    records: list[dict[str, list]],
    last_good: list[Atoms],
    reasons: list[str | None],
    output_paths: list[str],
    last_frame_paths: list[str],
    version: int,
    n_members: int,
) -> list[dict[str, Any]]:
    """Write each walker's frames and last sound frame; return the per-walker results.

    ``records[i]`` (:func:`new_record`) holds the walker's ``frames``, ``force`` and
    ``energy`` disagreements, ``steps``, and the members' energies (``members_e``),
    forces (``members_f``) and stresses (``members_s``, None without a cell), frame by
    frame.
    """
    results = []
    for i, record in enumerate(records):
        n_frames = len(record["frames"])
        stresses = {}
        if n_frames and all(s is not None for s in record["members_s"]):
            stresses["member_stress"] = np.asarray(record["members_s"], dtype=float).reshape(
                n_frames, n_members, 3, 3
            )
        write_dataset(
            output_paths[i],
            record["frames"],
            extra={
                **stresses,
                "force_disagreement": np.asarray(record["force"], dtype=float),
                "energy_disagreement": np.asarray(record["energy"], dtype=float),
                "step": np.asarray(record["steps"], dtype=np.int64),
                "ensemble_version": np.full(len(record["frames"]), version, dtype=np.int64),
                # What every member said, for the coordinator's selection measure.
                "member_energies": np.asarray(record["members_e"], dtype=float).reshape(
                    len(record["frames"]), n_members
                ),
                "member_forces": np.asarray(record["members_f"], dtype=np.float32).reshape(
                    len(record["frames"]), n_members, len(last_good[i]), 3
                ),
            },
        )
        # Written beside, then renamed: a kill mid-write never leaves a torn walker state.
        partial = f"{last_frame_paths[i]}.{os.getpid()}.tmp"
        write(partial, last_good[i], format="extxyz")
        os.replace(partial, last_frame_paths[i])
        results.append(
            {
                "output_path": output_paths[i],
                "last_frame_path": last_frame_paths[i],
                "n_frames": len(record["frames"]),
                "force_disagreement": record["force"],
                "energy_disagreement": record["energy"],
                "blew_up": reasons[i] is not None,
                "reason": reasons[i],
            }
        )
    return results


# ------------------------------------------------------------------------ rattle
def _rattle(
    start_paths: list[str],
    ensemble_path: str,
    output_paths: list[str],
    last_frame_paths: list[str],
    settings: dict[str, Any],
    seed: int,
    device: str | None = None,
) -> dict[str, Any]:
    """Random displacements and cell strains around each walker's start and around the
    labelled structures, scored by the ensemble in one batched pass.

    Each walker makes ``steps_per_task // sample_interval`` frames. Each frame starts
    from the walker's start structure or, with ``settings["labelled_path"]`` (the
    newest training snapshot, which the coordinator passes) and even odds, from a
    labelled structure of the same atoms; every atom moves by N(0, ``rattle_stdev``²)
    Å in each direction, and a periodic cell takes a random symmetric strain with
    components up to ``rattle_strain``. A frame that :func:`blow_up_reason` rejects is
    dropped. The walker's start stays its start: rattling does not drift.

    Parameters and return value are those of :func:`_run_md`.
    """
    import torch

    from apps.calculator import predict_structures
    from apps.dataset import read_dataset
    from apps.model import default_device, load_checkpoint

    t_start = time.time()
    require_settings(settings, SETTINGS_READ + RATTLE_SETTINGS_READ, "generator")
    torch.set_num_threads(1)
    model, extra = load_checkpoint(ensemble_path, device=device or default_device())
    model.eval()
    version = int(extra.get("version", -1))
    rng = np.random.default_rng(seed)
    labelled = []
    if settings.get("labelled_path") and os.path.exists(settings["labelled_path"]):
        labelled = [a for a in read_dataset(settings["labelled_path"]) if a.calc is not None]
    n_frames = max(settings["steps_per_task"] // settings["sample_interval"], 1)

    starts = [read(path) for path in start_paths]
    frames: list[Atoms] = []
    owner: list[int] = []
    for walker, start in enumerate(starts):
        same = [a for a in labelled if list(a.numbers) == list(start.numbers)]
        for _ in range(n_frames):
            base = same[rng.integers(len(same))] if same and rng.random() < 0.5 else start
            frames.append(rattled(base, settings, rng))
            owner.append(walker)
    out = predict_structures(model, frames, device, batch_size=64)

    records = [new_record() for _ in starts]
    reasons: list[str | None] = [None] * len(starts)
    for n, (frame, walker) in enumerate(zip(frames, owner, strict=True)):
        force = float(out["force_disagreement"][n])
        if blow_up_reason(frame, force, settings) is not None:
            continue
        with_stress = "member_stress" in out and np.isfinite(out["member_stress"][:, n]).all()
        evaluation = Evaluation(
            out["forces"][n],
            force,
            float(out["energy_disagreement"][n]),
            out["member_energies"][:, n],
            out["member_forces"][n],
            out["stress"][n] if with_stress else None,
            out["member_stress"][:, n] if with_stress else None,
        )
        add_frame(records[walker], frame, evaluation, step=n)
    for record in records:  # all frames of a walker carry stress, or none does
        if any(s is None for s in record["members_s"]):
            record["members_s"] = [None] * len(record["members_s"])
    results = write_walkers(
        records, starts, reasons, output_paths, last_frame_paths, version, model.n_members
    )
    return {
        "walkers": results,
        "n_frames": sum(r["n_frames"] for r in results),
        "version": version,
        **where_and_when(t_start),
    }


RATTLE_SETTINGS_READ = ("rattle_stdev", "rattle_strain")
"""The keys of the generator section that the rattle generator reads besides
:data:`SETTINGS_READ`."""


def rattled(base: Atoms, settings: dict[str, Any], rng: np.random.Generator) -> Atoms:
    """A copy of ``base`` with random displacements and, when periodic, a random
    symmetric cell strain (atoms follow the cell)."""
    frame = base.copy()
    frame.calc = None
    if frame.pbc.all() and settings["rattle_strain"] > 0:
        strain = rng.uniform(-1, 1, (3, 3)) * settings["rattle_strain"]
        strain = 0.5 * (strain + strain.T)
        frame.set_cell(frame.cell[:] @ (np.eye(3) + strain), scale_atoms=True)
    frame.positions += rng.normal(0.0, settings["rattle_stdev"], frame.positions.shape)
    frame.set_momenta(np.zeros((len(frame), 3)))
    return frame


# ------------------------------------------------------------------- the app
GENERATORS = {"md": _run_md, "rattle": _rattle}
"""The built-in generators by ``generator.kind``."""


def resolve_generator(kind: str):
    """The generator function ``kind`` names: a built-in, or a user's
    ``module:function`` or ``path/to/file.py:function``.

    Raises
    ------
    ImportError, TypeError
        When it does not import or is not callable.
    """
    if kind in GENERATORS:
        return GENERATORS[kind]
    if ":" not in kind:
        raise ImportError(
            f"unknown generator {kind!r}: built in are {', '.join(GENERATORS)}, or give "
            "'module:function' or 'path/to/file.py:function'"
        )
    from apps.common import import_object

    function = import_object(kind)
    if not callable(function):
        raise TypeError(f"generator {kind!r} is not callable")
    return function


def _generate(
    generator: str,
    start_paths: list[str],
    ensemble_path: str,
    output_paths: list[str],
    last_frame_paths: list[str],
    settings: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """The generator app: run the generator ``generator`` names (``generator.kind``)
    with the arguments of :class:`pipeline.protocols.Generator`."""
    function = resolve_generator(generator)
    return function(start_paths, ensemble_path, output_paths, last_frame_paths, settings, seed)
