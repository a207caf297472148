"""Small pieces every app shares: where it ran, importing objects by path, settings checks."""

from __future__ import annotations

import importlib
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from palflow.apps.errors import PluginError


def import_object(path: str) -> Any:
    """Import ``module:attribute`` (or ``module.attribute``, or ``path/to/file.py:name``)
    and return the attribute.

    Raises
    ------
    PluginError
        (an ``ImportError``) naming the path when the module, the file or the attribute
        does not exist, or the module or file fails to import (whatever it raised).
    """
    file_name, sep, attribute = path.rpartition(":")
    if sep and file_name.endswith(".py"):
        return _import_from_file(file_name, attribute, path)
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise PluginError(f"{path!r} is not of the form 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a module that fails on import, as a file does below
        raise PluginError(f"cannot import module {module_name!r} of {path!r}: {error}") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise PluginError(f"module {module_name!r} has no attribute {attribute!r}") from None


_FILE_IMPORT_LOCK = threading.RLock()
"""Held while a file named by path is loaded (re-entrant: a file may name another)."""


def _import_from_file(file_name: str, attribute: str, path: str) -> Any:
    """The attribute of a Python file, loaded once as module ``palflow_user.<stem>``."""
    import importlib.util
    import sys
    from pathlib import Path

    file = Path(file_name).resolve()
    if not file.is_file():
        raise PluginError(f"{path!r}: no file {file_name!r}")
    module_name = f"palflow_user.{file.stem}"
    # One loader at a time: on a thread-pool site two tasks may load the same file at
    # once, and the second must not find the first's module before it has run.
    with _FILE_IMPORT_LOCK:
        module = sys.modules.get(module_name)
        if module is None or getattr(module, "__file__", None) != str(file):
            spec = importlib.util.spec_from_file_location(module_name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as error:
                del sys.modules[module_name]
                raise PluginError(f"{path!r}: {file_name} fails to import: {error}") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise PluginError(f"{file_name} has no attribute {attribute!r}") from None


def require_settings(settings: Mapping[str, Any], keys: Iterable[str], section: str) -> None:
    """Check that a campaign section given to an app holds every key the app reads.

    Apps take the complete, validated section (``palflow.pipeline.config.settings``) and keep no
    defaults of their own, so that a campaign's value is the only value.

    Raises
    ------
    ValueError
        Naming every missing key.
    """
    missing = [key for key in keys if key not in settings]
    if missing:
        raise ValueError(
            f"the {section} settings lack {', '.join(missing)}: pass the campaign's whole "
            f"validated [{section}] section"
        )


def draw_velocities(atoms, temperature_K: float, rng) -> None:
    """Give ``atoms`` Maxwell-Boltzmann momenta at ``temperature_K`` (K)."""
    from ase.md import velocitydistribution

    # ASE 3.29 renamed MaxwellBoltzmannDistribution; accept both spellings.
    draw = getattr(velocitydistribution, "thermalize_momenta", None)
    if draw is None:
        draw = velocitydistribution.MaxwellBoltzmannDistribution
    draw(atoms, temperature_K=temperature_K, rng=rng)


def where_and_when(t_start: float) -> dict[str, Any]:
    """The record every app returns about itself: its own start and end times and host.

    Times are seconds since the epoch as measured by the worker, so ``events.jsonl``
    shows when the work itself ran, apart from queueing in Parsl.
    """
    return {
        "t_start": t_start,
        "t_end": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_partition": os.environ.get("SLURM_JOB_PARTITION"),
    }


def _ping(parsl_resource_specification: dict | None = None) -> dict[str, Any]:
    """A task that does nothing but say where it ran: for start-up and latency checks."""
    return where_and_when(time.time())
