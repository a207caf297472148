"""The engine: tasks in flight, slots per module, the wait loop, observers.

It knows nothing of labels, walkers or ensembles. Agents submit tasks through
:meth:`Engine.submit`, each with a typed record of what it asked; when a task ends,
the engine writes its line to ``events.jsonl`` and hands the result, or the error,
to the agent registered for its kind. Tasks are ``concurrent.futures.Future``
objects (Parsl's in a campaign, the standard library's in tests). Its loop is::

    turn(): agents submit what free slots allow  ->  wait(FIRST_COMPLETED)  ->  dispatch
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from palflow.apps.contracts import MODULE_OF_KIND, MODULES
from palflow.pipeline.engine.watchdog import RepeatLog, describe_error

logger = logging.getLogger(__name__)


@dataclass
class TaskRecord:
    """A task in flight. Each agent subclasses it with what its handlers need to know."""

    kind: ClassVar[str] = ""
    task_id: int = field(default=-1, init=False)
    submitted: float = field(default=0.0, init=False)

    @property
    def module(self) -> str:
        return MODULE_OF_KIND[self.kind]


class Agent(Protocol):
    """One module's decisions: what to submit now, and what its results change."""

    kinds: tuple[str, ...]
    """The task kinds whose results and failures this agent handles."""

    def submit_ready(self, stopping: bool) -> None: ...

    def on_result(self, task: TaskRecord, result: dict[str, Any]) -> None: ...

    def on_failure(self, task: TaskRecord, error: BaseException) -> None: ...


class Outcomes(Protocol):
    """Told of every task's outcome (the stopping policy counts failures in a row)."""

    def task_succeeded(self, task: TaskRecord, result: dict[str, Any]) -> None: ...

    def task_failed(self, task: TaskRecord, error: BaseException) -> None: ...


class Engine:
    """Keep at most ``slots[module]`` tasks in flight per module, and dispatch results.

    Parameters
    ----------
    slots
        Most tasks in flight per module; a site's capacity (at least 1 each).
    events
        Where one line per finished task goes: anything with ``append_event(dict)``,
        normally the :class:`~palflow.pipeline.state.rundir.RunDirectory`.
    outcomes
        Told of every success and failure (the stopping policy).
    poll_s
        Longest wait for a task before the next turn.
    next_task_id
        The first task id to hand out (a resumed run continues its numbering).
    """

    def __init__(
        self,
        slots: Mapping[str, int],
        events: Any,
        outcomes: Outcomes,
        poll_s: float = 1.0,
        next_task_id: int = 0,
    ) -> None:
        self.slots = {module: max(1, int(slots.get(module, 1))) for module in MODULES}
        self.events = events
        self.outcomes = outcomes
        self.poll_s = poll_s
        self.next_task_id = next_task_id
        self.observers: list[Callable[[Any], None]] = []
        """Called once per turn with the subject given to :meth:`run` (live view,
        report refresh); they throttle themselves, and one that raises is dropped."""
        self._in_flight: dict[Future, TaskRecord] = {}
        self._busy: Counter[str] = Counter()
        self._agents: dict[str, Agent] = {}
        self.errors = RepeatLog(logger)
        """Logs each error in full once, and its repeats counted (bounded logs)."""

    # ------------------------------------------------------------ read-only view
    def busy(self, module: str) -> int:
        """Tasks of ``module`` in flight."""
        return self._busy[module]

    def free(self, module: str) -> bool:
        """Whether ``module`` has a free slot."""
        return self._busy[module] < self.slots[module]

    def busy_counts(self) -> dict[str, int]:
        return {module: self._busy[module] for module in MODULES}

    def tasks(self, *kinds: str) -> list[TaskRecord]:
        """The records of the tasks in flight, of the given kinds (all by default)."""
        return [t for t in self._in_flight.values() if not kinds or t.kind in kinds]

    # ------------------------------------------------------------ changes
    def register(self, agent: Agent) -> None:
        """Route the results of ``agent.kinds`` to ``agent`` (a later one replaces)."""
        for kind in agent.kinds:
            self._agents[kind] = agent

    def submit(self, record: TaskRecord, call: Callable[..., Future], **kwargs: Any) -> None:
        """Submit ``call(**kwargs)``, which returns a Future, as the task ``record``."""
        record.task_id, record.submitted = self.next_task_id, time.time()
        self.next_task_id += 1
        self._in_flight[call(**kwargs)] = record
        self._busy[record.module] += 1

    def run(self, turn: Callable[[], bool], subject: Any = None) -> None:
        """Loop until nothing is in flight, or ``turn()`` says to stop waiting.

        ``turn`` submits what it wants and returns whether the loop should go on
        while tasks are in flight; observers see ``subject`` once per turn.
        """
        while True:
            keep_waiting = turn()
            self.notify(subject)
            if not self._in_flight or not keep_waiting:
                return
            done, _ = wait(list(self._in_flight), timeout=self.poll_s, return_when=FIRST_COMPLETED)
            for future in done:
                record = self._in_flight.pop(future)
                self._busy[record.module] -= 1
                self._finish(future, record)

    def notify(self, subject: Any) -> None:
        for observer in list(self.observers):
            try:
                observer(subject)
            except Exception:
                logger.exception("observer %r failed; it is dropped", observer)
                self.observers.remove(observer)

    def _finish(self, future: Future, task: TaskRecord) -> None:
        event = {
            "task": task.task_id,
            "kind": task.kind,
            "module": task.module,
            "submitted": task.submitted,
            "returned": time.time(),
        }
        agent = self._agents[task.kind]
        try:
            result = future.result()
        except Exception as error:  # a task failure is recorded, never fatal by itself...
            self.errors.error(task.kind, f"{task.kind} task {task.task_id} failed", error, False)
            self.events.append_event({**event, "ok": False, "error": describe_error(error)})
            self._failed(agent, task, error)
            return
        event.update(ok=True, started=result.get("t_start"), ended=result.get("t_end"))
        event.update({key: result.get(key) for key in ("host", "slurm_job_id", "slurm_partition")})
        event.update(result.get("event") or {})  # what an app says of its task
        self.events.append_event(event)
        try:
            agent.on_result(task, result)
        except Exception as error:  # an unusable result costs its task, and counts as failed
            headline = f"{task.kind} task {task.task_id}: its result could not be used"
            self.errors.error(f"{task.kind} result", headline, error, True)
            self.events.append_event({**event, "ok": False, "error": f"result unusable: {error}"})
            self._failed(agent, task, error)
            return
        self.outcomes.task_succeeded(task, result)

    def _failed(self, agent: Agent, task: TaskRecord, error: BaseException) -> None:
        try:
            agent.on_failure(task, error)
        except Exception as handler_error:  # still counted as the task's failure below
            headline = f"{task.kind} task {task.task_id}: its failure could not be handled"
            self.errors.error(f"{task.kind} failure", headline, handler_error, True)
        self.outcomes.task_failed(task, error)
