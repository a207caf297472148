"""Coordinator overhead: no-op tasks through the coordinator's loop against the same
tasks submitted straight to Parsl, on the same executor.

    python benchmarks/coordinator_overhead.py --tasks 2000

For thread pools and for a local HTEX: throughput of each, their ratio (target
>= 0.8), and the latency from one task's completion to the coordinator's next
submission, p50 and p99 (target p50 <= 1 ms). The coordinator's loop is the real
one (events written, state saved); only the handler does nothing. Writes
``benchmarks/results/coordinator_overhead.json``.
"""

from __future__ import annotations

import bisect
import os
import statistics
import tempfile
import time

import common
from common import cell

from palflow.pipeline.engine.coordinator import Apps, Coordinator
from palflow.pipeline.engine.core import TaskRecord

common.use_this_interpreter()


class NoopTask(TaskRecord):
    kind = "score"


class NoopAgent:
    """Keeps no-op tasks in every free ``infer`` slot until ``n`` were submitted."""

    kinds = ("score",)

    def __init__(self, engine, submit, n: int) -> None:
        self.engine, self.submit, self.n = engine, submit, n
        self.submitted_count = self.completed_count = 0
        self.completions: list[float] = []
        self.submissions: list[float] = []

    def submit_ready(self, stopping: bool) -> None:
        while self.submitted_count < self.n and self.engine.free("infer"):
            self.submissions.append(time.perf_counter())
            self.engine.submit(NoopTask(), self._submit_noop)
            self.submitted_count += 1

    def _submit_noop(self):
        future = self.submit()
        future.add_done_callback(lambda _: self.completions.append(time.perf_counter()))
        return future

    def on_result(self, task, result) -> None:
        self.completed_count += 1

    def on_failure(self, task, error) -> None:
        raise RuntimeError(f"a no-op task failed: {error}")


class NoopCoordinator(Coordinator):
    """The coordinator's loop (events written, state saved, observers called), with
    one agent that keeps ``in_flight`` no-op tasks going until ``n`` ran."""

    def __init__(self, run, submit, n: int, in_flight: int) -> None:
        from ase.build import molecule

        from palflow.pipeline.config.settings import load_campaign

        apps = Apps(*([submit] * 6))
        super().__init__(
            load_campaign(), run, apps, {"infer": in_flight}, molecule("H2O"), poll_s=5.0
        )
        self.n = n
        self.noop = NoopAgent(self.engine, submit, n)
        self.agents = [self.noop]
        self.engine.register(self.noop)

    def begin(self) -> None:
        self.t_start = time.perf_counter()

    def turn(self) -> bool:
        if self.noop.completed_count >= self.n:
            self.state.request_stop("done")
        return super().turn()

    def close(self) -> dict:
        elapsed = time.perf_counter() - self.t_start
        latencies = []
        submissions = sorted(self.noop.submissions)
        for done in sorted(self.noop.completions)[: self.n - 1]:
            index = bisect.bisect_left(submissions, done)
            if index < len(submissions):
                latencies.append(submissions[index] - done)
        latencies.sort()
        return {
            "tasks_per_s": self.n / elapsed,
            "latency_p50_ms": 1e3 * statistics.median(latencies),
            "latency_p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))],
        }


def config_for(kind: str, workers: int, run_dir: str):
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.executors.threads import ThreadPoolExecutor
    from parsl.providers import LocalProvider

    if kind == "threads":
        executor = ThreadPoolExecutor(label="infer", max_threads=workers)
    else:
        executor = HighThroughputExecutor(
            label="infer",
            address="127.0.0.1",
            encrypted=True,
            max_workers_per_node=workers,
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
        )
    return Config(executors=[executor], run_dir=run_dir, usage_tracking=0, strategy="none")


def measure(kind: str, n: int, in_flight: int, workers: int) -> dict:
    import parsl
    from parsl import python_app

    from palflow.apps.common import _ping
    from palflow.pipeline.state.rundir import RunDirectory

    work = tempfile.mkdtemp(prefix="palflow-overhead-")
    with parsl.load(config_for(kind, workers, f"{work}/parsl")):
        noop = python_app(_ping, executors=["infer"])
        for future in [noop() for _ in range(50)]:  # warm-up: workers started
            future.result()
        t0 = time.perf_counter()
        for future in [noop() for _ in range(n)]:
            future.result()
        direct = n / (time.perf_counter() - t0)
        run = RunDirectory.create(f"{work}/run")
        through = NoopCoordinator(run, noop, n, in_flight).run()
    return {
        "executor": kind,
        "tasks": n,
        "in_flight": in_flight,
        "direct_tasks_per_s": direct,
        "coordinator_tasks_per_s": through["tasks_per_s"],
        "throughput_ratio": through["tasks_per_s"] / direct,
        "latency_p50_ms": through["latency_p50_ms"],
        "latency_p99_ms": through["latency_p99_ms"],
    }


COLUMNS = [
    ("executor", "<10", cell("executor")),
    ("direct /s", ">11", cell("direct_tasks_per_s", ".0f")),
    ("coordinator /s", ">16", cell("coordinator_tasks_per_s", ".0f")),
    ("ratio", ">7", cell("throughput_ratio", ".2f")),
    ("p50 ms", ">8", cell("latency_p50_ms", ".2f")),
    ("p99 ms", ">8", cell("latency_p99_ms", ".2f")),
]


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--executors", nargs="+", default=["threads", "htex"])
    args = parser.parse_args()
    protocol = common.provenance(args)
    rows = [measure(kind, args.tasks, args.in_flight, args.workers) for kind in args.executors]
    common.print_table(COLUMNS, rows)
    result = {"protocol": protocol, "rows": rows, "load_average_after": list(os.getloadavg())}
    common.write_results("coordinator_overhead", result)


if __name__ == "__main__":
    main()
