"""The contracts between palflow's pieces (apps/contracts.py) hold where they are used."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from dataclasses import fields

import pytest

from palflow import apps
from palflow.apps.contracts import MODULE_OF_KIND, MODULES, REQUESTS, FailureKind, failure_counts

# Arguments an app takes besides its request: where to run, set by the executor.
PLACEMENT = {"device", "parsl_resource_specification"}


@pytest.mark.parametrize("request_type", REQUESTS, ids=lambda r: r.__name__)
def test_each_request_is_exactly_its_apps_arguments(request_type):
    module, function, label = apps.APPS[request_type.app]
    parameters = inspect.signature(getattr(importlib.import_module(module), function)).parameters
    names = {f.name for f in fields(request_type)}
    required = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty}
    assert names <= set(parameters), f"{request_type.__name__} names arguments the app lacks"
    assert required <= names, f"{request_type.__name__} misses required arguments"
    assert set(parameters) - names <= PLACEMENT
    assert label in MODULES


def test_every_task_kind_runs_on_a_module():
    assert set(MODULE_OF_KIND.values()) == set(MODULES)
    assert {apps.APPS[r.app][2] for r in REQUESTS} == set(MODULES)


def test_failure_kinds_parse_and_know_what_is_transient():
    assert FailureKind.of("timeout: no result after 5 s") is FailureKind.TIMEOUT
    assert FailureKind.of("absurd-force: 1e9 eV/Å") is FailureKind.ABSURD_FORCE
    assert FailureKind.of("something odd") is FailureKind.ERROR
    transient = {kind.value for kind in FailureKind if kind.transient}
    assert transient == {"error", "timeout", "crash", "task-lost"}
    reason = FailureKind.SCF.reason("x" * 1000)
    assert reason.startswith("scf: ") and len(reason) == 500
    assert failure_counts(["scf: a", "scf: b", "crash: c"]) == {"scf": 2, "crash": 1}


def test_the_contracts_load_neither_torch_nor_parsl():
    code = (
        "import sys, palflow.apps.contracts, palflow.pipeline.state.rundir; "
        "print(sorted(m for m in ('torch', 'parsl') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_file_named_by_path_loads_whole_for_tasks_that_ask_at_once(tmp_path):
    """Thread-pool sites run tasks side by side: a second task must not find the
    first one's half-run module (``has no attribute``)."""
    from concurrent.futures import ThreadPoolExecutor

    from palflow.apps.common import import_object

    plugin = tmp_path / "slow_plugin.py"
    plugin.write_text("import time\n\ntime.sleep(0.3)\n\n\ndef generate():\n    return 1\n")
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda _: import_object(f"{plugin}:generate"), range(4)))
    assert all(function is found[0] for function in found)
    assert found[0]() == 1
