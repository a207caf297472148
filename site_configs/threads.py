"""Thread pools in the coordinator's own process: no start-up cost, for quick tries.

Handy for notebooks and debugging. Torch and xTB release the GIL in their kernels,
but Python-heavy work (small-molecule MD) contends for it; use laptop.py for real
runs on one machine.
"""

import os

# Oracle tasks fork a child per batch (apps/oracles/isolation.py). A child forked from a
# process whose OpenMP thread pool is running (torch's, xTB's) can hang in xTB's
# first parallel region; one OpenMP thread per task keeps forks safe, and tasks here
# share the process's cores anyway. Set before torch or xTB starts OpenMP.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from parsl.config import Config  # noqa: E402
from parsl.executors.threads import ThreadPoolExecutor  # noqa: E402
from parsl.monitoring.monitoring import MonitoringHub  # noqa: E402

from palflow.apps.contracts import MODULES  # noqa: E402 (the executor labels)

# Tasks the coordinator keeps in flight per module; each pool has as many threads.
slots = {"oracle": 1, "generator": 2, "train": 2, "infer": 1}

# Parsl's own monitoring (MonitoringHub: every task's states and resource use in an
# SQLite database, RUN_DIR/parsl/monitoring.db, for parsl-visualize). Off by default;
# PALFLOW_MONITORING=1 or True here turns it on. Needs: pip install "parsl[monitoring]".
MONITORING = os.environ.get("PALFLOW_MONITORING", "0") == "1"

config = Config(
    executors=[
        ThreadPoolExecutor(label=label, max_threads=slots[label])  # one pool per module
        for label in MODULES
    ],
    run_dir="runinfo",  # Parsl's own logs
    usage_tracking=0,  # send nothing anywhere
    monitoring=MonitoringHub(workflow_name="palflow") if MONITORING else None,
)
