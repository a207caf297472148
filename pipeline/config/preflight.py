"""The pre-flight: every input tried before anything is created.

:mod:`palflow.pipeline.run` calls these after the settings have validated and before the run
directory exists. Each failure is one :class:`PreflightError` naming the problem and
the fix; the command line turns it into exit status 2 with nothing created.

- :func:`check_settings`: settings that only make sense together, and the selection
  measure's options against what the measure reads;
- :func:`check_structures`: every start structure has atoms, no overlapping atoms,
  a cell where it is periodic, and something to learn;
- :func:`trial_plugins`: the selection measure, the query and each metrology
  plug-in called once on a tiny fake prediction;
- :func:`trial_oracle`: the calculator's own ``preflight(kwargs, structures)`` where
  it has one (``palflow.apps.oracles.cp2k.CP2KOracle``: binary, basis and potential names, a
  periodic cell), then the calculator built and run once on the start structures
  (within ``oracle.timeout_s``, in a child process), which must give finite
  energies and forces; ``oracle.trial = false`` skips the run;
- :func:`check_run_path`: the run directory can be made where it is asked for, and
  its path is one the site's workers can carry.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

MIN_DISTANCE = 0.5
"""Atoms of a start structure closer than this (Å) overlap."""

FORCELESS_MEASURES = {"energy_spread", "stress_spread", "random", "labelled_distance"}
"""palflow's measures that read no force: the only ones a single atom can feed."""

SHELL_CHARACTERS = set(" \t\n\r\"'\\$`;&|<>()*?[]{}!#")
"""Characters a path may not hold where Parsl starts workers by an unquoted command."""


class PreflightError(ValueError):
    """An input that would make a campaign fail or achieve nothing; the message names
    the problem and the fix."""


# ---------------------------------------------------------------- settings
def check_settings(campaign) -> None:
    """Settings that only make sense together, checked against each other."""
    from palflow.pipeline.policies.measures import measure_options

    generator, training, selection = campaign.generator, campaign.training, campaign.selection
    kinds = {campaign.generator_for(system)["kind"] for system in campaign.all_systems()}
    if "md" in kinds and generator.sample_interval > generator.steps_per_task:
        raise PreflightError(
            f"generator.sample_interval = {generator.sample_interval} is longer than the MD "
            f"segment, generator.steps_per_task = {generator.steps_per_task}: no frame would "
            "ever be recorded; make sample_interval at most steps_per_task"
        )
    if training.learning_rate_min > training.learning_rate:
        raise PreflightError(
            f"training.learning_rate_min = {training.learning_rate_min:g} is above "
            f"training.learning_rate = {training.learning_rate:g}: the rate decays towards "
            "the minimum, so make it at most the initial rate"
        )
    if generator.min_distance >= generator.max_neighbour_distance:
        raise PreflightError(
            f"generator.min_distance = {generator.min_distance:g} Å is not below "
            f"generator.max_neighbour_distance = {generator.max_neighbour_distance:g} Å: every "
            "frame would count as blown up or flown off; make min_distance the smaller"
        )
    upper = selection.upper_threshold
    if upper and selection.threshold_mode == "fixed" and selection.measure != "random":
        for system in campaign.all_systems():
            lower = system.threshold if system.threshold is not None else selection.threshold
            if upper <= lower:
                raise PreflightError(
                    f"selection.upper_threshold = {upper:g} is not above the selection "
                    f"threshold {lower:g}: no frame could lie between the two trust levels; "
                    "raise upper_threshold (or 0 for none) or lower the threshold"
                )
    if selection.threshold_mode == "calibrated" and selection.measure in FORCELESS_MEASURES | {
        "relative_force_spread"
    }:
        raise PreflightError(
            f"selection.threshold_mode = 'calibrated' needs a measure in force units (eV/Å), "
            f"not {selection.measure!r}: use a fixed or percentile threshold, or a force measure"
        )
    if campaign.oracle.mpi_nodes > campaign.oracle.mpi_ranks:
        raise PreflightError(
            f"oracle.mpi_nodes = {campaign.oracle.mpi_nodes} is more than oracle.mpi_ranks = "
            f"{campaign.oracle.mpi_ranks}: every node needs a rank; raise mpi_ranks or lower "
            "mpi_nodes"
        )
    try:
        measure_options(selection.measure, dict(selection.measure_options))
    except ValueError as error:
        raise PreflightError(str(error)) from None


