"""Run under MPI: each rank reports itself, and rank 0 prints what all ranks saw.

    mpiexec -n 2 python -m apps.mpi_hello

The ranks pass a token around a ring and sum their ranks with an allreduce, so a
report shows they could talk to each other, not only that they started.
"""

import json
import os
import socket

from mpi4py import MPI


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    token = comm.sendrecv(rank, dest=(rank + 1) % size, source=(rank - 1) % size)
    total = comm.allreduce(rank, op=MPI.SUM)
    reports = comm.gather(
        {
            "rank": rank,
            "size": size,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token_from": token,
            "rank_sum": total,
        },
        root=0,
    )
    if rank == 0:
        print(json.dumps(reports))


if __name__ == "__main__":
    main()
