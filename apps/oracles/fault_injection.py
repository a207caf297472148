"""An ASE calculator that wraps a real one and fails on purpose, for testing a set-up.

    [oracle]
    calculator = "palflow.apps.oracles.fault_injection:FaultyCalculator"
    kwargs = { calculator = "ase.calculators.emt:EMT", rate = 0.25,
               kinds = ["exception", "hang", "nan", "absurd", "crash", "scf"] }

With probability ``rate`` a calculation meets one of ``kinds``:

* ``exception``: raises an error (transient: a retry draws again);
* ``hang``: sleeps ``hang_s`` seconds (the oracle's timeout must catch it);
* ``crash``: kills its own process, as a segfault would;
* ``nan``: returns NaN forces; ``absurd``: forces of 1e4 eV/Å;
* ``scf``: raises ASE's ``SCFError``, as an SCF that does not converge.

``nan``, ``absurd`` and ``scf`` depend on the structure only, as they would in a
real code: the same structure fails the same way every time. The others are drawn
afresh on every call.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
from ase.calculators.calculator import Calculator, SCFError, all_changes

from palflow.apps.common import import_object
from palflow.apps.contracts import FailureKind

RECORDED_AS = {
    "exception": FailureKind.ERROR,
    "hang": FailureKind.TIMEOUT,
    "crash": FailureKind.CRASH,
    "nan": FailureKind.NON_FINITE,
    "absurd": FailureKind.ABSURD_FORCE,
    "scf": FailureKind.SCF,
}
"""Each injected fault, and the failure the oracle records it as."""

# A fault whose failure is worth a retry is drawn afresh on each call; the others
# belong to the structure, as they would in a real code.
TRANSIENT = tuple(fault for fault, failure in RECORDED_AS.items() if failure.transient)
STRUCTURAL = tuple(fault for fault, failure in RECORDED_AS.items() if not failure.transient)


class FaultyCalculator(Calculator):
    """Wraps a real calculator and injects faults at a set rate.

    Parameters
    ----------
    calculator
        Import path ``module:Class`` of the calculator that does the work.
    kwargs
        Keyword arguments for it.
    rate
        How often a calculation meets a fault, from 0 to 1.
    kinds
        The faults to inject, keys of :data:`RECORDED_AS`.
    hang_s
        How long a ``hang`` sleeps (s): longer than the oracle's ``timeout_s``.
    seed
        Changes which structures meet the structural faults.
    """

    implemented_properties = ["energy", "forces"]

    def __init__(
        self,
        calculator: str = "ase.calculators.emt:EMT",
        kwargs: dict | None = None,
        rate: float = 0.2,
        kinds: tuple[str, ...] | list[str] = TRANSIENT + STRUCTURAL,
        hang_s: float = 3600.0,
        seed: int = 0,
        **calculator_kwargs,
    ) -> None:
        super().__init__(**calculator_kwargs)
        unknown = set(kinds) - set(TRANSIENT + STRUCTURAL)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        self.inner = import_object(calculator)(**(kwargs or {}))
        self.rate, self.kinds, self.hang_s, self.seed = rate, list(kinds), hang_s, seed
        self._calls = 0

    def _draw(self, key: bytes) -> tuple[float, str]:
        digest = hashlib.sha256(key).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return float(rng.random()), str(rng.choice(self.kinds))

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        structure = np.round(self.atoms.positions, 6).tobytes() + self.seed.to_bytes(4, "little")
        self._calls += 1
        call = structure + os.getpid().to_bytes(8, "little") + self._calls.to_bytes(8, "little")
        # Structural faults belong to the structure; transient ones to this call.
        for key, pool in (
            (structure, STRUCTURAL),
            (call + time.time_ns().to_bytes(8, "little"), TRANSIENT),
        ):
            draw, kind = self._draw(key)
            if kind in pool and draw < self.rate:
                self._fail(kind)
        atoms = self.atoms.copy()
        atoms.calc = self.inner
        self.results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces().copy()}
        drawn, kind = self._draw(structure)
        if kind == "nan" and drawn < self.rate:
            self.results["forces"][0, 0] = np.nan
        elif kind == "absurd" and drawn < self.rate:
            self.results["forces"][0, 0] = 1e4

    def _fail(self, kind: str) -> None:
        if kind == "exception":
            raise RuntimeError("injected fault: the calculation raised")
        if kind == "hang":
            time.sleep(self.hang_s)
        if kind == "crash":
            os._exit(77)
        if kind == "scf":
            raise SCFError("injected fault: SCF did not converge")