# ---------------------------------------------------------------- structures
def check_structures(campaign, starts: Mapping[str, Sequence[Atoms]]) -> None:
    """Every start frame has atoms, no two closer than :data:`MIN_DISTANCE` or
    ``generator.min_distance``, a cell in each periodic direction, no non-periodic
    atom beyond ``generator.max_neighbour_distance`` of the others, and more than one
    atom where the measure reads forces. ``starts`` maps system names to frames."""
    from ase.neighborlist import neighbor_list

    generator = campaign.generator
    for system in campaign.all_systems():
        for index, atoms in enumerate(starts[system.name]):
            where = f"start structure {system.structure!r}" + (
                f", frame {index}" if len(starts[system.name]) > 1 else ""
            )
            if len(atoms) == 0:
                raise PreflightError(f"{where} has no atoms: give a structure with atoms")
            lengths = atoms.cell.lengths()
            if atoms.pbc.any() and (
                (lengths[atoms.pbc] < 1e-6).any() or (atoms.pbc.all() and atoms.cell.volume < 1e-6)
            ):
                axes = "".join("xyz"[i] for i in range(3) if atoms.pbc[i])
                raise PreflightError(
                    f"{where} is periodic along {axes} but has no cell there: give the cell, "
                    "or make it non-periodic"
                )
            if len(atoms) == 1:
                if not atoms.pbc.any():
                    raise PreflightError(
                        f"{where} is a single atom in vacuum: its energy and forces never "
                        "change, so there is nothing to learn; give a molecule or a cell"
                    )
                if campaign.selection.measure not in FORCELESS_MEASURES:
                    raise PreflightError(
                        f"{where} is a single atom in a periodic cell: its forces are zero by "
                        "symmetry, so no frame is ever worth a label; give a supercell "
                        "(atoms.repeat)"
                    )
                continue
            limit = max(MIN_DISTANCE, generator.min_distance)
            i, j, d = neighbor_list("ijd", atoms, limit)
            if len(d):
                k = int(np.argmin(d))
                fix = (
                    "fix the structure"
                    if d[k] < MIN_DISTANCE
                    else "fix the structure, or lower generator.min_distance"
                )
                raise PreflightError(
                    f"{where}: atoms {i[k]} and {j[k]} are {d[k]:.2f} Å apart, closer than "
                    f"{limit:g} Å (overlapping atoms; MD would count it as blown up): {fix}"
                )
            if not atoms.pbc.any():
                far = generator.max_neighbour_distance
                lonely = sorted(set(range(len(atoms))) - set(neighbor_list("i", atoms, far)))
                if lonely:
                    raise PreflightError(
                        f"{where}: atom {lonely[0]} is farther than generator."
                        f"max_neighbour_distance = {far:g} Å from every other atom (MD would "
                        "count it as flown off): fix the structure, or raise that distance"
                    )


# ---------------------------------------------------------------- plug-ins
def _fake_prediction(structures: Sequence[Atoms], n_members: int, rng):
    from palflow.pipeline.policies.measures import EnsemblePrediction

    n_atoms = np.array([len(a) for a in structures])
    periodic = all(a.pbc.all() for a in structures)
    return EnsemblePrediction(
        member_energies=rng.normal(size=(n_members, len(structures))),
        member_forces=rng.normal(0.0, 0.1, size=(n_members, int(n_atoms.sum()), 3)),
        structure_index=np.repeat(np.arange(len(structures)), n_atoms),
        n_atoms=n_atoms,
        member_stress=rng.normal(0, 1e-3, (n_members, len(structures), 3, 3)) if periodic else None,
    )


