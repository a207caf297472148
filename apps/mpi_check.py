"""Check that the ranks of one oracle task start together and can talk to each other."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from typing import Any

from palflow.apps.common import where_and_when
from palflow.apps.oracles.calculators import mpi_prefix

RING_PROGRAM = """
import json, os, socket
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
token = comm.sendrecv(rank, dest=(rank + 1) % size, source=(rank - 1) % size)
total = comm.allreduce(rank, op=MPI.SUM)
report = {"rank": rank, "size": size, "host": socket.gethostname(), "pid": os.getpid(),
          "token_from": token, "rank_sum": total}
reports = comm.gather(report, root=0)
if rank == 0:
    print(json.dumps(reports))
"""
"""What each rank runs (``python -c``): it passes a token around a ring and sums the
ranks with an allreduce, so the report shows the ranks talked, not only that they
started. A string, so that a rank needs only mpi4py, not palflow on its path."""


def _mpi_ranks_check(
    ranks: int,
    mpi_command: str = "parsl",
    timeout_s: float = 120.0,
    parsl_resource_specification: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Launch :data:`RING_PROGRAM` with the oracle's MPI prefix and return its report.

    Parameters
    ----------
    ranks
        Ranks wanted; on an MPIExecutor they come from the resource specification.
    mpi_command
        The site's launch prefix template (see :func:`palflow.apps.oracles.calculators.mpi_prefix`).
    timeout_s
        Longest the launch may take (s).

    Returns
    -------
    dict
        ``ranks``: one record per rank (rank, size, host, the rank it received a
        token from, the allreduce sum), the ``command`` run, and where and when.
    """
    t_start = time.time()
    prefix = mpi_prefix({"mpi_command": mpi_command, "mpi_ranks": ranks})
    launch = [*shlex.split(prefix), sys.executable, "-c"]
    shown = " ".join([*launch, "RING_PROGRAM"])
    done = subprocess.run(
        [*launch, RING_PROGRAM], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{shown} failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ranks": report, "command": shown, **where_and_when(t_start)}
