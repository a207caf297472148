"""hpc.py's twin for the single-node Slurm cluster that .ci/slurm/start.sh starts.

Partition ``cpu`` runs the oracle and MD, partition ``gpu`` (GRES gpu:2, stand-in
devices) runs training and inference, every module in its own pilot jobs submitted
with sbatch, exactly as on a cluster. Used by the Slurm integration tests:

    palflow run --site local_slurm.py
"""

import os
import sys

from parsl.config import Config
from parsl.executors import HighThroughputExecutor, MPIExecutor
from parsl.launchers import SimpleLauncher, SingleNodeLauncher
from parsl.monitoring.monitoring import MonitoringHub
from parsl.providers import SlurmProvider

# Jobs find palflow's venv by this interpreter; srun launches MPI ranks through PMIx
# and may place ranks beyond the job's one core (a two-core test machine).
WORKER_INIT = (
    f"export PATH={sys.prefix}/bin:$PATH OMP_NUM_THREADS=1 SLURM_MPI_TYPE=pmix SLURM_OVERCOMMIT=1"
)

# Managers and interchanges check on each other every 2 s and give a lost pilot job
# up after 10 s, so that its tasks go to a new job quickly.
HEARTBEAT = {"heartbeat_period": 2, "heartbeat_threshold": 10}

# Tasks the coordinator keeps in flight per module.
slots = {"oracle": 2, "generator": 1, "train": 1, "infer": 1}


def _provider(partition: str, options: str = "", launcher=None) -> SlurmProvider:
    return SlurmProvider(
        partition=partition,  # the test cluster's cpu or gpu partition
        nodes_per_block=1,  # one node is all there is
        init_blocks=1,
        min_blocks=1,
        max_blocks=1,  # one pilot job per module, at once
        walltime="01:00:00",  # longer than any test campaign
        # Share the node's two cores between the four pilot jobs.
        scheduler_options="#SBATCH --oversubscribe\n" + options,
        worker_init=WORKER_INIT,
        exclusive=False,  # else the gpu jobs wait for the cpu job to end
        launcher=launcher or SingleNodeLauncher(),
    )


# Parsl's own monitoring (MonitoringHub: every task's states and resource use in an
# SQLite database, RUN_DIR/parsl/monitoring.db, for parsl-visualize). Off by default;
# PALFLOW_MONITORING=1 or True here turns it on. Needs: pip install "parsl[monitoring]".
MONITORING = os.environ.get("PALFLOW_MONITORING", "0") == "1"

# Longest wait (s) for a module's first worker: this cluster starts a job at once, so a
# job still pending after this is held, or asks for what the node does not have.
worker_start_timeout_s = 300

config = Config(
    executors=[
        MPIExecutor(
            label="oracle",
            address="127.0.0.1",  # jobs run on this very host
            encrypted=True,  # CurveZMQ, as on a shared login node
            mpi_launcher="srun",  # $PARSL_MPI_PREFIX is an srun step
            max_workers_per_block=1,  # MPI tasks at once per block
            **HEARTBEAT,
            provider=_provider("cpu", launcher=SimpleLauncher()),
        ),
        HighThroughputExecutor(
            label="generator",
            address="127.0.0.1",
            encrypted=True,
            **HEARTBEAT,
            max_workers_per_node=1,  # one MD worker
            provider=_provider("cpu"),
        ),
        HighThroughputExecutor(
            label="train",
            address="127.0.0.1",
            encrypted=True,
            **HEARTBEAT,
            available_accelerators=1,  # one worker per GPU of the job
            provider=_provider("gpu", "#SBATCH --gres=gpu:1"),
        ),
        HighThroughputExecutor(
            label="infer",
            address="127.0.0.1",
            encrypted=True,
            **HEARTBEAT,
            available_accelerators=1,
            provider=_provider("gpu", "#SBATCH --gres=gpu:1"),
        ),
    ],
    strategy="simple",  # replaces a lost pilot job (scancel, node failure) at once
    retries=2,  # a task lost with its pilot job runs again on the new one
    usage_tracking=0,  # send nothing anywhere
    monitoring=MonitoringHub(workflow_name="palflow") if MONITORING else None,
)
