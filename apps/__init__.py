"""Parsl apps of palflow, one per kind of task, each bound to its executor label.

Each app is a plain function with a leading underscore in its own module, wrapped
here on first use (``apps.label_batch``), so that importing a light module of this
package (:mod:`palflow.apps.contracts`, :mod:`palflow.apps.data.dataset`) loads
neither Parsl nor torch. Tests and the serial baseline call the plain functions;
campaigns call these wrappers, which return Parsl futures. The executor label is the
only link between an app and a site config; the keyword arguments of each app are
its request in :mod:`palflow.apps.contracts`.

:data:`APPS` is the one table of the apps: the Parsl wrappers here and the
coordinator's :class:`~palflow.pipeline.engine.coordinator.Apps` are built from it.
"""

from collections.abc import Callable
from importlib import import_module
from typing import Any, NamedTuple


class App(NamedTuple):
    """Where an app's plain function lives, and the executor that runs it."""

    module: str
    function: str
    executor: str


APPS = {
    "label_batch": App("palflow.apps.oracle", "_label_batch", "oracle"),
    "oracle_md": App("palflow.apps.oracle", "_oracle_md", "oracle"),
    "generate": App("palflow.apps.generator", "_generate", "generator"),
    "train_member": App("palflow.apps.training", "_train_member", "train"),
    "score_candidates": App("palflow.apps.inference", "_score_candidates", "infer"),
    "evaluate_test": App("palflow.apps.inference", "_evaluate_test", "infer"),
    "mpi_ranks_check": App("palflow.apps.mpi_check", "_mpi_ranks_check", "oracle"),
    "validate_md": App("palflow.apps.validate", "_validate_md", "generator"),
}

__all__ = sorted(APPS)


def plain(name: str) -> Callable[..., Any]:
    """The plain function of the app ``name`` (imports its module, not Parsl)."""
    app = APPS[name]
    return getattr(import_module(app.module), app.function)


def __getattr__(name: str) -> Any:
    """Wrap an app as a Parsl ``python_app`` on its executor, once."""
    if name not in APPS:
        raise AttributeError(f"module 'palflow.apps' has no attribute {name!r}")
    from parsl import python_app

    app = python_app(plain(name), executors=[APPS[name].executor])
    globals()[name] = app
    return app
