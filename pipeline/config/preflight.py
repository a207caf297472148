"""The pre-flight: every input tried before anything is created.

:mod:`palflow.pipeline.run` calls :func:`check_campaign` once a campaign's settings
have validated and before its run directory exists, and :func:`check_run_path`
first. Each failure is one :class:`~palflow.apps.errors.InputError` of the kind at
fault, naming the problem and the fix; the command line turns it into exit status 2
with nothing created.

- :func:`check_calculator`: the oracle's calculator imports and gives forces (a
  name that does not import gets the close names of its module);
- :func:`check_strategy`: the generators, the selection measure, the query and the
  metrology plug-ins exist;
- :func:`check_settings`: settings that only make sense together, and the selection
  measure's options against what the measure reads;
- :func:`read_starts`, :func:`check_structures`: every start structure reads, has
  atoms, no overlapping atoms, a cell where it is periodic, and something to learn;
- :mod:`palflow.pipeline.config.exploration`: constant pressure only for MD on
  periodic cells, and what the exploring generators need of systems and model;
- a MACE foundation model file exists (:func:`check_foundation`), the model
  (:func:`palflow.pipeline.config.models.check_model`), the warm start
  (:func:`palflow.pipeline.resume.warm_start.check_warm_start`) and every labelled
  file (:func:`check_labelled_files`);
- the trial calls of :mod:`palflow.pipeline.config.trials`, last: each plug-in on a
  fake prediction, and the oracle on the start structures;
- :func:`check_run_path`: the run directory can be made where it is asked for, and
  its path is one the site's workers can carry.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import covalent_radii

from palflow.apps.common import import_object
from palflow.apps.errors import CalculatorError, SettingsError, StructureError
from palflow.apps.generator import resolve_generator
from palflow.apps.models.backend import ModelError
from palflow.apps.models.mace.foundation import missing_foundation
from palflow.apps.oracles.calculators import close_calculators
from palflow.pipeline.config.exploration import check_ensemble, check_exploration
from palflow.pipeline.config.models import check_model
from palflow.pipeline.config.sites import load_site
from palflow.pipeline.config.trials import trial_oracle, trial_plugins
from palflow.pipeline.policies.measures import get_measure, measure_options
from palflow.pipeline.policies.metrology import load_plugins
from palflow.pipeline.policies.strategies import make_query
from palflow.pipeline.resume.warm_start import check_warm_start
from palflow.pipeline.state.rundir import RunDirectoryError
from palflow.pipeline.state.structures import (
    element_carrier,
    load_start_structures,
    read_labelled_file,
)

MIN_DISTANCE = 0.5
"""Atoms of a start structure closer than this (Å) overlap."""

FORCELESS_MEASURES = {"energy_spread", "stress_spread", "random", "labelled_distance"}
"""palflow's measures that read no force: the only ones a single atom can feed."""

SHELL_CHARACTERS = set(" \t\n\r\"'\\$`;&|<>()*?[]{}!#")
"""Characters a path may not hold where Parsl starts workers by an unquoted command."""

__all__ = ["check_campaign", "check_run_path", "trial_oracle", "trial_plugins"]


def check_campaign(
    campaign, mpi_command: str = "parsl", source: str | os.PathLike | None = None
) -> dict[str, list[Atoms]]:
    """Every check of a new campaign, cheapest first, the oracle's trial last.

    ``mpi_command`` is the site's launch prefix template (for the oracle's trial);
    ``source``, the campaign file, which the messages about the calculator and a
    missing foundation model name. Returns the start structures of each system, by
    name.

    Raises
    ------
    palflow.apps.errors.InputError
        The first problem found, naming its fix.
    """

    check_calculator(campaign.oracle.calculator, source)
    check_strategy(campaign)
    check_settings(campaign)
    starts = read_starts(campaign)
    check_structures(campaign, starts)
    carrier = element_carrier([atoms for frames in starts.values() for atoms in frames])
    check_foundation(campaign, source)
    check_model(campaign, carrier)
    check_ensemble(campaign, starts)
    check_exploration(campaign, starts)
    check_warm_start(campaign, carrier)
    check_labelled_files(campaign)
    trial_plugins(campaign, starts)
    trial_oracle(campaign, starts, mpi_command)  # last: the one check that may take a while
    return starts


def check_calculator(path: str, source: str | os.PathLike | None = None) -> None:
    """The oracle's calculator imports, and can give forces; a name that does not
    import gets the close names of its module (``did you mean 'ase.calculators.emt:EMT'?``).
    ``source`` is the campaign file, named in the message when given."""

    where = f"{source}: " if source else ""
    try:
        calculator = import_object(path)
    except ImportError as error:
        close = close_calculators(path)
        hint = f"; did you mean {_one_of(close)}?" if close else ""
        raise CalculatorError(f"{where}oracle.calculator = {path!r}: {error}{hint}") from None
    implemented = getattr(calculator, "implemented_properties", None)
    if implemented is not None and "forces" not in implemented:
        raise CalculatorError(
            f"{where}oracle.calculator = {path!r} does not compute forces (it implements "
            f"{list(implemented)}): pick one whose implemented_properties include 'forces'"
        )