def trial_plugins(campaign, starts: Mapping[str, Sequence[Atoms]]) -> None:
    """Call the selection measure, the query and each metrology plug-in once, on rattled
    copies of the first start structure and made-up ensemble predictions."""
    from palflow.pipeline.policies.metrology import load_plugins
    from palflow.pipeline.policies.protocols import Evaluation, QueryContext
    from palflow.pipeline.policies.selection import Candidate
    from palflow.pipeline.policies.strategies import Selector

    rng = np.random.default_rng(0)
    first = next(iter(starts.values()))[0]
    structures = []
    for seed in range(4):
        atoms = first.copy()
        atoms.rattle(0.02, seed=seed)
        structures.append(atoms)
    selection = campaign.selection
    selector = Selector(campaign, seed=0, cutoff=campaign.model.cutoff)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not callable(selector.measure):
            raise PreflightError(
                f"selection.measure {selection.measure!r} is a {type(selector.measure).__name__},"
                " not a function: name a function (prediction, context) -> scores"
            )
        try:
            selector.note_labelled(structures[:2])
            scores = selector.score(
                _fake_prediction(structures, campaign.model.n_members, rng), structures
            )
        except Exception as error:
            raise _plugin_error("selection.measure", selection.measure, error) from None
        if np.isnan(scores).any():
            raise PreflightError(
                f"selection.measure {selection.measure!r} scored a trial prediction NaN: fix "
                "the measure"
            )
        candidates = [
            Candidate(k, atoms, float(abs(s)), 0.0, 0, priority=float(s))
            for k, (atoms, s) in enumerate(zip(structures, np.nan_to_num(scores), strict=True))
        ]
        candidates.sort(key=lambda c: c.rank, reverse=True)
        context = QueryContext(selector.rng, selector.labelled_descriptors, selector.descriptors)
        try:
            chosen = list(selector.query.select(candidates, 2, context))
        except Exception as error:
            raise _plugin_error("selection.query", selection.query, error) from None
        if not all(any(c is given for given in candidates) for c in chosen):
            raise PreflightError(
                f"selection.query {selection.query!r} returned something other than the "
                "candidates it was given: return a list of some of them"
            )
        force = np.abs(rng.normal(0.1, 0.05, len(structures)))
        evaluation = Evaluation(0, 0, force, force * 0.8, rng.normal(0, 0.01, len(structures)))
        for path, plugin in zip(
            campaign.metrology.plugins, load_plugins(campaign.metrology.plugins), strict=True
        ):
            try:
                metrics = plugin(evaluation)
            except Exception as error:
                raise _plugin_error("metrology plug-in", path, error) from None
            if not isinstance(metrics, Mapping):
                raise PreflightError(
                    f"metrology plug-in {path!r} returned a {type(metrics).__name__}, not a "
                    "dict of metrics: return {name: number}"
                )


def _plugin_error(what: str, name: str, error: Exception) -> PreflightError:
    return PreflightError(
        f"{what} {name!r} failed on a trial call with made-up predictions: "
        f"{type(error).__name__}: {error}; fix it, or choose another"
    )


# ---------------------------------------------------------------- the oracle
def _covering_frames(frames: Sequence[Atoms]) -> list[Atoms]:
    """The fewest frames, first ones first, that hold every element of ``frames``."""
    chosen, seen = [], set()
    for atoms in frames:
        if set(atoms.numbers) - seen:
            chosen.append(atoms)
            seen |= set(atoms.numbers)
    return chosen


def _trial_label(spec: dict[str, Any], scratch: str, max_force: float, atoms: Atoms):
    """Build the calculator and label ``atoms`` (in the trial's child); never raises."""
    from palflow.apps.oracle import OK, BadLabel, label_structure, make_calculator

    try:
        calculator = make_calculator(spec, scratch)
        if not all(
            callable(getattr(calculator, m, None)) for m in ("get_potential_energy", "get_forces")
        ):
            return (
                f"it made a {type(calculator).__name__}, which is not an ASE calculator "
                "(no get_potential_energy/get_forces)",
                None,
            )
        label_structure(atoms, calculator, max_force)
        return OK, None
    except BadLabel as error:
        return error.kind.reason(str(error)), None
    except Exception as error:
        return f"{type(error).__name__}: {error}", None


