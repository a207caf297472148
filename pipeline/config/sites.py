"""Load a site config: validate its attributes against one schema, check its labels.

A site is a plain Python module; :class:`SiteSchema` is all palflow reads from it:
``config`` (a ``parsl.config.Config``) or ``fresh_config()`` returning a new one
(preferred when both exist: a Config loads only once); ``slots``, positive ints of
tasks in flight per label of :data:`palflow.apps.contracts.MODULES`; ``mpi_command``,
``"parsl"`` or a launcher template with ``{ranks}``, ``{nodes}``, ``{hosts}`` (see
:func:`palflow.apps.oracles.calculators.mpi_prefix`); ``MONITORING``, a bool that
requires the config to carry a MonitoringHub (shipped sites set it from
``PALFLOW_MONITORING=1``); and ``worker_start_timeout_s``, the longest wait for an
executor's first worker.

Names starting with ``_``, UPPER_CASE constants, imports, functions and classes are
the file's own. Any other public name, or one resembling a schema name (``slot``,
``Slots``, ``mpi_comand``, ``MONITORNIG``), is an error naming it and the known ones.
The config must define exactly one executor per module label.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import logging
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from palflow.apps.common import _ping
from palflow.apps.contracts import MODULES
from palflow.apps.errors import InputError  # noqa: F401 (SiteError's base, for callers)
from palflow.pipeline.config.quick import (  # noqa: F401 (here for callers)
    SITE_DIR,
    SiteError,
    refuse_placeholders,
    resolve_site_path,
    shipped_sites,
)

logger = logging.getLogger(__name__)

DEFAULT_SLOTS = {"oracle": 2, "generator": 2, "train": 2, "infer": 1}
# A name of the file's own this similar to a schema name (difflib ratio, case ignored)
# is a misspelling: catches MONITORNIG (0.90), spares MONITORING_DB (0.87).
_MISSPELT = 0.88


class SiteSchema(BaseModel):
    """The attributes of a site module that palflow reads; any other is refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    config: Any = None
    """The ``parsl.config.Config``."""
    fresh_config: Callable[[], Any] | None = None
    """Builds a new ``parsl.config.Config`` on each call."""
    slots: dict[Literal[MODULES], PositiveInt] = Field(default_factory=dict)
    """Tasks the coordinator keeps in flight per module."""
    mpi_command: str = "parsl"
    """Launch prefix template of MPI oracles; see
    :func:`palflow.apps.oracles.calculators.mpi_prefix`."""
    MONITORING: bool = False
    """Parsl's MonitoringHub is on (the config then carries it)."""
    worker_start_timeout_s: float | int | None = Field(None, gt=0)
    """Longest wait (s) for an executor's first worker while its tasks wait; then the
    campaign stops as failed, naming the pilot jobs and why they wait. None waits as
    long as the queue takes."""

    @field_validator("config")
    @classmethod
    def _is_parsl_config(cls, value: Any) -> Any:
        from parsl.config import Config

        if value is not None and not isinstance(value, Config):
            raise ValueError(f"should be a parsl Config, not {type(value).__name__}")
        return value

    @field_validator("mpi_command")
    @classmethod
    def _is_launch_template(cls, value: str) -> str:
        allowed = "allowed: {ranks}, {nodes}, {hosts}"
        if not value.strip():
            raise ValueError(f'is empty: give "parsl" or a launcher template; {allowed}')
        try:
            value.format(ranks=1, nodes=1, hosts="localhost")
        except KeyError as error:
            raise ValueError(f"has unknown placeholder {{{error.args[0]}}}; {allowed}") from None
        except (ValueError, IndexError, AttributeError) as error:
            raise ValueError(f"is not a launcher template: {error}; {allowed}") from None
        return value


SCHEMA_NAMES = tuple(SiteSchema.model_fields)
_LOWERED = {name.lower(): name for name in SCHEMA_NAMES}


@dataclass
class Site:
    path: Path
    config: object
    """The ``parsl.config.Config``."""
    slots: dict[str, int]
    mpi_command: str = "parsl"
    """Launch prefix template of MPI oracles where Parsl composes none; see
    :func:`palflow.apps.oracles.calculators.mpi_prefix`."""
    oracle_mpi: bool = False
    """The oracle executor runs in Parsl's MPI mode: every oracle task needs a resource
    specification, and Parsl composes its launch prefix."""
    monitoring: bool = False
    """The site's ``MONITORING`` switch: Parsl's MonitoringHub records the run."""
    worker_start_timeout_s: float | None = None
    """See :attr:`SiteSchema.worker_start_timeout_s`."""

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

    futures = [
        python_app(_ping, executors=[module])()
        for module, count in slots.items()
        for _ in range(3 * count)
    ]
    for future in futures:
        future.result()


