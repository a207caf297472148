"""Overlap against PAL's speedup model: the streaming pipeline and the serial loop,
built from the same apps, on a workload whose modules take set times.

    python benchmarks/overlap.py --iterations 8 --sites threads htex

Each module is the real app (Cu13 with EMT, a tiny model) after a set sleep
(``benchmarks/delayed.py``), so two cores suffice. With P oracle slots and N labels per
iteration, PAL's model says

    T_serial   = N/P·t_oracle + t_train + t_gen         (per iteration)
    T_parallel = max(N/P·t_oracle, t_train, t_gen)
    S          = T_serial / T_parallel

The serial loop (:class:`palflow.pipeline.engine.serial.SerialLoop`) and the streaming
coordinator each run until they have ``--iterations`` iterations' worth of new
labels and new ensemble versions. PAL's S is a steady-state ratio, so both clocks
start once the pipeline is full, at the first active labels; the cold-start figure,
clocked from the first ensemble version, is reported beside it. The ideal S uses the
task times measured in the serial run; the measured speedup is the ratio of the
median wall times over ``--repeat`` runs, serial and streaming interleaved. Writes
``benchmarks/results/overlap.json`` and ``overlap.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Tests point this elsewhere, so that tiny runs never overwrite the measured results.
RESULTS = Path(os.environ.get("PALFLOW_BENCH_OUT", ROOT / "benchmarks" / "results"))
# The local HTEX's workers unpickle the delayed apps from benchmarks/delayed.py.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")) if p
)
os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))

from palflow.apps.contracts import MODULES  # noqa: E402
from palflow.pipeline.engine.coordinator import Apps, Coordinator  # noqa: E402
from palflow.pipeline.engine.serial import SerialLoop  # noqa: E402

# PAL's three cases (SI S2): set seconds per task, N labels per iteration, P oracle slots.
CASES = {
    "1: t_oracle = t_train, N = P": {"oracle": 1.0, "train": 1.0, "generator": 0.1},
    "2: t_train >> t_oracle, t_gen": {"oracle": 0.2, "train": 2.0, "generator": 0.2},
    "3: t_oracle = t_train = t_gen": {"oracle": 1.0, "train": 1.0, "generator": 1.0},
}
N_LABELS = 2
P_ORACLE = 2
K_MEMBERS = 4


class Measured:
    """Mix-in: no held-out set (no evaluation), and clocks for PAL's model.

    PAL's S is a steady-state ratio, so the measured clock starts once the pipeline
    is full: at the first active labels, which in both loops come after a first
    ensemble, a first MD segment and a first oracle batch. It stops after
    ``target_iterations`` more iterations' worth of labels (N each) and of new
    ensemble versions. A second clock from the first ensemble version, which also
    counts the time to fill the pipeline, is reported as the cold-start figure.
    """

    target_iterations: int

    def begin(self) -> None:
        """No held-out set: the benchmark times the loop, not its evaluation."""
        if not isinstance(self, SerialLoop):
            self.oracle.submit_labels()

    def turn(self) -> bool:
        self._clock()
        return super().turn()

    def _clock(self) -> None:
        state = self.state
        if state.stop_reason or not state.versions:
            return
        now = time.time()
        if not hasattr(self, "_cold_start"):
            self._cold_start = now
            self._cold_labels = state.n_labels_active
            self._cold_versions = len(state.versions)
        if not hasattr(self, "_clock_start") and state.n_labels_active > 0:
            self._clock_start = now
            self._labels_at_start = state.n_labels_active
            self._versions_at_start = len(state.versions)
        goal = self.target_iterations
        if not hasattr(self, "_cold_stop") and (
            state.n_labels_active - self._cold_labels >= goal * N_LABELS
            and len(state.versions) - self._cold_versions >= goal
        ):
            self._cold_stop = now
        if (
            hasattr(self, "_clock_start")
            and state.n_labels_active - self._labels_at_start >= goal * N_LABELS
            and len(state.versions) - self._versions_at_start >= goal
        ):
            self._clock_stop = now
            state.request_stop("done")


class MeasuredStreaming(Measured, Coordinator):
    pass


class MeasuredSerial(Measured, SerialLoop):
    pass


def campaign(iterations: int):
    from palflow.pipeline.config.settings import load_campaign

    return load_campaign(
        ROOT / "benchmarks" / "short_cu13.toml",
        model__n_members=K_MEMBERS,
        model__n_features=8,
        model__n_interactions=1,
        model__n_rbf=4,
        training__epochs_per_task=1,
        training__min_task_s=0.0,
        training__validation_fraction=0.0,
        generator__n_walkers=N_LABELS,
        generator__steps_per_task=5,
        generator__sample_interval=5,
        selection__threshold=0.0,
        selection__max_per_trajectory=1,
        selection__min_frame_gap=0,
        selection__rescore=False,
        # Backpressure: generators pause while the queue holds two iterations' worth,
        # so that MD far ahead of the oracle does not take the CPU from training.
        selection__max_queue=2 * N_LABELS,
        oracle__batch_size=1,
        oracle__isolate=False,
        initial__n_structures=4,
        stop__max_labels=(2 * iterations + 4) * N_LABELS,
        stop__max_wall_s=600.0,
        stop__final_training_s=0.0,
    )


def slots() -> dict[str, int]:
    return {"oracle": P_ORACLE, "train": K_MEMBERS, "generator": N_LABELS, "infer": 1}


def delayed_functions(times: dict[str, float]) -> dict[str, object]:
    from delayed import Delayed
    from palflow.apps.generator import _generate
    from palflow.apps.inference import _evaluate_test, _score_candidates
    from palflow.apps.oracle import _label_batch, _oracle_md
    from palflow.apps.training import _train_member

    return {
        "label_batch": ("oracle", Delayed(_label_batch, times["oracle"])),
        "oracle_md": ("oracle", Delayed(_oracle_md, 0.0)),
        "generate": ("generator", Delayed(_generate, times["generator"])),
        "train_member": ("train", Delayed(_train_member, times["train"])),
        "score_candidates": ("infer", Delayed(_score_candidates, 0.0)),
        "evaluate_test": ("infer", Delayed(_evaluate_test, 0.0)),
    }


def run_one(site: str, loop: type, times: dict[str, float], iterations: int) -> dict:
    import parsl
    from palflow.pipeline.config.sites import warm_up
    from palflow.pipeline.state.campaign_state import load_start_structure
    from palflow.pipeline.state.rundir import RunDirectory
    from parsl import python_app
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    settings = campaign(iterations)
    work = Path(tempfile.mkdtemp(prefix="palflow-overlap-"))
    run = RunDirectory.create(work / "run")
    start = load_start_structure(settings.system.structure)
    functions = delayed_functions(times)
    if site == "threads":
        executors = {m: ThreadPoolExecutor(slots()[m]) for m in MODULES}
        apps = Apps(**{name: partial(executors[m].submit, f) for name, (m, f) in functions.items()})
        coordinator = loop(settings, run, apps, slots(), start, poll_s=0.5)
        coordinator.target_iterations = iterations
        coordinator.run()
        for executor in executors.values():
            executor.shutdown(wait=True, cancel_futures=True)
    else:
        config = Config(
            executors=[
                HighThroughputExecutor(
                    label=m,
                    address="127.0.0.1",
                    encrypted=True,
                    max_workers_per_node=slots()[m],
                    # Every slot gets a worker, even where slots outnumber cores: the
                    # set times are sleeps.
                    cores_per_worker=1.0 / slots()[m],
                    provider=LocalProvider(
                        init_blocks=1,
                        min_blocks=1,
                        max_blocks=1,
                        worker_init="export OMP_NUM_THREADS=1",
                    ),
                )
                for m in MODULES
            ],
            run_dir=str(work / "parsl"),
            strategy="none",
            usage_tracking=0,
        )
        with parsl.load(config):
            warm_up(slots())
            apps = Apps(
                **{name: python_app(f, executors=[m]) for name, (m, f) in functions.items()}
            )
            coordinator = loop(settings, run, apps, slots(), start, poll_s=0.5)
            coordinator.target_iterations = iterations
            coordinator.run()
    events = run.read_events()
    durations = {
        m: statistics.median(
            [e["ended"] - e["started"] for e in events if e["module"] == m and e.get("started")]
            or [0.0]
        )
        for m in ("oracle", "train", "generator")
    }
    return {
        "wall_s": coordinator._clock_stop - coordinator._clock_start,
        "cold_wall_s": coordinator._cold_stop - coordinator._cold_start,
        "task_s": durations,
        "versions": len(coordinator.state.versions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--sites", nargs="+", default=["threads", "htex"])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for site in args.sites:
        for case in args.cases:
            times = CASES[case]
            runs = {"serial": [], "streaming": []}
            for _ in range(args.repeat):
                runs["serial"].append(run_one(site, MeasuredSerial, times, args.iterations))
                runs["streaming"].append(run_one(site, MeasuredStreaming, times, args.iterations))
            wall = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
            cold = {k: statistics.median(r["cold_wall_s"] for r in v) for k, v in runs.items()}
            t = {
                m: statistics.median(r["task_s"][m] for r in runs["serial"])
                for m in ("oracle", "train", "generator")
            }
            t_oracle = N_LABELS / P_ORACLE * t["oracle"]
            ideal = (t_oracle + t["train"] + t["generator"]) / max(
                t_oracle, t["train"], t["generator"]
            )
            measured = wall["serial"] / wall["streaming"]
            rows.append(
                {
                    "site": site,
                    "case": case,
                    "iterations": args.iterations,
                    "repeat": args.repeat,
                    "set_task_s": times,
                    "measured_task_s": t,
                    "serial_wall_s": wall["serial"],
                    "streaming_wall_s": wall["streaming"],
                    "ideal_speedup": ideal,
                    "measured_speedup": measured,
                    "measured_over_ideal": measured / ideal,
                    "cold_serial_wall_s": cold["serial"],
                    "cold_streaming_wall_s": cold["streaming"],
                    "cold_measured_speedup": cold["serial"] / cold["streaming"],
                    "runs": runs,
                }
            )
            print(
                f"{site:<8}{case:<34}serial {wall['serial']:6.1f} s  streaming "
                f"{wall['streaming']:6.1f} s  ideal S {ideal:4.2f}  measured S "
                f"{measured:4.2f}  measured/ideal {measured / ideal:4.2f}  "
                f"(cold start: S {cold['serial'] / cold['streaming']:4.2f})",
                flush=True,
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overlap.json").write_text(json.dumps(rows, indent=2))
    plot(rows, RESULTS / "overlap.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    labels = [f"{r['site']}\ncase {r['case'].split(':')[0]}" for r in rows]
    x = range(len(rows))
    axis.bar([i - 0.2 for i in x], [r["ideal_speedup"] for r in rows], 0.4, label="ideal (PAL)")
    axis.bar([i + 0.2 for i in x], [r["measured_speedup"] for r in rows], 0.4, label="measured")
    axis.set_xticks(list(x), labels)
    axis.set_ylabel("speed-up over the serial loop")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