def _one_of(names: Sequence[str]) -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``."""
    quoted = [repr(name) for name in names]
    return " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)


def check_foundation(campaign, source: str | os.PathLike | None = None) -> None:
    """A MACE foundation model file (``model.foundation``) exists; the message says
    where it was looked for (beside the campaign file ``source``, in the current
    folder) and what to give instead (:func:`~.models.check_model` checks the rest)."""
    path = getattr(campaign.model, "foundation", None)
    if campaign.model.name != "mace" or not path or os.path.isfile(path):
        return
    folder = Path(source).resolve().parent if source else None
    where = f"{source}: " if source else ""
    raise ModelError(where + missing_foundation(path, folder))


def check_strategy(campaign) -> None:
    """The generators, the selection measure, the query and each metrology plug-in
    exist."""
    generators = [campaign.generator.kind, *(s.generator for s in campaign.all_systems())]
    for kind in filter(None, generators):  # each raises PluginError for a bad name
        resolve_generator(kind)
    get_measure(campaign.selection.measure)
    make_query(campaign.selection.query)
    load_plugins(campaign.metrology.plugins)


def read_starts(campaign) -> dict[str, list[Atoms]]:
    """The start structures of each system, by name."""

    try:
        return {
            system.name: load_start_structures(system.structure, system.vacuum)
            for system in campaign.all_systems()
        }
    except ValueError as error:  # the file does not parse, or names nothing
        raise StructureError(str(error)) from None


def check_labelled_files(campaign) -> None:
    """Every held-out file (``test.file``, a system's ``test_file``) holds labels."""

    for path in [campaign.test.file, *(s.test_file for s in campaign.all_systems())]:
        if path:
            try:
                read_labelled_file(path)
            except ValueError as error:  # does not parse, or lacks labels
                raise StructureError(str(error)) from None


# ---------------------------------------------------------------- settings
def check_settings(campaign) -> None:
    """Settings that only make sense together, checked against each other."""

    generator, training, selection = campaign.generator, campaign.training, campaign.selection
    kinds = {campaign.generator_for(system)["kind"] for system in campaign.all_systems()}
    if "md" in kinds and generator.sample_interval > generator.steps_per_task:
        raise SettingsError(
            f"generator.sample_interval = {generator.sample_interval} is longer than the MD "
            f"segment, generator.steps_per_task = {generator.steps_per_task}: no frame would "
            "ever be recorded; make sample_interval at most steps_per_task"
        )
    if training.learning_rate_min > training.learning_rate:
        raise SettingsError(
            f"training.learning_rate_min = {training.learning_rate_min:g} is above "
            f"training.learning_rate = {training.learning_rate:g}: the rate decays towards "
            "the minimum, so make it at most the initial rate"
        )
    if generator.min_distance >= generator.max_neighbour_distance:
        raise SettingsError(
            f"generator.min_distance = {generator.min_distance:g} Å is not below "
            f"generator.max_neighbour_distance = {generator.max_neighbour_distance:g} Å: every "
            "frame would count as blown up or flown off; make min_distance the smaller"
        )
    upper = selection.upper_threshold
    if upper and selection.threshold_mode == "fixed" and selection.measure != "random":
        for system in campaign.all_systems():
            lower = system.threshold if system.threshold is not None else selection.threshold
            if upper <= lower:
                raise SettingsError(
                    f"selection.upper_threshold = {upper:g} is not above the selection "
                    f"threshold {lower:g}: no frame could lie between the two trust levels; "
                    "raise upper_threshold (or 0 for none) or lower the threshold"
                )
    if selection.threshold_mode == "calibrated" and selection.measure in FORCELESS_MEASURES | {
        "relative_force_spread"
    }:
        raise SettingsError(
            f"selection.threshold_mode = 'calibrated' needs a measure in force units (eV/Å), "
            f"not {selection.measure!r}: use a fixed or percentile threshold, or a force measure"
        )
    if campaign.oracle.mpi_nodes > campaign.oracle.mpi_ranks:
        raise SettingsError(
            f"oracle.mpi_nodes = {campaign.oracle.mpi_nodes} is more than oracle.mpi_ranks = "
            f"{campaign.oracle.mpi_ranks}: every node needs a rank; raise mpi_ranks or lower "
            "mpi_nodes"
        )
    measure_options(selection.measure, dict(selection.measure_options))  # SettingsError
    check_convergence_settings(campaign)


def check_convergence_settings(campaign) -> None:
    """The stop rules and the calibration have the data they are measured on."""

    selection, stop = campaign.selection, campaign.stop
    if not campaign.has_test_set:
        if stop.target_force_mae:
            raise SettingsError(
                "stop.target_force_mae needs a held-out set, and test.n_structures = 0 "
                "labels none: stop on stop.accurate_ratio instead, or label a test set"
            )
        without = [s.name for s in campaign.all_systems() if not s.test_file]
        if len(without) < len(campaign.all_systems()):  # some systems give a test_file
            raise SettingsError(
                f"system {without[0]!r} gives no test_file, and test.n_structures = 0 "
                "labels no held-out frames for it: give every system a test_file, or set "
                "test.n_structures"
            )
    if stop.accurate_ratio:
        if selection.measure == "random":
            raise SettingsError(
                "stop.accurate_ratio needs a lower trust level, and the random measure has "
                "none: choose an uncertainty measure, or stop on another rule"
            )
        if selection.threshold_mode == "percentile":
            raise SettingsError(
                "stop.accurate_ratio needs a lower trust level that stays put, and a "
                "percentile threshold moves with the scores (a fixed share of frames always "
                "lies below it): use a fixed or calibrated threshold"
            )
        for system in campaign.all_systems():
            lower = system.threshold if system.threshold is not None else selection.threshold
            if selection.threshold_mode == "fixed" and lower == 0:
                raise SettingsError(
                    "stop.accurate_ratio needs a lower trust level above 0: with "
                    "selection.threshold = 0 no frame is ever accurate; raise the threshold"
                )
    if selection.threshold_mode == "calibrated" and campaign.training.validation_fraction == 0:
        raise SettingsError(
            "selection.threshold_mode = 'calibrated' is fitted on validation labels, and "
            "training.validation_fraction = 0 keeps none: set it above 0 (e.g. 0.1)"
        )


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
                raise StructureError(f"{where} has no atoms: give a structure with atoms")
            lengths = atoms.cell.lengths()
            if atoms.pbc.any() and (
                (lengths[atoms.pbc] < 1e-6).any() or (atoms.pbc.all() and atoms.cell.volume < 1e-6)
            ):
                axes = "".join("xyz"[i] for i in range(3) if atoms.pbc[i])
                raise StructureError(
                    f"{where} is periodic along {axes} but has no cell there: give the cell, "
                    "or make it non-periodic"
                )
            if len(atoms) == 1:
                if not atoms.pbc.any():
                    raise StructureError(
                        f"{where} is a single atom in vacuum: its energy and forces never "
                        "change, so there is nothing to learn; give a molecule or a cell"
                    )
                if campaign.selection.measure not in FORCELESS_MEASURES:
                    raise StructureError(
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
                raise StructureError(
                    f"{where}: atoms {i[k]} and {j[k]} are {d[k]:.2f} Å apart, closer than "
                    f"{limit:g} Å (overlapping atoms; MD would count it as blown up): {fix}"
                )
            factor = generator.min_distance_factor
            if factor > 0:
                radii = covalent_radii[atoms.numbers]
                i, j, d = neighbor_list("ijd", atoms, 2 * factor * float(radii.max()))
                bonded = factor * (radii[i] + radii[j])
                if (d < bonded).any():
                    k = int(np.argmin(d - bonded))
                    raise StructureError(
                        f"{where}: atoms {i[k]} and {j[k]} are {d[k]:.2f} Å apart, under "
                        f"generator.min_distance_factor = {factor:g} of their covalent radii's "
                        f"sum ({bonded[k]:.2f} Å; MD would count it as blown up): fix the "
                        "structure, or lower min_distance_factor"
                    )
            if not atoms.pbc.any():
                far = generator.max_neighbour_distance
                lonely = sorted(set(range(len(atoms))) - set(neighbor_list("i", atoms, far)))
                if lonely:
                    raise StructureError(
                        f"{where}: atom {lonely[0]} is farther than generator."
                        f"max_neighbour_distance = {far:g} Å from every other atom (MD would "
                        "count it as flown off): fix the structure, or raise that distance"
                    )


# ---------------------------------------------------------------- the run directory
def check_run_path(root: str | os.PathLike, site: str | None = None) -> None:
    """The run directory ``root`` can be made: it is not a file, lies under no file,
    its folder is writable, and, on a site whose workers Parsl starts by a command
    line (``site`` names it), its path holds no space or shell character."""
    root = Path(os.path.abspath(root))
    if root.exists() and not root.is_dir():
        raise RunDirectoryError(f"--run-dir {root} is a file: give the path of a new folder")
    ancestor = next(p for p in (root, *root.parents) if p.exists())
    if not ancestor.is_dir():
        raise RunDirectoryError(
            f"--run-dir {root} lies under {ancestor}, which is a file: give a path of folders"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".palflow-probe-", dir=ancestor))
    except OSError as error:
        raise RunDirectoryError(
            f"cannot create the run directory {root}: {ancestor} is not writable "
            f"({error.strerror}): give a --run-dir where you may write"
        ) from None
    bad = sorted(set(str(root)) & SHELL_CHARACTERS)
    if bad and site is not None and _site_starts_workers(site):
        raise RunDirectoryError(
            f"the run directory {str(root)!r} holds {' '.join(repr(c) for c in bad)}, which the "
            "site's workers cannot carry (Parsl starts them with an unquoted command line): "
            "give a --run-dir without spaces or shell characters"
        )


def _site_starts_workers(site: str) -> bool:
    """Whether the site has an executor other than thread pools (HTEX and the like)."""
    from parsl.executors.threads import ThreadPoolExecutor

    return any(not isinstance(e, ThreadPoolExecutor) for e in load_site(site).config.executors)