def site_attributes(module: types.ModuleType, path: Path) -> dict[str, Any]:
    """The names of ``module`` that are the site's, for :class:`SiteSchema` to judge."""
    imported = {
        (alias.asname or alias.name).split(".")[0]
        for node in ast.walk(ast.parse(path.read_bytes(), str(path)))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    attributes = {}
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        # A schema name counts even when imported (a ready-made Parsl ``config``).
        own = name in imported or name.isupper() or callable(value)
        misspelt = difflib.get_close_matches(name.lower(), list(_LOWERED), 1, _MISSPELT)
        if name in SCHEMA_NAMES or not own or (misspelt and name not in imported):
            attributes[name] = value
    return attributes


def _problems(error: ValidationError) -> list[str]:
    """One short phrase per schema violation."""
    problems = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"] if part != "[key]")
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(name.lower(), list(_LOWERED), n=1, cutoff=0.6)
            hint = f" (did you mean {_LOWERED[close[0]]!r}?)" if close else ""
            problems.append(f"unknown site attribute {name!r}{hint}")
        else:
            message = item["msg"].removeprefix("Value error, ").replace("Input should", "should", 1)
            problems.append(f"{name!r} {message} (got {repr(item.get('input'))[:80]})")
    return problems


def validate_site(module: types.ModuleType, path: Path) -> SiteSchema:
    """Read a site module's attributes through :class:`SiteSchema`; a
    :class:`SiteError` names, on one line, every unknown attribute and wrong value."""
    attributes = site_attributes(module, path)
    problems = []
    if "config" not in attributes and "fresh_config" not in attributes:
        problems.append("defines neither 'config' nor 'fresh_config()'")
    try:
        schema = SiteSchema.model_validate(attributes)
    except ValidationError as error:
        problems += _problems(error)
    if not problems:
        return schema
    known = "config or fresh_config(), slots, mpi_command, MONITORING, worker_start_timeout_s"
    if any(problem.startswith("unknown") for problem in problems):
        problems.append(f"a site sets {known}; name values of its own _private or UPPER_CASE")
    raise SiteError(f"{path}: " + "; ".join(problems))


def _run_site_code(path: Path, doing: str, code: Callable[[], Any]) -> Any:
    """Run a site's own code (its import, its ``fresh_config()``); any failure is a
    :class:`SiteError` saying what was being done, never a traceback."""
    from parsl.errors import ConfigurationError

    try:
        return code()
    except ConfigurationError as error:
        raise SiteError(f"{path}: the Parsl config is invalid: {error}") from None
    except (Exception, SystemExit) as error:  # a site's sys.exit() is no exit of palflow's
        raise SiteError(f"{path}: {doing}: {type(error).__name__}: {error}") from None


def load_site(name: str, allow_placeholders: bool = False) -> Site:
    """Import a site file and check its attributes and executors, before anything is
    submitted.

    A placeholder left unedited (``"YOUR_ACCOUNT"`` in a copy of ``hpc.py``) is
    refused first, unless ``allow_placeholders`` (``palflow check`` lists them
    itself, with its other findings).

    Raises
    ------
    SiteError
        Naming the file and, where it applies, the attribute or label at fault.
    """
    from parsl.config import Config

    path = resolve_site_path(name)
    if not allow_placeholders:
        refuse_placeholders(path, name)
    spec = importlib.util.spec_from_file_location(f"palflow_site_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    _run_site_code(path, "the site file does not import", lambda: spec.loader.exec_module(module))
    schema = validate_site(module, path)
    config = schema.config
    if schema.fresh_config is not None:
        config = _run_site_code(path, "fresh_config() raised", schema.fresh_config)
        if not isinstance(config, Config):
            got = type(config).__name__
            raise SiteError(f"{path}: fresh_config() should return a parsl Config, not {got}")
    labels = [executor.label for executor in config.executors]
    for label in MODULES:
        if labels.count(label) == 0:
            raise SiteError(f"{path}: no executor labelled {label!r} (needs all of {MODULES})")
        if labels.count(label) > 1:
            raise SiteError(f"{path}: executor label {label!r} appears {labels.count(label)} times")
    if schema.MONITORING and config.monitoring is None:
        raise SiteError(
            f"{path}: MONITORING is True but the Config has no monitoring hub; give it "
            "monitoring=MonitoringHub(workflow_name='palflow') if MONITORING else None"
        )
    if os.environ.get("PALFLOW_MONITORING") == "1" and config.monitoring is None:
        logger.warning("PALFLOW_MONITORING=1, but %s sets no monitoring hub", path)
    oracle = next(e for e in config.executors if e.label == "oracle")
    return Site(
        path=path,
        config=config,
        slots={**DEFAULT_SLOTS, **schema.slots},
        mpi_command=schema.mpi_command,
        oracle_mpi=bool(getattr(oracle, "enable_mpi_mode", False)),
        monitoring=schema.MONITORING,
        worker_start_timeout_s=schema.worker_start_timeout_s,
    )
