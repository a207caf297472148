"""The streaming coordinator: keep every module busy, react to whatever finishes first.

Deciding what to run is kept apart from running it. The coordinator only ever
sees ``concurrent.futures.Future`` objects, so it runs on Parsl executors in a
campaign and on a standard-library executor in tests. Its loop is::

    submit whatever a free slot allows  ->  wait(FIRST_COMPLETED)  ->  handle each result

One small handler per kind of result says what arrived, what it changes and what
becomes submittable:

============  =========  ==============================================================
kind          module     on completion
============  =========  ==============================================================
reference     oracle     the held-out test set exists; ensembles can be evaluated
label         oracle     labels enter ``labels.db`` and the next training snapshot
generate      generator  frames above the threshold enter the oracle queue; each walker
                         of the task moves on, or is reset when it blew up
train         train      the member's checkpoint advances; once every member has, a new
                         ensemble version is published
score         infer      the oracle queue is re-scored with the newer ensemble
evaluate      infer      the test force MAE of a version is recorded
============  =========  ==============================================================
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import write

from apps.dataset import read_arrays, read_dataset, structures_from_arrays, write_dataset
from pipeline.campaign_state import CampaignState, Member, Snapshot, Version, Walker
from pipeline.journal import Journal, candidate_arrays, resume_state, retry_allowed
from pipeline.measures import EnsemblePrediction
from pipeline.metrology import evaluation_from_result, load_plugins, measure_version
from pipeline.rundir import RunDirectory
from pipeline.selection import Candidate, OracleQueue, select_frames
from pipeline.settings import Campaign
from pipeline.strategies import Selector

logger = logging.getLogger(__name__)

MODULES = ("oracle", "generator", "train", "infer")
"""Executor labels: the only link between apps and site configs."""

MODULE_OF_KIND = {
    "reference": "oracle",
    "label": "oracle",
    "generate": "generator",
    "train": "train",
    "score": "infer",
    "evaluate": "infer",
}
MAX_CONSECUTIVE_FAILURES = 5


@dataclass
class Apps:
    """How each kind of task is submitted; every callable returns a Future."""

    label_batch: Callable[..., Future]
    oracle_md: Callable[..., Future]
    run_md: Callable[..., Future]
    train_member: Callable[..., Future]
    score_candidates: Callable[..., Future]
    evaluate_test: Callable[..., Future]

    @classmethod
    def parsl(cls) -> Apps:
        """The Parsl apps, routed by executor label."""
        import apps

        return cls(
            label_batch=apps.label_batch,
            oracle_md=apps.oracle_md,
            run_md=apps.run_md,
            train_member=apps.train_member,
            score_candidates=apps.score_candidates,
            evaluate_test=apps.evaluate_test,
        )

    @classmethod
    def from_executors(cls, executors: Mapping[str, Executor]) -> Apps:
        """The plain app functions on standard-library executors, keyed by module."""
        from apps.generator import _run_md
        from apps.inference import _evaluate_test, _score_candidates
        from apps.oracle import _label_batch, _oracle_md
        from apps.training import _train_member

        return cls(
            label_batch=partial(executors["oracle"].submit, _label_batch),
            oracle_md=partial(executors["oracle"].submit, _oracle_md),
            run_md=partial(executors["generator"].submit, _run_md),
            train_member=partial(executors["train"].submit, _train_member),
            score_candidates=partial(executors["infer"].submit, _score_candidates),
            evaluate_test=partial(executors["infer"].submit, _evaluate_test),
        )


@dataclass
class Task:
    """A task in flight: what it is and what the handler needs to know about it."""

    task_id: int
    kind: str
    submitted: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return MODULE_OF_KIND[self.kind]


class Coordinator:
    """Run one campaign to a stop, keeping ``slots[module]`` tasks in flight per module.

    Parameters
    ----------
    campaign
        Validated campaign settings.
    run
        The run directory, already created.
    apps
        How tasks are submitted.
    slots
        Most tasks in flight per module (``oracle``, ``generator``, ``train``,
        ``infer``); a site's capacity.
    start
        The start structure.
    oracle_resources
        Parsl resource specification of every oracle task (ranks, nodes), for sites
        whose oracle executor is an MPIExecutor; None elsewhere.
    mpi_command
        The site's launch prefix template for MPI oracles (see
        :func:`apps.oracle.mpi_prefix`).
    state
        The state to continue from (see :meth:`resume`); a new campaign by default.
    """

    def __init__(
        self,
        campaign: Campaign,
        run: RunDirectory,
        apps: Apps,
        slots: Mapping[str, int],
        start: Atoms,
        poll_s: float = 1.0,
        oracle_resources: dict[str, Any] | None = None,
        mpi_command: str = "parsl",
        state: CampaignState | None = None,
    ) -> None:
        self.campaign = campaign
        self.run_dir = run
        self.apps = apps
        self.slots = {module: max(1, int(slots.get(module, 1))) for module in MODULES}
        self.poll_s = poll_s
        self.mpi_command = mpi_command
        resources = (
            {}
            if oracle_resources is None
            else {"parsl_resource_specification": dict(oracle_resources)}
        )
        self._label_batch = partial(apps.label_batch, **resources)
        self._oracle_md = partial(apps.oracle_md, **resources)
        self.state = state or CampaignState.new(campaign, run, start)
        self.queue = OracleQueue(campaign.selection.max_queue)
        self.in_flight: dict[Future, Task] = {}
        self._in_flight_per_module: Counter[str] = Counter()
        self._next_task_id = 0
        self.journal = Journal(run)
        self._resumed_at: float | None = None
        self._reference_attempts = 0
        self._failures_in_a_row: Counter[str] = Counter()
        self.observers: list[Callable[[Coordinator], None]] = []
        """Called once per turn of the loop (live view, report refresh); they throttle
        themselves, and one that raises is logged and dropped."""
        self.selector = Selector(
            campaign, seed=[campaign.seed, len(self.state.versions)], cutoff=campaign.model.cutoff
        )
        self.metrology = load_plugins(campaign.metrology.plugins)
        self._handlers = {
            "reference": self._on_reference,
            "label": self._on_label,
            "generate": self._on_generate,
            "train": self._on_train,
            "score": self._on_score,
            "evaluate": self._on_evaluate,
        }

    @classmethod
    def resume(
        cls,
        campaign: Campaign,
        run: RunDirectory,
        apps: Apps,
        slots: Mapping[str, int],
        began_at: float | None = None,
        **options: Any,
    ) -> Coordinator:
        """A coordinator that continues the campaign of ``run`` where it stopped.

        Finished oracle results are harvested, labels sent but not returned are
        queued again, training continues from the newest member checkpoints, and the
        budgets count what earlier sessions spent (see :mod:`pipeline.journal`).
        ``began_at`` is when the resume began (default: now), for the record of how
        long it took until the first new task.
        """
        resumed_at = began_at or time.time()
        state, queue, next_task_id = resume_state(campaign, run)
        coordinator = cls(campaign, run, apps, slots, state.start, state=state, **options)
        coordinator.queue = queue
        coordinator._next_task_id = next_task_id
        if coordinator.selector.needs_descriptors:  # the diversity measures' reference
            coordinator.selector.note_labelled(state.labelled)
        coordinator._resumed_at = resumed_at
        return coordinator

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Run until a stop condition holds and in-flight oracle work is saved.

        Returns
        -------
        dict
            The summary, also written to ``summary.json``.
        """
        if self._resumed_at is None:
            self.state.t0 = time.time()
            self.state.pending_initial = self.state.initial_candidates(self.campaign)
        logger.info(
            "campaign %s %s in %s",
            self.campaign.name,
            "resumes" if self._resumed_at else "starts",
            self.run_dir.root,
        )
        self._submit_reference()
        while True:
            self._check_stop()
            self._submit_ready()
            self._note_resume_cost()
            self.journal.save(self.state, self.queue, self._next_task_id)
            self._notify_observers()
            if not self.in_flight or (self.state.stop_reason and not self._draining()):
                break
            done, _ = wait(list(self.in_flight), timeout=self.poll_s, return_when=FIRST_COMPLETED)
            for future in done:
                task = self.in_flight.pop(future)
                self._in_flight_per_module[task.module] -= 1
                self._finish(future, task)
        return self._close()

    def _notify_observers(self) -> None:
        for observer in list(self.observers):
            try:
                observer(self)
            except Exception:
                logger.exception("observer %r failed; it is dropped", observer)
                self.observers.remove(observer)

    def _note_resume_cost(self) -> None:
        """Record, once, how long a resume took until its first task was submitted."""
        if self._resumed_at is None or not self.in_flight:
            return
        first = min(task.submitted for task in self.in_flight.values())
        self.state.resumes.append(
            {
                "elapsed_s": first - self.state.t0,
                "seconds_to_first_task": first - self._resumed_at,
            }
        )
        logger.info(
            "resumed: first task submitted %.2f s after the resume began", first - self._resumed_at
        )
        self._resumed_at = None

    def _draining(self) -> list[Task]:
        """Tasks a stop still waits for: labels being paid for, and training on them."""
        return [t for t in self.in_flight.values() if t.kind in ("label", "train", "evaluate")]

    def _finish(self, future: Future, task: Task) -> None:
        ended = time.time()
        event = {
            "task": task.task_id,
            "kind": task.kind,
            "module": task.module,
            "submitted": task.submitted,
            "returned": ended,
        }
        try:
            result = future.result()
        except Exception as error:  # a task failure is recorded, never fatal by itself
            logger.warning("%s task %d failed: %s", task.kind, task.task_id, error)
            event.update(ok=False, error=f"{type(error).__name__}: {error}"[:500])
            self.run_dir.append_event(event)
            self._on_task_failure(task, error)
            return
        self._failures_in_a_row[task.module] = 0
        event.update(
            ok=True,
            started=result.get("t_start"),
            ended=result.get("t_end"),
            host=result.get("host"),
            slurm_job_id=result.get("slurm_job_id"),
            slurm_partition=result.get("slurm_partition"),
        )
        self.run_dir.append_event(event)
        try:
            self._handlers[task.kind](result, task)
        except Exception as error:  # an unreadable result costs its task, not the run
            logger.exception("%s task %d: its result could not be used", task.kind, task.task_id)
            self.run_dir.append_event({**event, "ok": False, "error": f"result unusable: {error}"})
            self._on_task_failure(task, error)
            return
        if result.get("stop"):
            self.state.request_stop(f"{task.module} asked to stop: {result['stop']}")

    def _submit(self, kind: str, submit: Callable[..., Future], *args: Any, **meta: Any) -> None:
        task = Task(self._next_task_id, kind, time.time(), meta)
        self._next_task_id += 1
        self.in_flight[submit(*args)] = task
        self._in_flight_per_module[task.module] += 1

    def _busy(self, module: str) -> int:
        return self._in_flight_per_module[module]

    def _free(self, module: str) -> bool:
        return self._busy(module) < self.slots[module]

    # ---------------------------------------------------------- what to submit
    def _submit_ready(self) -> None:
        stopping = self.state.stop_reason is not None
        if not stopping:
            self._submit_labels()
            self._submit_walkers()
        self._submit_training(stopping)
        self._submit_inference(stopping)

    def _submit_reference(self) -> None:
        """Start the initial labels, then the held-out set; both need only the oracle.

        The first initial batches go first, so that training starts while the
        held-out set, which no other module waits for, is still being labelled.
        """
        state, settings = self.state, self.campaign
        self._submit_labels()
        if state.test_ready:
            return
        if settings.test.file:
            state.use_test_file(settings.test.file)
        else:
            self._submit(
                "reference",
                self._oracle_md,
                state.start_path,
                self.run_dir.path("data", "test.npz"),
                self._oracle_spec(),
                self.run_dir.path("oracle", "scratch", "reference"),
                settings.test.n_structures,
                settings.test.md_stride,
                settings.test.temperature_K or settings.generator.temperature_K,
                settings.generator.timestep_fs,
                settings.seed,
            )

    def _oracle_spec(self) -> dict[str, Any]:
        oracle = self.campaign.oracle
        return {
            "calculator": oracle.calculator,
            "kwargs": dict(oracle.kwargs),
            "mpi_ranks": oracle.mpi_ranks,
            "mpi_nodes": oracle.mpi_nodes,
            "mpi_command": self.mpi_command,
        }

    def _submit_labels(self) -> None:
        batch_size = self.campaign.oracle.batch_size
        while self._free("oracle"):
            if self.state.pending_initial:
                batch = self.state.pending_initial[:batch_size]
                del self.state.pending_initial[:batch_size]
                source = "initial"
            else:
                room = self._label_room()
                if room <= 0 or not self.queue:
                    return
                batch = self.selector.pick_batch(self.queue, min(batch_size, room))
                source = "active"
            self._submit_label_batch(batch, source)

    def _submit_label_batch(self, batch: list[Candidate], source: str) -> None:
        """Write one oracle batch to the run directory and submit it."""
        task_id = self._next_task_id
        input_path = self.run_dir.path("oracle", f"batch{task_id:06d}.in.npz")
        write_dataset(input_path, [c.atoms for c in batch], extra=candidate_arrays(batch, source))
        self._submit(
            "label",
            self._label_batch,
            input_path,
            self.run_dir.path("oracle", f"batch{task_id:06d}.out.npz"),
            self._oracle_spec(),
            self.run_dir.path("oracle", "scratch", f"batch{task_id:06d}"),
            self.campaign.oracle.max_force,
            self.campaign.oracle.timeout_s,
            self.campaign.oracle.isolate,
            candidates=batch,
            source=source,
        )

    def _label_room(self) -> int:
        """Active labels that may be requested now: the budget, and the pacing."""
        in_flight = self._labels_in_flight()
        room = self.state.label_room(self.campaign, in_flight)
        per_version = self.campaign.selection.max_labels_per_version
        if per_version:
            paced = per_version * len(self.state.versions)
            room = min(room, paced - self.state.n_labels_active - in_flight)
        return room

    def _queue_is_full(self) -> bool:
        """Whether generators should pause: the oracle is far behind, or paced."""
        selection = self.campaign.selection
        limit = selection.max_queue
        if selection.max_labels_per_version:
            limit = min(limit, 2 * selection.max_labels_per_version)
        return len(self.queue) >= limit

    def _labels_in_flight(self) -> int:
        return sum(
            len(t.meta["candidates"])
            for t in self.in_flight.values()
            if t.kind == "label" and t.meta["source"] == "active"
        )

    def _walker_groups(self) -> list[list[Walker]]:
        """The walkers, in the groups that one generator task advances together."""
        walkers = self.state.walkers
        size = self.campaign.generator.walkers_per_task or -(
            -len(walkers) // self.slots["generator"]
        )
        return [walkers[i : i + size] for i in range(0, len(walkers), size)]

    def _submit_walkers(self) -> None:
        version = self.state.version
        if version is None or self._queue_is_full():
            return  # no ensemble to drive MD yet, or the oracle is far behind
        for group in sorted(self._walker_groups(), key=lambda g: min(w.segments for w in g)):
            if not self._free("generator"):
                return
            if any(walker.busy for walker in group):
                continue
            self._submit_walker_group(group, version)

    def _submit_walker_group(self, group: list[Walker], version: Version) -> None:
        """Submit the next MD segment of the walkers of ``group`` on ensemble ``version``."""
        outputs, last_frames = [], []
        for walker in group:
            walker.busy = True
            walker.segments += 1
            stem = f"walker{walker.walker_id:03d}.seg{walker.segments:05d}"
            outputs.append(self.run_dir.path("generator", f"{stem}.npz"))
            last_frames.append(self.run_dir.path("generator", f"{stem}.last.extxyz"))
        self._submit(
            "generate",
            self.apps.run_md,
            [walker.start_path for walker in group],
            version.path,
            outputs,
            last_frames,
            self.campaign.generator.model_dump(),
            self.campaign.seed * 1_000_003 + self._next_task_id,
            walkers=group,
            version=version.number,
        )

    def _submit_training(self, stopping: bool) -> None:
        snapshot = self.state.train_snapshot
        if snapshot is None:
            return
        resting = stopping and not self._final_training()
        # Least-trained first, so that every member advances and versions get published.
        for member in sorted(self.state.members, key=lambda m: m.tasks):
            if not self._free("train"):
                return
            # Once resting, each member takes in the last labels once, then stops.
            if member.busy or (resting and member.trained_on >= self.state.n_labels_total):
                continue
            self._submit_member(member, snapshot)

    def _submit_member(self, member: Member, snapshot: Snapshot) -> None:
        """Submit one training task of ``member`` on the labels of ``snapshot``."""
        member.busy = True
        out = self.run_dir.path("models", f"member{member.index}.{member.tasks:05d}.pt")
        member.tasks += 1
        self._submit(
            "train",
            self.apps.train_member,
            member.index,
            snapshot.train_path,
            member.checkpoint,
            out,
            self.state.model_spec(self.campaign),
            self.campaign.training.model_dump(),
            self.campaign.seed * 1000 + member.index,
            self.campaign.training.epochs_per_task,
            snapshot.valid_path,
            member=member,
            labels=snapshot.n_labels,
            checkpoint_out=out,
        )

    def _submit_inference(self, stopping: bool) -> None:
        state = self.state
        version = state.version
        if version is None:
            return
        if state.test_ready and state.evaluated_version < version.number and self._free("infer"):
            state.evaluated_version = version.number
            self._submit(
                "evaluate",
                self.apps.evaluate_test,
                version.path,
                self.run_dir.path("data", "test.npz"),
                version=version,
            )
        if (
            stopping
            or not self.campaign.selection.rescore
            or not self.selector.ranks_by_ensemble
            or not self.queue
            or state.rescored_version >= version.number
            or not self._free("infer")
        ):
            return
        state.rescored_version = version.number
        candidates = self.queue.candidates()
        path = self.run_dir.path("infer", f"queue.v{version.number:05d}.npz")
        write_dataset(path, [c.atoms for c in candidates], extra=candidate_arrays(candidates))
        out = self.run_dir.path("infer", f"queue.v{version.number:05d}.scores.npz")
        self._submit(
            "score",
            partial(self.apps.score_candidates, output_path=out),
            version.path,
            path,
            version=version,
            input_path=path,
        )

    # ---------------------------------------------------------- what arrived
    def _on_reference(self, result: dict[str, Any], task: Task) -> None:
        self.state.test_ready = True
        logger.info("held-out set ready: %d frames", result["n_frames"])

    def _on_label(self, result: dict[str, Any], task: Task) -> None:
        new, failed = self.state.harvest(result["output_path"], task.task_id)
        by_id = {c.candidate_id: c for c in task.meta["candidates"]}
        for candidate_id, reason in failed:
            self._retry_or_record(by_id[candidate_id], reason, task.meta["source"])
        failed_ids = {candidate_id for candidate_id, _ in failed}
        self.selector.note_labelled(
            [c.atoms for c in task.meta["candidates"] if c.candidate_id not in failed_ids]
        )
        logger.info(
            "labels: %d active (+%d %s), %d failed, queue %d",
            self.state.n_labels_active,
            new,
            task.meta["source"],
            self.state.n_failures,
            len(self.queue),
        )

    def _retry_or_record(self, candidate: Candidate, reason: str, source: str) -> None:
        """Give a transiently failed structure another attempt, or record its failure."""
        if not retry_allowed(candidate, reason, self.campaign):
            self.state.record_failure(candidate.candidate_id, reason)
            return
        candidate.attempts += 1
        self.state.retried[reason.split(":", 1)[0]] += 1
        logger.info(
            "candidate %d: attempt %d after %s",
            candidate.candidate_id,
            candidate.attempts + 1,
            reason[:120],
        )
        if source == "initial":
            self.state.pending_initial.append(candidate)
        else:
            self.queue.push(candidate)

    def _on_generate(self, result: dict[str, Any], task: Task) -> None:
        for walker in task.meta["walkers"]:
            walker.busy = False
        for walker, outcome in zip(task.meta["walkers"], result["walkers"], strict=True):
            left_domain = self._queue_picks(outcome, task.meta["version"])
            reason = outcome["reason"] if outcome["blew_up"] else None
            if left_domain:
                reason = "a frame scored above selection.upper_threshold"
            if reason:
                walker.resets += 1
                walker.start_path = self.state.start_path
                logger.info("walker %d reset: %s", walker.walker_id, reason)
            else:
                walker.start_path = outcome["last_frame_path"]

    def _queue_picks(self, outcome: dict[str, Any], version: int) -> bool:
        """Score one walker's segment, and queue the frames selection picks.

        Returns
        -------
        bool
            Whether a frame lay above the upper trust level: the walker left the
            model's domain, and neither that frame nor any after it is taken.
        """
        if not outcome["n_frames"]:
            return False
        selection = self.campaign.selection
        arrays = read_arrays(outcome["output_path"])
        frames = structures_from_arrays(arrays)
        prediction = EnsemblePrediction.from_arrays(arrays)
        if prediction is None:  # a generator that keeps no member predictions
            scores = np.asarray(outcome["force_disagreement"], dtype=float)
        else:
            scores = self.selector.score(prediction, frames)
        outside = self.selector.out_of_domain(scores)
        if outside.any():
            scores = scores[: int(np.argmax(outside))]
        picks = select_frames(
            scores,
            self.selector.threshold(),
            selection.max_per_trajectory,
            selection.min_frame_gap,
        )
        self.queue.extend(
            Candidate(
                self.state.new_candidate_id(),
                frames[i],
                outcome["force_disagreement"][i],
                outcome["energy_disagreement"][i],
                version,
                priority=float(scores[i]),
            )
            for i in picks
        )
        return bool(outside.any())

    def _on_train(self, result: dict[str, Any], task: Task) -> None:
        member: Member = task.meta["member"]
        member.busy = False
        member.advance(result["checkpoint"], task.meta["labels"], result["epochs"])
        last_of_stop = self.state.stop_reason is not None and self._busy("train") == 0
        version = self.state.maybe_publish_version(final=last_of_stop)
        if version is not None:
            logger.info("ensemble v%d published (%d labels)", version.number, version.n_labels)

    def _on_score(self, result: dict[str, Any], task: Task) -> None:
        ids = [int(i) for i in result["candidate_id"]]
        scores = np.asarray(result["force_disagreement"], dtype=float)
        if result.get("output_path"):
            prediction = EnsemblePrediction.from_arrays(read_arrays(result["output_path"]))
            if prediction is not None:
                structures = None
                if self.selector.needs_descriptors:
                    structures = read_dataset(task.meta["input_path"])
                scores = self.selector.score(prediction, structures)
        new = zip(result["force_disagreement"], result["energy_disagreement"], scores, strict=True)
        dropped = self.queue.rescore(
            dict(zip(ids, new, strict=True)), result["version"], self.selector.threshold()
        )
        logger.info(
            "queue re-scored with v%d: %d dropped, %d left",
            result["version"],
            len(dropped),
            len(self.queue),
        )

    def _on_evaluate(self, result: dict[str, Any], task: Task) -> None:
        version = task.meta["version"]
        evaluation = evaluation_from_result(result, version.number, version.n_labels)
        record = measure_version(evaluation, self.metrology)
        record["wall_s"] = version.wall_s
        self.run_dir.append_jsonl("metrics.jsonl", record)
        self.state.record_test_error(version, result, record)
        self.selector.calibrate(evaluation)
        logger.info(
            "v%d test force MAE %.4f eV/Å (%d labels)",
            version.number,
            result["force_mae"],
            version.n_labels,
        )
        target = self.campaign.stop.target_force_mae
        if target and result["force_mae"] <= target:
            self.state.request_stop(f"test force MAE {result['force_mae']:.4f} <= {target}")

    def _on_task_failure(self, task: Task, error: BaseException) -> None:
        if task.kind == "label":
            reason = f"task-lost: {type(error).__name__}: {error}"[:500]
            for candidate in task.meta["candidates"]:
                self._retry_or_record(candidate, reason, task.meta["source"])
        elif task.kind == "generate":
            for walker in task.meta["walkers"]:
                walker.busy = False
                walker.start_path = self.state.start_path
        elif task.kind == "train":
            task.meta["member"].busy = False
        elif task.kind == "reference":
            self._reference_attempts += 1
            if self._reference_attempts < self.campaign.oracle.max_attempts:
                self._submit_reference()  # a transient fault need not recur
            else:
                self.state.request_stop(f"the held-out set could not be labelled: {error}")
        self._failures_in_a_row[task.module] += 1
        if self._failures_in_a_row[task.module] >= MAX_CONSECUTIVE_FAILURES:
            self.state.request_stop(
                f"{task.module}: {MAX_CONSECUTIVE_FAILURES} tasks failed in a row, last: {error}"
            )

    # ---------------------------------------------------------- stopping
    def _check_stop(self) -> None:
        state, stop = self.state, self.campaign.stop
        if state.stop_reason:
            return
        if state.n_labels_active >= stop.max_labels:
            state.request_stop(f"label budget of {stop.max_labels} reached")
        elif time.time() - state.t0 >= stop.max_wall_s:
            state.request_stop(f"wall-time limit of {stop.max_wall_s:g} s reached")

    def _final_training(self) -> bool:
        """Whether training goes on after a stop, on the labels the campaign has."""
        state, stop = self.state, self.campaign.stop
        now = time.time()
        return (
            not state.stop_reason.startswith("wall-time")
            and now - state.stop_time < stop.final_training_s
            and now - state.t0 < stop.max_wall_s
        )

    def _close(self) -> dict[str, Any]:
        self.journal.save(self.state, self.queue, self._next_task_id, force=True)
        self.run_dir.close()
        summary = self.state.summary(self.run_dir.read_events(), self.slots)
        self.run_dir.write_json("summary.json", summary)
        self.run_dir.export_extxyz()
        write(
            self.run_dir.path("system", "queue_at_stop.extxyz"),
            [c.atoms for c in self.queue.candidates()] or [],
            format="extxyz",
        )
        logger.info("campaign stopped: %s", summary["stop_reason"])
        return summary
