"""Check that the ranks of one oracle task start together and can talk to each other."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from typing import Any

from apps.common import where_and_when
from apps.oracle import mpi_prefix


def _mpi_ranks_check(
    ranks: int,
    mpi_command: str = "parsl",
    timeout_s: float = 120.0,
    parsl_resource_specification: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Launch :mod:`apps.mpi_hello` with the oracle's MPI prefix and return its report.

    Parameters
    ----------
    ranks
        Ranks wanted; on an MPIExecutor they come from the resource specification.
    mpi_command
        The site's launch prefix template (see :func:`apps.oracle.mpi_prefix`).

    Returns
    -------
    dict
        ``ranks``: one record per rank (rank, size, host, the rank it received a
        token from, the allreduce sum), the ``command`` run, and where and when.
    """
    t_start = time.time()
    prefix = mpi_prefix({"mpi_command": mpi_command, "mpi_ranks": ranks})
    command = [*shlex.split(prefix), sys.executable, "-m", "apps.mpi_hello"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ranks": report, "command": " ".join(command), **where_and_when(t_start)}
