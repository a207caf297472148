"""What the exploring kinds of MD add to a generator task's walkers
(``generator.kind``: ``"biased_md"``, ``"metadynamics"``, ``"replica_exchange"``,
and the temperature schedule of any kind of MD).

:class:`Exploration` is driven by :func:`palflow.apps.generator._run_md` around
:class:`palflow.apps.md.dynamics.BatchedDynamics`' steps: it sets each walker's
temperature (its ladder rung times its schedule's factor at its own step), hands the
integrator its bias, drops hills and attempts exchanges between steps, stops a biased
walker past the upper trust level, and says what each recorded frame carries besides
the committee's predictions (the temperature, the bias energy, the collective
variables, the replica). Its state lives where a resume finds it: in the walker's
last frame (``info``: its MD steps, its replica) and in the hills files.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from ase import Atoms, units

from palflow.apps.md.bias import UncertaintyBias
from palflow.apps.md.metadynamics import Metadynamics
from palflow.apps.md.tempering import REPLICA_KEY, STEPS_KEY, ReplicaExchange, schedule_factor


def exchanges_path(output_path: str) -> str:
    """Where a replica-exchange task records its exchanges: beside its first walker's
    frames (``walkerNNN.segNNNNN.exchanges.json``)."""
    return output_path.removesuffix(".npz") + ".exchanges.json"


class Exploration:
    """The exploring part of one MD task.

    Parameters
    ----------
    settings
        The generator section, with ``hills_paths`` (and ``shared_hills_paths``) for
        metadynamics.
    walkers
        The task's walkers, in order (a ladder's rungs, for replica exchange).
    rng
        Random numbers for the exchanges.
    """

    def __init__(self, settings: dict[str, Any], walkers: list[Atoms], rng) -> None:
        kind = settings["kind"]
        self.settings = settings
        self.walkers = walkers
        self.bias: UncertaintyBias | Metadynamics | None = None
        if kind == "biased_md":
            self.bias = UncertaintyBias(settings, len(walkers))
        elif kind == "metadynamics":
            if "hills_paths" not in settings:
                raise ValueError("metadynamics needs settings['hills_paths'], one file per walker")
            self.bias = Metadynamics(settings)
        self.exchange = None
        base = [settings["temperature_K"]] * len(walkers)
        if kind == "replica_exchange":
            ladder = settings["temperature_ladder_K"]
            if len(walkers) != len(ladder):
                raise ValueError(
                    f"a replica-exchange task takes one walker per rung of its ladder "
                    f"({len(ladder)}), not {len(walkers)}"
                )
            self.exchange = ReplicaExchange(ladder, settings["exchange_interval"], rng)
            base = list(ladder)
            # A walker reset to its start has lost its replica: it takes one of those
            # missing from the ladder, so that the replicas stay a permutation.
            present = {a.info[REPLICA_KEY] for a in walkers if REPLICA_KEY in a.info}
            missing = iter(sorted(set(range(len(ladder))) - present))
            for atoms in walkers:
                if REPLICA_KEY not in atoms.info:
                    atoms.info[REPLICA_KEY] = next(missing, len(ladder))
        self.base_K = np.asarray(base, dtype=float)
        for atoms in walkers:
            atoms.info[STEPS_KEY] = int(atoms.info.get(STEPS_KEY, 0))
        self.trust = settings["bias_trust_level"] if kind == "biased_md" else 0.0

    def temperatures_K(self) -> np.ndarray:
        """Each walker's temperature now: its rung times its schedule's factor."""
        factors = [
            schedule_factor(
                self.settings["temperature_schedule"],
                atoms.info[STEPS_KEY],
                self.settings["schedule_repeats"],
            )
            for atoms in self.walkers
        ]
        return self.base_K * np.asarray(factors)

    def before_step(self, dynamics) -> None:
        dynamics.kT = units.kB * self.temperatures_K()

    def after_step(self, dynamics, active: list[int]) -> None:
        """Count the active walkers' steps, and drop hills every ``hill_interval`` of
        a walker's own steps."""
        for i in active:
            self.walkers[i].info[STEPS_KEY] += 1
        if isinstance(self.bias, Metadynamics):
            for i in active:
                steps = self.walkers[i].info[STEPS_KEY]
                if steps % self.settings["hill_interval"] == 0:
                    self.bias.deposit(i, dynamics.kT[i], steps)

    def exchange_now(self, dynamics, active: list[int], step: int, sound) -> None:
        """Every ``exchange_interval`` steps of the task, one round of exchanges
        between the ``active`` walkers that are ``sound(i)`` (not blown up)."""
        if self.exchange is not None and step % self.exchange.interval == 0:
            self.exchange.attempt(dynamics, [i for i in active if sound(i)])

    def stop_reason(self, force_disagreement: float) -> str | None:
        """Why a biased walker stops here and is reset: past the upper trust level."""
        if self.trust and force_disagreement > self.trust:
            return (
                f"force disagreement {force_disagreement:.3g} eV/Å past the bias's trust "
                f"level ({self.trust:g})"
            )
        return None

    def frame_extras(self, i: int, dynamics) -> dict[str, Any]:
        """What walker ``i``'s recorded frame carries besides the predictions."""
        extras: dict[str, Any] = {"temperature_K": float(dynamics.kT[i] / units.kB)}
        if self.bias is not None:
            extras["bias_energy"] = float(dynamics.bias_energy[i])
        if isinstance(self.bias, Metadynamics):
            extras["collective_variables"] = np.asarray(self.bias.values[i], dtype=float)
        if self.exchange is not None:
            extras["replica"] = int(self.walkers[i].info[REPLICA_KEY])
        return extras

    def finish(self, output_paths: list[str]) -> dict[str, Any]:
        """Save the hills, record the exchanges; what the task's result adds."""
        result: dict[str, Any] = {}
        if isinstance(self.bias, Metadynamics):
            self.bias.save()
            result["hills"] = sum(len(h.heights) for h in self.bias.own)
        if isinstance(self.bias, UncertaintyBias):
            result["bias_strength"] = self.bias.state()["strength"]
        if self.exchange is not None:
            result["exchanges"] = self.exchange.record()
            path = exchanges_path(output_paths[0])
            partial = f"{path}.{os.getpid()}.tmp"
            with open(partial, "w") as handle:
                json.dump(result["exchanges"], handle)
            os.replace(partial, path)
        return result
