"""Shared fixtures, and the rule that a requested program must not be skipped.

A test that needs a missing program (xTB, Slurm, MPI, a GPU, Chromium, tmux) skips
with the reason, unless PALFLOW_REQUIRE names that marker (comma-separated, or
``all``): then the skip becomes a failure. CI (``.ci/run``) names every program it
installs, so nothing it should exercise is silently skipped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Parsl's HTEX starts interchange.py and process_worker_pool.py from PATH: the venv's
# scripts must be found even when the venv is not activated.
os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))


def required(marker: str) -> bool:
    wanted = {w.strip() for w in os.environ.get("PALFLOW_REQUIRE", "").split(",") if w.strip()}
    return "all" in wanted or marker in wanted


def need(marker: str, available: bool, reason: str) -> None:
    """Skip, or fail when the environment requires ``marker``."""
    if available:
        return
    if required(marker):
        pytest.fail(f"{reason}, but PALFLOW_REQUIRE asks for {marker!r} tests")
    pytest.skip(reason)


@pytest.fixture
def require_xtb():
    try:
        import xtb.ase.calculator  # noqa: F401
    except ImportError as error:
        need("xtb", False, f"xtb-python is not importable: {error}")


def slurm_is_up() -> bool:
    import shutil
    import subprocess

    if shutil.which("sinfo") is None:
        return False
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False)
    return done.returncode == 0 and any(
        state in done.stdout for state in ("idle", "mixed", "allocated")
    )


@pytest.fixture
def slurm_cluster():
    """A running Slurm with idle nodes (.ci/slurm/start.sh starts one)."""
    need("slurm", slurm_is_up(), "no running Slurm cluster (start one: .ci/slurm/start.sh)")


def require_program(marker: str, *candidates: str) -> str:
    """The path of the first of ``candidates`` (a path, or a name on PATH) that exists;
    skip, or fail when PALFLOW_REQUIRE names ``marker``, when none does."""
    import shutil

    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    need(marker, False, f"{candidates[-1]} is not installed (.ci/setup.sh --system installs it)")
    raise AssertionError("unreachable")  # need() skipped or failed


@pytest.fixture
def require_chromium() -> str:
    """Debian's Chromium, for the report as a browser shows it: its path."""
    return require_program("chromium", "/usr/bin/chromium", "chromium")


@pytest.fixture
def require_tmux() -> str:
    """tmux, for the live view in a terminal: its path."""
    return require_program("tmux", "tmux")


@pytest.fixture
def ensemble_path(tmp_path):
    """A small untrained SchNet committee (3 members, version 2) saved as a checkpoint:
    what a generator task loads (a test module may define its own)."""
    import torch

    from palflow.apps.models.core import save_checkpoint
    from palflow.apps.models.schnet.network import ModelSpec, SchNetEnsemble

    torch.manual_seed(0)
    model = SchNetEnsemble(ModelSpec(cutoff=4.0, n_features=16, n_interactions=2, n_rbf=8), 3)
    path = tmp_path / "ensemble.pt"
    save_checkpoint(path, model, {"version": 2})
    return str(path)
