"""Parsl apps of palflow, one per kind of task, each bound to its executor label.

Each app is a plain function with a leading underscore in its own module, wrapped
here on first use (``apps.label_batch``), so that importing a light module of this
package (:mod:`palflow.apps.contracts`, :mod:`palflow.apps.data.dataset`) loads neither Parsl nor torch.
Tests and the serial baseline call the plain functions; campaigns call these
wrappers, which return Parsl futures. The executor label is the only link between
an app and a site config; the keyword arguments of each app are its request in
:mod:`palflow.apps.contracts`.
"""

from importlib import import_module
from typing import Any

APPS = {
    # name: (module, plain function, executor label)
    "label_batch": ("palflow.apps.oracle", "_label_batch", "oracle"),
    "oracle_md": ("palflow.apps.oracle", "_oracle_md", "oracle"),
    "generate": ("palflow.apps.generator", "_generate", "generator"),
    "train_member": ("palflow.apps.training", "_train_member", "train"),
    "score_candidates": ("palflow.apps.inference", "_score_candidates", "infer"),
    "evaluate_test": ("palflow.apps.inference", "_evaluate_test", "infer"),
    "mpi_ranks_check": ("palflow.apps.mpi_check", "_mpi_ranks_check", "oracle"),
}

__all__ = sorted(APPS)


def __getattr__(name: str) -> Any:
    """Wrap an app as a Parsl ``python_app`` on its executor, once."""
    if name not in APPS:
        raise AttributeError(f"module 'apps' has no attribute {name!r}")
    from parsl import python_app

    module, function, label = APPS[name]
    app = python_app(getattr(import_module(module), function), executors=[label])
    globals()[name] = app
    return app
