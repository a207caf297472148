"""A Slurm cluster: CPU nodes label and explore, GPU nodes train and infer.

Copy it rather than edit it (``palflow init --site hpc`` writes the copy, site.py),
edit the lines marked EDIT (docs/sites.md, "Adapting hpc.py to your cluster", lists
them), check it, then run the campaign on a login node, inside the venv palflow is
installed in:

    palflow check --site site.py --campaign campaign.toml
    palflow run --site site.py --campaign campaign.toml

Each module gets its own pilot jobs (blocks), so a slow DFT queue never holds up
training.
"""

import os

from parsl.addresses import address_by_hostname
from parsl.config import Config
from parsl.executors import HighThroughputExecutor, MPIExecutor
from parsl.launchers import SimpleLauncher, SingleNodeLauncher
from parsl.monitoring.monitoring import MonitoringHub
from parsl.providers import SlurmProvider

ACCOUNT = "YOUR_ACCOUNT"  # EDIT: the account (project) jobs are charged to
CPU_PARTITION = "YOUR_CPU_PARTITION"  # EDIT: partition of the CPU nodes
GPU_PARTITION = "YOUR_GPU_PARTITION"  # EDIT: partition of the GPU nodes
GPUS_PER_NODE = 4  # EDIT: GPUs on one GPU node
CPU_CORES_PER_NODE = 128  # EDIT: cores on one CPU node
# EDIT: how a job gets palflow's environment (module loads, then the venv). Where
# srun needs it, add the MPI plug-in too, e.g. "export SLURM_MPI_TYPE=pmix".
WORKER_INIT = "module load python/3.11; source $HOME/palflow/.venv/bin/activate"

# Tasks the coordinator keeps in flight per module: a little above the workers, so
# that none idles while the coordinator reacts.
slots = {
    "oracle": 8,
    "generator": 2 * CPU_CORES_PER_NODE // 4,
    "train": GPUS_PER_NODE,
    "infer": GPUS_PER_NODE,
}

# Parsl's own monitoring (MonitoringHub: every task's states and resource use in an
# SQLite database, RUN_DIR/parsl/monitoring.db, for parsl-visualize). Off by default;
# PALFLOW_MONITORING=1 or True here turns it on. Needs: pip install "parsl[monitoring]".
MONITORING = os.environ.get("PALFLOW_MONITORING", "0") == "1"

# Longest wait (s) for a module's first worker while its tasks wait: past it, the run
# stops as failed and names the pilot jobs and why Slurm holds them (squeue's reason).
# EDIT: longer where your queue routinely waits more; None waits however long it takes.
worker_start_timeout_s = 4 * 3600

config = Config(
    executors=[
        MPIExecutor(  # each oracle task may span ranks and nodes
            label="oracle",
            address=address_by_hostname(),  # where compute nodes reach the login node
            encrypted=True,  # login nodes are shared: encrypt task traffic
            mpi_launcher="srun",  # the launcher Parsl puts in $PARSL_MPI_PREFIX
            max_workers_per_block=4,  # MPI tasks one block runs at once
            provider=SlurmProvider(
                account=ACCOUNT,
                partition=CPU_PARTITION,
                nodes_per_block=2,  # nodes one oracle block holds for MPI tasks
                init_blocks=1,
                min_blocks=0,
                max_blocks=4,  # blocks at start, fewest, most
                walltime="12:00:00",  # a block's lifetime; tasks resubmit to new ones
                worker_init=WORKER_INIT,
                launcher=SimpleLauncher(),  # MPI mode: one manager per block, srun per task
                exclusive=True,  # whole nodes for DFT
            ),
        ),
        HighThroughputExecutor(
            label="generator",
            address=address_by_hostname(),
            encrypted=True,
            cores_per_worker=4,  # cores per MD walker process
            provider=SlurmProvider(
                account=ACCOUNT,
                partition=CPU_PARTITION,
                nodes_per_block=1,
                init_blocks=1,
                min_blocks=0,
                max_blocks=2,
                walltime="12:00:00",
                worker_init=WORKER_INIT + "; export OMP_NUM_THREADS=4",
                launcher=SingleNodeLauncher(),
                exclusive=False,  # MD walkers share nodes politely
            ),
        ),
        *[
            HighThroughputExecutor(  # training and inference alike: GPU nodes
                label=label,
                address=address_by_hostname(),
                encrypted=True,
                available_accelerators=GPUS_PER_NODE,  # a worker per GPU, own CUDA_VISIBLE_DEVICES
                provider=SlurmProvider(
                    account=ACCOUNT,
                    partition=GPU_PARTITION,
                    nodes_per_block=1,
                    init_blocks=1,
                    min_blocks=1,
                    max_blocks=1,
                    walltime="12:00:00",
                    # EDIT: some clusters want --gres=gpu:N instead
                    scheduler_options=f"#SBATCH --gpus-per-node={GPUS_PER_NODE}",
                    worker_init=WORKER_INIT,
                    launcher=SingleNodeLauncher(),
                    exclusive=False,
                ),
            )
            for label in ("train", "infer")
        ],
    ],
    strategy="htex_auto_scale",  # grow and shrink blocks between min_blocks and max_blocks
    retries=2,  # a task lost with a pilot job (node failure) runs again on another
    usage_tracking=0,  # send nothing anywhere
    monitoring=MonitoringHub(workflow_name="palflow") if MONITORING else None,
)