def trial_oracle(campaign, starts: Mapping[str, Sequence[Atoms]]) -> None:
    """Label each system's start frames (those covering its elements) once with the
    campaign's oracle, in a child process, each within ``oracle.timeout_s``.

    First, a calculator class with a ``preflight(kwargs, structures)`` method (a list
    of problems, each naming its fix) is asked about every start structure; that
    runs nothing and is never skipped. The trial run is skipped with ``oracle.trial =
    false``, and for MPI oracles (``mpi_ranks`` or ``mpi_nodes`` above 1), which run on
    the site's nodes, not here.
    """
    from functools import partial

    from palflow.apps.common import import_object
    from palflow.apps.oracle import OK
    from palflow.apps.oracles.isolation import label_isolated

    oracle = campaign.oracle
    try:
        own_check = getattr(import_object(oracle.calculator), "preflight", None)
    except Exception:  # the trial below names a calculator that does not import
        own_check = None
    if callable(own_check):
        frames = [atoms for system in campaign.all_systems() for atoms in starts[system.name]]
        problems = own_check(dict(oracle.kwargs), frames)
        if problems:
            raise PreflightError(f"oracle {oracle.calculator!r}: " + "; ".join(problems))
    if not oracle.trial or oracle.mpi_ranks > 1 or oracle.mpi_nodes > 1:
        return
    jobs = [
        (system, atoms)
        for system in campaign.all_systems()
        for atoms in _covering_frames(starts[system.name])
    ]
    spec = {"calculator": oracle.calculator, "kwargs": dict(oracle.kwargs)}
    scratch = tempfile.mkdtemp(prefix="palflow-trial-", dir=os.environ.get("PALFLOW_SCRATCH"))
    try:
        label = partial(_trial_label, spec, scratch, oracle.max_force)
        outcomes = label_isolated([atoms for _, atoms in jobs], label, oracle.timeout_s or None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for (system, atoms), (status, _, _) in zip(jobs, outcomes, strict=True):
        if status != OK:
            raise PreflightError(
                f"the oracle {oracle.calculator!r} failed its trial on the start structure "
                f"{system.structure!r} ({atoms.get_chemical_formula()}): {status}. Fix the "
                "calculator, oracle.kwargs or the structure (does the oracle know every "
                "element?); oracle.trial = false skips this trial"
            )


# ---------------------------------------------------------------- the run directory
def check_run_path(root: str | os.PathLike, site: str | None = None) -> None:
    """The run directory ``root`` can be made: it is not a file, lies under no file,
    its folder is writable, and, on a site whose workers Parsl starts by a command
    line (``site`` names it), its path holds no space or shell character."""
    root = Path(os.path.abspath(root))
    if root.exists() and not root.is_dir():
        raise PreflightError(f"--run-dir {root} is a file: give the path of a new folder")
    ancestor = next(p for p in (root, *root.parents) if p.exists())
    if not ancestor.is_dir():
        raise PreflightError(
            f"--run-dir {root} lies under {ancestor}, which is a file: give a path of folders"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".palflow-probe-", dir=ancestor))
    except OSError as error:
        raise PreflightError(
            f"cannot create the run directory {root}: {ancestor} is not writable "
            f"({error.strerror}): give a --run-dir where you may write"
        ) from None
    bad = sorted(set(str(root)) & SHELL_CHARACTERS)
    if bad and site is not None and _site_starts_workers(site):
        raise PreflightError(
            f"the run directory {str(root)!r} holds {' '.join(repr(c) for c in bad)}, which the "
            "site's workers cannot carry (Parsl starts them with an unquoted command line): "
            "give a --run-dir without spaces or shell characters"
        )


def _site_starts_workers(site: str) -> bool:
    """Whether the site has an executor other than thread pools (HTEX and the like)."""
    from palflow.pipeline.config.sites import load_site
    from parsl.executors.threads import ThreadPoolExecutor

    return any(not isinstance(e, ThreadPoolExecutor) for e in load_site(site).config.executors)
