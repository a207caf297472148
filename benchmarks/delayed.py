"""Apps with a set extra cost, for benchmarks of how modules overlap.

``Delayed(_label_batch, 1.0)`` behaves as ``_label_batch`` after sleeping one second:
the real work and files stay, and the module's cost becomes known and adjustable
without loading the cores (a sleep costs no CPU). :class:`RemoteSlot` does the same
for one oracle call, as a calculator a campaign can name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ase.calculators.calculator import Calculator, all_changes


class Delayed:
    """``function``, called after ``seconds`` of sleep."""

    def __init__(self, function: Callable[..., Any], seconds: float) -> None:
        self.function = function
        self.seconds = seconds
        self.__name__ = f"delayed{function.__name__}"  # Parsl names apps by it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.seconds)
        result = self.function(*args, **kwargs)
        if isinstance(result, dict) and "t_start" in result:
            result["t_start"] -= self.seconds  # the task's own record covers the sleep
        return result


class RemoteSlot(Calculator):
    """An ASE calculator standing for an oracle on a remote node: the real
    ``calculator`` labels each structure, and the call then sleeps until ``seconds``
    have passed since it began.

    The label is real (energies, forces and, where the calculator gives them,
    stresses); its cost is wall time spent waiting, not computing, as for a DFT job
    on another node, so the local cores stay free for MD and training. A campaign
    names it as ``oracle.calculator = "delayed:RemoteSlot"`` with ``kwargs =
    {calculator = "ase.calculators.emt:EMT", seconds = 2.0}``, this folder on
    ``PYTHONPATH``.
    """

    def __init__(self, calculator: str, seconds: float, kwargs: dict | None = None) -> None:
        from palflow.apps.common import import_object

        self.inner = import_object(calculator)(**(kwargs or {}))
        self.implemented_properties = list(self.inner.implemented_properties)
        self.seconds = seconds
        super().__init__()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        started = time.perf_counter()
        super().calculate(atoms, properties, system_changes)
        self.inner.calculate(self.atoms, properties, system_changes)
        self.results = dict(self.inner.results)
        time.sleep(max(0.0, self.seconds - (time.perf_counter() - started)))
