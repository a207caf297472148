"""Load a site config and check it against the one contract apps rely on.

A site is a plain Python module exposing a ``parsl.config.Config`` as ``config``
(or a ``fresh_config()`` function returning one), and optionally ``slots`` (the
tasks the coordinator keeps in flight per module) and ``mpi_command`` (how MPI
oracles launch where Parsl composes no prefix). It must define exactly one
executor per label in :data:`pipeline.coordinator.MODULES`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.coordinator import MODULES

logger = logging.getLogger(__name__)

SITE_DIR = Path(__file__).resolve().parent.parent / "site_configs"
DEFAULT_SLOTS = {"oracle": 2, "generator": 2, "train": 2, "infer": 1}


class SiteError(ValueError):
    """A site config is missing, broken, or breaks the executor-label contract."""


@dataclass
class Site:
    path: Path
    config: object
    """The ``parsl.config.Config``."""
    slots: dict[str, int]
    mpi_command: str = "parsl"
    """Launch prefix template of MPI oracles where Parsl composes none; see
    :func:`apps.oracle.mpi_prefix`."""
    oracle_mpi: bool = False
    """The oracle executor runs in Parsl's MPI mode: every oracle task needs a resource
    specification, and Parsl composes its launch prefix."""

    def oracle_resources(self, ranks: int, nodes: int) -> dict[str, int] | None:
        """The resource specification oracle tasks carry on this site, if any."""
        if not self.oracle_mpi:
            return None
        return {"num_ranks": ranks, "num_nodes": nodes, "ranks_per_node": -(-ranks // nodes)}

    def coordinator_options(self, campaign) -> dict[str, Any]:
        """What a coordinator of ``campaign`` needs to know about this site."""
        return {
            "oracle_resources": self.oracle_resources(
                campaign.oracle.mpi_ranks, campaign.oracle.mpi_nodes
            ),
            "mpi_command": self.mpi_command,
        }


def warm_up(slots: dict[str, int]) -> None:
    """Give every worker of the loaded executors a first task (three per slot), so that
    its imports (torch) happen now rather than inside a timed run."""
    from parsl import python_app

    from apps.common import _ping

    futures = [
        python_app(_ping, executors=[module])()
        for module, count in slots.items()
        for _ in range(3 * count)
    ]
    for future in futures:
        future.result()


def resolve_site_path(name: str) -> Path:
    """A path as given, else a file of ``site_configs/`` (``laptop`` or ``laptop.py``)."""
    given = Path(name)
    if given.is_file():
        return given.resolve()
    bundled = SITE_DIR / (name if name.endswith(".py") else f"{name}.py")
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(p.name for p in SITE_DIR.glob("*.py")))
    raise SiteError(f"site {name!r} not found: give a file path or one of: {known}")


def load_site(name: str) -> Site:
    """Import a site file and check its executors, before anything is submitted.

    Raises
    ------
    SiteError
        Naming the file and, where it applies, the label at fault.
    """
    from parsl.config import Config
    from parsl.errors import ConfigurationError

    path = resolve_site_path(name)
    spec = importlib.util.spec_from_file_location(f"palflow_site_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigurationError as error:
        raise SiteError(f"{path}: the Parsl config is invalid: {error}") from None
    except Exception as error:
        raise SiteError(
            f"{path}: the site file does not import: {type(error).__name__}: {error}"
        ) from None
    if hasattr(module, "fresh_config"):
        config = module.fresh_config()
    elif hasattr(module, "config"):
        config = module.config
    else:
        raise SiteError(f"{path}: defines neither 'config' nor 'fresh_config()'")
    if not isinstance(config, Config):
        raise SiteError(f"{path}: 'config' is a {type(config).__name__}, not a parsl Config")
    labels = [executor.label for executor in config.executors]
    for label in MODULES:
        if labels.count(label) == 0:
            raise SiteError(f"{path}: no executor labelled {label!r} (needs all of {MODULES})")
        if labels.count(label) > 1:
            raise SiteError(f"{path}: executor label {label!r} appears {labels.count(label)} times")
    slots = dict(DEFAULT_SLOTS)
    given = getattr(module, "slots", {})
    unknown = set(given) - set(MODULES)
    if unknown:
        raise SiteError(f"{path}: 'slots' names unknown modules {sorted(unknown)}")
    slots.update(given)
    oracle = next(e for e in config.executors if e.label == "oracle")
    return Site(
        path=path,
        config=config,
        slots=slots,
        oracle_mpi=bool(getattr(oracle, "enable_mpi_mode", False)),
    )
