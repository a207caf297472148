"""Temperatures that change: ramps and schedules per walker, and replica exchange.

- :func:`schedule_factor`: ``generator.temperature_schedule``, the factor a walker's
  temperature is multiplied by at its own MD step (its phase, kept in the walker's
  frame as ``info["palflow_md_steps"]`` so that it survives from task to task and
  through a resume, and restarts when the walker is reset);
- :class:`ReplicaExchange`: parallel tempering (``generator.kind =
  "replica_exchange"``) over a ladder of walkers that one task advances together.
  Neighbours on the ladder swap configurations with the Metropolis probability
  ``min(1, exp((1/kT_i - 1/kT_j)(U_i - U_j)))``, all energies ``U`` from one
  ensemble version (the members' mean; ``U + P V`` at constant pressure). A
  configuration carries its replica number (``info["palflow_replica"]``) from rung to
  rung, so that its place on the ladder survives a resume too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STEPS_KEY = "palflow_md_steps"
"""A walker frame's ``info`` key: the MD steps it has made since its start or reset."""
REPLICA_KEY = "palflow_replica"
"""A walker frame's ``info`` key: which replica of its ladder the configuration is."""


def schedule_factor(schedule: list[list[float]], step: int, repeats: bool = False) -> float:
    """The temperature factor of ``schedule`` (``[[step, factor], ...]``, steps rising
    from 0) at ``step``: linear between points, held after the last one or, with
    ``repeats``, started again; 1 for an empty schedule."""
    if not schedule:
        return 1.0
    steps = [p[0] for p in schedule]
    factors = [p[1] for p in schedule]
    if repeats and steps[-1] > 0:
        step = step % steps[-1]
    return float(np.interp(step, steps, factors))


class ReplicaExchange:
    """Exchange attempts on one ladder, and their counts.

    Parameters
    ----------
    ladder_K
        The ladder's temperatures, rising; walker ``i`` of the task runs at the
        ``i``-th.
    interval
        MD steps between attempts; even and odd neighbour pairs take turns.
    rng
        Random numbers for the Metropolis test.
    """

    def __init__(self, ladder_K: list[float], interval: int, rng: np.random.Generator):
        self.ladder = list(ladder_K)
        self.interval = interval
        self.rng = rng
        self.attempted = np.zeros(len(ladder_K) - 1, dtype=np.int64)
        self.accepted = np.zeros(len(ladder_K) - 1, dtype=np.int64)
        self.rounds = 0

    def attempt(self, dynamics, active: list[int]) -> None:
        """One round of exchanges between neighbours of ``dynamics``' walkers that are
        both still ``active`` (even pairs on even rounds, odd ones on odd rounds)."""
        for i in range(self.rounds % 2, len(self.ladder) - 1, 2):
            j = i + 1
            if i not in active or j not in active:
                continue
            self.attempted[i] += 1
            energy_i, energy_j = self.enthalpy(dynamics, i), self.enthalpy(dynamics, j)
            exponent = (1 / dynamics.kT[i] - 1 / dynamics.kT[j]) * (energy_i - energy_j)
            if exponent >= 0 or self.rng.random() < np.exp(exponent):
                self.accepted[i] += 1
                dynamics.swap(i, j)
        self.rounds += 1

    @staticmethod
    def enthalpy(dynamics, i: int) -> float:
        """Walker ``i``'s potential energy (the members' mean, eV), plus ``P V`` at
        constant pressure."""
        energy = float(np.mean(dynamics.results[i].member_energies))
        if dynamics.constant_pressure:
            energy += dynamics.pressure * dynamics.walkers[i].get_volume()
        return energy

    def record(self) -> dict[str, Any]:
        """The ladder and, per neighbour pair, the attempts and acceptances."""
        return {
            "ladder_K": self.ladder,
            "attempted": self.attempted.tolist(),
            "accepted": self.accepted.tolist(),
        }
