"""Apps with a set extra cost, for benchmarks of how modules overlap.

``Delayed(_label_batch, 1.0)`` behaves as ``_label_batch`` after sleeping one second:
the real work and files stay, and the module's cost becomes known and adjustable
without loading the cores (a sleep costs no CPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


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
