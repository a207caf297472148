"""One machine: a High-Throughput Executor per module, workers on this host.

HTEX rather than thread pools: training, MD and the oracle run in separate worker
processes, so they overlap without contending for the Python GIL, a crashing
calculator cannot take the coordinator down, and tasks travel exactly as they will
on a cluster. The interchanges listen on loopback only and encrypt their traffic.
"""

import os

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.monitoring.monitoring import MonitoringHub
from parsl.providers import LocalProvider

from palflow.apps.contracts import MODULES  # the executor labels

# Worker processes per module. Two cores are shared by all of them: training and
# MD take most, the oracle (xTB, milliseconds per call) and inference little.
WORKERS = {"oracle": 1, "generator": 2, "train": 2, "infer": 1}

# Tasks the coordinator keeps in flight per module. One extra oracle task waits in
# the interchange so that the oracle never idles between batches.
slots = {"oracle": 2, "generator": 2, "train": 2, "infer": 1}


def executor(label: str, workers: int) -> HighThroughputExecutor:
    """The executor of one module, with ``workers`` worker processes."""
    return HighThroughputExecutor(
        label=label,  # the module this executor serves
        address="127.0.0.1",  # loopback only: nothing off this machine connects
        encrypted=True,  # CurveZMQ between interchange and workers
        max_workers_per_node=workers,  # worker processes for this module
        # ``workers``, not the core count, sizes the pool: HTEX would otherwise cap it
        # at the cores (cores_per_worker defaults to 1).
        cores_per_worker=1.0 / workers,
        cpu_affinity="none",  # let the OS spread workers over the cores
        provider=LocalProvider(
            init_blocks=1,
            min_blocks=1,
            max_blocks=1,  # one pool of workers, started at once
            # One OpenMP/BLAS thread per worker: the workers already fill the cores.
            # Open MPI may start more ranks than cores (and run as root in containers).
            worker_init="export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "
            "OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_ALLOW_RUN_AS_ROOT=1 "
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
        ),
    )


# Parsl's own monitoring (MonitoringHub: every task's states and resource use in an
# SQLite database, RUN_DIR/parsl/monitoring.db, for parsl-visualize). Off by default;
# PALFLOW_MONITORING=1 or True here turns it on. Needs: pip install "parsl[monitoring]".
MONITORING = os.environ.get("PALFLOW_MONITORING", "0") == "1"

# Longest wait (s) for a module's first worker (local processes start in seconds).
worker_start_timeout_s = 300

config = Config(
    executors=[executor(label, WORKERS[label]) for label in MODULES],
    run_dir="runinfo",  # Parsl's own logs, beside the campaign's run directory
    strategy="none",  # fixed blocks: no scaling on a laptop
    usage_tracking=0,  # send nothing anywhere
    monitoring=MonitoringHub(workflow_name="palflow") if MONITORING else None,
)
