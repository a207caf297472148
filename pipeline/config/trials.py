"""The pre-flight's trial calls: each plug-in, and the oracle, run once before anything
is created (:func:`palflow.pipeline.config.preflight.check_campaign` calls them last).

- :func:`trial_plugins`: the selection measure, the query and each metrology
  plug-in called once on a tiny fake prediction; a failure is a
  :class:`~palflow.apps.errors.PluginError`;
- :func:`trial_oracle`: the calculator's own ``preflight(kwargs, structures)`` where
  it has one (``palflow.apps.oracles.cp2k.CP2KOracle``: binary, basis and potential
  names, a periodic cell), then the calculator built and run once on the start
  structures (within ``oracle.timeout_s``, in a child process), which must give
  finite energies and forces; ``oracle.trial = false`` skips the run. A failure is a
  :class:`~palflow.apps.errors.CalculatorError`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ase import Atoms

from palflow.apps.common import import_object
from palflow.apps.contracts import CalculatorSpec
from palflow.apps.errors import CalculatorError, PluginError
from palflow.apps.oracles.calculators import OK, BadLabel, label_structure, make_calculator
from palflow.apps.oracles.isolation import label_isolated
from palflow.pipeline.policies.measures import EnsemblePrediction
from palflow.pipeline.policies.metrology import load_plugins
from palflow.pipeline.policies.protocols import Evaluation, QueryContext
from palflow.pipeline.policies.selection import Candidate
from palflow.pipeline.policies.strategies import Selector


# ---------------------------------------------------------------- plug-ins
def _fake_prediction(structures: Sequence[Atoms], n_members: int, rng):

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
            raise PluginError(
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
            raise PluginError(
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
            raise PluginError(
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
                raise PluginError(
                    f"metrology plug-in {path!r} returned a {type(metrics).__name__}, not a "
                    "dict of metrics: return {name: number}"
                )


def _plugin_error(what: str, name: str, error: Exception) -> Exception:
    """A user's plug-in (named by import path) that fails its trial is bad input; a
    built-in that fails is a bug of palflow's, raised as it is."""
    if ":" not in name:
        return error
    return PluginError(
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


def trial_oracle(
    campaign, starts: Mapping[str, Sequence[Atoms]], mpi_command: str = "parsl"
) -> None:
    """Label each system's start frames (those covering its elements) once with the
    campaign's oracle, in a child process, each within ``oracle.timeout_s``.

    First, a calculator class with a ``preflight(kwargs, structures)`` method (a list
    of problems, each naming its fix) is asked about every start structure; that
    runs nothing and is never skipped. The trial run is skipped with ``oracle.trial =
    false``, and for MPI oracles (``mpi_ranks`` or ``mpi_nodes`` above 1), which run on
    the site's nodes, not here. ``mpi_command`` is the site's launch prefix template,
    for a ``{mpi_prefix}`` in the calculator's kwargs.
    """
    from functools import partial

    oracle = campaign.oracle
    try:
        own_check = getattr(import_object(oracle.calculator), "preflight", None)
    except Exception:  # the trial below names a calculator that does not import
        own_check = None
    if callable(own_check):
        frames = [atoms for system in campaign.all_systems() for atoms in starts[system.name]]
        problems = own_check(dict(oracle.kwargs), frames)
        if problems:
            raise CalculatorError(f"oracle {oracle.calculator!r}: " + "; ".join(problems))
    if not oracle.trial or oracle.mpi_ranks > 1 or oracle.mpi_nodes > 1:
        return
    jobs = [
        (system, atoms)
        for system in campaign.all_systems()
        for atoms in _covering_frames(starts[system.name])
    ]
    spec = CalculatorSpec.of(oracle, mpi_command).as_dict()
    scratch = tempfile.mkdtemp(prefix="palflow-trial-", dir=os.environ.get("PALFLOW_SCRATCH"))
    try:
        label = partial(_trial_label, spec, scratch, oracle.max_force)
        outcomes = label_isolated([atoms for _, atoms in jobs], label, oracle.timeout_s or None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for (system, atoms), (status, _, _) in zip(jobs, outcomes, strict=True):
        if status != OK:
            raise CalculatorError(
                f"the oracle {oracle.calculator!r} failed its trial on the start structure "
                f"{system.structure!r} ({atoms.get_chemical_formula()}): {status}. Fix the "
                "calculator, oracle.kwargs or the structure (does the oracle know every "
                "element?); oracle.trial = false skips this trial"
            )
