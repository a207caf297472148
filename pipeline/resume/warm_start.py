"""Warm starts: labels and members from earlier work, checked before anything runs.

``initial.file`` gives labelled structures that become the first training data
without an oracle call; ``initial.ensemble`` gives an earlier run's ensemble whose
members the new members continue from. :func:`check_warm_start` refuses bad files up
front (exit status 2, nothing created); :func:`warm_labels` and
:func:`warm_member_checkpoints` are what the coordinator uses when the run starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols

from palflow.apps.errors import InputError
from palflow.apps.models import registry
from palflow.pipeline.state.rundir import RunDirectory, is_run_directory
from palflow.pipeline.state.structures import read_frames

SOURCE = "file"
"""The ``source`` of a warm-start label in ``labels.db``; it counts as an initial label."""


class WarmStartError(InputError):
    """A warm-start file that cannot be used; the message names the file and the fix."""


def read_warm_labels(path: str, campaign: Any, start: Atoms) -> list[Atoms]:
    """The labelled structures of ``initial.file``, checked.

    Raises
    ------
    WarmStartError
        When the file does not parse, is empty, or a frame lacks an energy or forces,
        has elements the campaign's start structure lacks (the oracle has not been
        asked about them), non-finite labels, or forces above ``oracle.max_force``
        (units that look wrong, e.g. Hartree/Bohr or kcal/mol/Å).
    """
    if not os.path.exists(path):
        raise WarmStartError(f"initial.file {path!r} does not exist")
    frames = read_frames(path, "initial.file", WarmStartError)
    allowed = set(start.numbers)
    max_force = campaign.oracle.max_force
    labelled = []
    for index, atoms in enumerate(frames):
        where = f"initial.file {path!r}, frame {index}"
        results = getattr(atoms.calc, "results", None) or {}
        for key in ("energy", "forces"):
            if key not in results:
                raise WarmStartError(
                    f"{where} has no {'energy' if key == 'energy' else 'forces'}: a warm start "
                    "needs energies and forces for every frame"
                )
        energy = float(results["energy"])
        forces = np.asarray(results["forces"], dtype=float)
        if not np.isfinite(energy) or not np.isfinite(forces).all():
            raise WarmStartError(f"{where} has a non-finite energy or forces")
        extra = sorted({chemical_symbols[z] for z in atoms.numbers} - {
            chemical_symbols[z] for z in allowed})  # fmt: skip
        if extra:
            raise WarmStartError(
                f"{where} has element(s) {', '.join(extra)} that the start structure "
                f"{', '.join(repr(s.structure) for s in campaign.all_systems())} lacks: the "
                "campaign's oracle labels only its elements; drop those frames or start from "
                "a structure that has them"
            )
        largest = float(np.abs(forces).max(initial=0.0))
        if largest > max_force:
            raise WarmStartError(
                f"{where} has a force component of {largest:.3g}, above oracle.max_force "
                f"= {max_force:g} eV/Å: are the units eV and Å? (Hartree/Bohr and "
                "kcal/mol/Å need converting)"
            )
        stress = results.get("stress")
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(
            frame, energy=energy, forces=forces, **({} if stress is None else {"stress": stress})
        )
        labelled.append(frame)
    return labelled


def ensemble_file(path: str) -> str:
    """The ensemble file ``initial.ensemble`` names: the file itself, or a run
    directory's newest ensemble.

    Raises
    ------
    WarmStartError
        When there is no such file, or the run directory has published no ensemble.
    """

    if os.path.isdir(path):
        if not is_run_directory(path):
            raise WarmStartError(f"initial.ensemble {path!r} is a folder but not a palflow run")
        found = RunDirectory.open(path).ensembles()
        if not found:
            raise WarmStartError(f"initial.ensemble: the run {path!r} has no ensemble yet")
        return str(found[-1][1])
    if not os.path.isfile(path):
        raise WarmStartError(f"initial.ensemble {path!r} does not exist")
    return path


def check_warm_ensemble(path: str, campaign: Any, start: Atoms) -> None:
    """Refuse an ``initial.ensemble`` that does not load, or is of another model than
    ``model.name``, or cannot treat an element of the start structure (a MACE table)."""
    from palflow.apps.models.core import load_checkpoint

    path = ensemble_file(path)
    try:
        model, _ = load_checkpoint(path)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise WarmStartError(
            f"initial.ensemble {path!r} is not a palflow ensemble checkpoint ({first_line}): "
            "give an earlier run's models/ensemble.vNNNNN.pt, or its run directory"
        ) from None
    name = registry.name_of(model)
    if name != campaign.model.name:
        raise WarmStartError(
            f"initial.ensemble {path!r} holds a {name} ensemble, but model.name is "
            f"{campaign.model.name!r}: set model.name = {name!r}"
        )
    spec = getattr(model.spec, "to_dict", lambda: {})()
    missing = registry.backend(name).missing_elements(spec, [start])
    if missing:
        raise WarmStartError(
            f"initial.ensemble {path!r} knows no element(s) {', '.join(missing)} of the start "
            "structure"
        )


def check_warm_start(campaign: Any, start: Atoms) -> None:
    """Everything about the warm start that can be checked before a run is created."""
    if campaign.initial.file:
        read_warm_labels(campaign.initial.file, campaign, start)
    if campaign.initial.ensemble:
        check_warm_ensemble(campaign.initial.ensemble, campaign, start)


def warm_member_checkpoints(campaign: Any, folder: Path) -> list[str]:
    """Write one K=1 checkpoint per member of the campaign from ``initial.ensemble``
    into ``folder``; return their paths. Member k continues from member k (modulo the
    earlier ensemble's size).

    Where the earlier run's own member checkpoints lie beside its ensemble (its
    ``models/`` folder), each member continues from its newest one, optimiser state
    and learning-rate schedule included: a true continuation. A stacked ensemble alone
    keeps no optimiser state; its members then continue with a fresh Adam at the
    floor of the schedule (``learning_rate_min``), and the first epochs cost some
    accuracy (a fresh Adam moves every weight by about the learning rate at once).
    """
    import shutil

    from palflow.apps.models.core import load_checkpoint, save_checkpoint

    path = Path(ensemble_file(campaign.initial.ensemble))
    model, _ = load_checkpoint(path)
    earlier = RunDirectory(path.parent.parent)
    half_life = campaign.training.learning_rate_half_life_steps
    extra = {"warm_start": True, "steps": 20 * half_life}  # 2**-20 of the way from the floor
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(campaign.model.n_members):
        out = folder / f"warm.member{k:02d}.pt"
        own = (
            earlier.member_checkpoints(k % model.n_members) if path.parent.name == "models" else []
        )
        if own:
            shutil.copyfile(own[-1][1], out)
        else:
            save_checkpoint(out, model.member(k % model.n_members), extra)
        paths.append(str(out))
    return paths
