"""Run an oracle's calculations in a child process that can be timed out and killed.

A calculation that hangs, or takes its process down (a segfault in a Fortran
library, an MPI abort), must cost one structure, not the worker or the batch. The
structures of a batch are labelled one after another in a forked child; the parent
waits at most ``timeout_s`` for each. A child that overruns is killed and the
structure recorded as ``timeout``; a child that dies is recorded as ``crash``;
either way a fresh child carries on with the next structure.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any

from ase import Atoms

from palflow.apps.contracts import FailureKind

logger = logging.getLogger(__name__)

Outcome = tuple[str, Any, float]
"""(status, labelled structure or None, seconds)."""


def _child(connection, structures: Sequence[Atoms], start: int, label_one: Callable) -> None:
    for index in range(start, len(structures)):
        t0 = time.perf_counter()
        status, labelled = label_one(structures[index])
        connection.send((index, status, labelled, time.perf_counter() - t0))
    close_labeller(label_one)
    connection.close()


def close_labeller(label_one: Callable) -> None:
    """Close what ``label_one`` holds open (a calculator's shell process), if it can."""
    close = getattr(label_one, "close", None)
    if close is not None:
        try:
            close()
        except Exception as error:  # closing must not cost the labels
            logger.warning("closing the oracle's calculator failed: %s", error)


def label_isolated(
    structures: Sequence[Atoms],
    label_one: Callable[[Atoms], tuple[str, Atoms | None]],
    timeout_s: float | None,
) -> list[Outcome]:
    """Label ``structures`` with ``label_one`` in forked children, in order.

    Parameters
    ----------
    label_one
        Labels one structure in the child; returns ``(status, labelled)``, with
        status ``"ok"`` or a recorded failure. It must not raise.
    timeout_s
        Longest wait for one structure, s; None waits for ever.
    """
    context = multiprocessing.get_context("fork")
    outcomes: list[Outcome] = []
    while len(outcomes) < len(structures):
        start = len(outcomes)
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(
            target=_child, args=(sender, structures, start, label_one), daemon=True
        )
        child.start()
        sender.close()
        while len(outcomes) < len(structures):
            t0 = time.perf_counter()
            if not receiver.poll(timeout_s):
                child.kill()
                child.join()
                outcomes.append(
                    (
                        FailureKind.TIMEOUT.reason(f"no result after {timeout_s:g} s"),
                        None,
                        time.perf_counter() - t0,
                    )
                )
                break
            try:
                _, status, labelled, seconds = receiver.recv()
            except EOFError:
                child.join()
                outcomes.append(
                    (
                        FailureKind.CRASH.reason(
                            f"the calculation's process died (exit code {child.exitcode})"
                        ),
                        None,
                        time.perf_counter() - t0,
                    )
                )
                break
            outcomes.append((status, labelled, seconds))
        receiver.close()
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
    return outcomes
