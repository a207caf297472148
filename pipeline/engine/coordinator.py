"""The streaming coordinator: one campaign, every module busy at once.

It wires the pieces together and owns the campaign's life: start, resume, the stop
and the summary. What happens in between is theirs:

* :mod:`palflow.pipeline.engine.core` keeps tasks in flight and hands each result to an agent;
* :mod:`palflow.pipeline.engine.agents` decide, one per module, what to submit and what a result
  changes;
* :mod:`palflow.pipeline.engine.stopping` says when the campaign stops and what it still waits for,
  and :mod:`palflow.pipeline.engine.watchdog` stops one that cannot progress;
* :mod:`palflow.pipeline.state.campaign_state` holds the bookkeeping,
  :mod:`palflow.pipeline.resume.journal` saves it, and
  :mod:`palflow.pipeline.state.rundir` names every file.

Each turn of the loop checks the stop rules, lets every agent submit what free slots
allow (oracle, generator, training, inference, in that order), saves the journal and
calls the observers, then waits for the first task to finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, make_dataclass
from functools import partial
from typing import Any

from ase import Atoms
from ase.io import write

from palflow import apps
from palflow.apps import APPS, plain
from palflow.apps.contracts import REQUESTS, CalculatorSpec, failure_counts
from palflow.apps.models import registry
from palflow.pipeline.config.settings import Campaign
from palflow.pipeline.engine.agents import (
    Context,
    GeneratorAgent,
    InferenceAgent,
    OracleAgent,
    TrainingAgent,
)
from palflow.pipeline.engine.core import Engine
from palflow.pipeline.engine.stopping import StopPolicy
from palflow.pipeline.policies.selection import OracleQueue
from palflow.pipeline.policies.strategies import Selector
from palflow.pipeline.resume.journal import Journal
from palflow.pipeline.resume.restore import resume_state
from palflow.pipeline.state.campaign_state import CampaignState
from palflow.pipeline.state.rundir import SUMMARY_FILE, RunDirectory

logger = logging.getLogger(__name__)


def _parsl(cls: type) -> Any:
    """The Parsl apps, routed by executor label (wrapped on first use)."""
    return cls(**{name: getattr(apps, name) for name in CAMPAIGN_APPS})


def _from_executors(cls: type, executors: Mapping[str, Executor]) -> Any:
    """The plain app functions on standard-library executors, keyed by module."""
    return cls(
        **{
            name: partial(executors[APPS[name].executor].submit, plain(name))
            for name in CAMPAIGN_APPS
        }
    )


CAMPAIGN_APPS = tuple(name for name in APPS if name in {r.app for r in REQUESTS})
"""The apps a campaign submits: those a request of :mod:`palflow.apps.contracts` names."""

Apps = make_dataclass(
    "Apps",
    [(name, Callable[..., Future]) for name in CAMPAIGN_APPS],
    namespace={
        "__doc__": "How each kind of task is submitted, one field per app of the table "
        ":data:`palflow.apps.APPS`; every callable returns a Future and takes the keyword "
        "arguments of its request (:mod:`palflow.apps.contracts`).",
        "__module__": __name__,
        "parsl": classmethod(_parsl),
        "from_executors": classmethod(_from_executors),
    },
)


@dataclass(frozen=True)
class CampaignView:
    """A read-only look at a running campaign, for the live view."""

    name: str
    labels: int
    budget: int
    max_wall_s: float
    queue: int
    in_flight: dict[str, int]
    version: int | None
    """The newest ensemble version's number (0: the foundation), or None."""
    version_labels: int | None
    test_force_mae: float | None
    failures: dict[str, int]
    elapsed_s: float
    stop_reason: str | None
    systems: dict[str, dict[str, Any]] = field(default_factory=dict)
    """With several systems: per system, its active ``labels`` and newest ``force_mae``."""
    accurate: dict[str, float] = field(default_factory=dict)
    """Per system, the accurate share of its recent generator frames (once it has any)."""


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
    oracle_resources, mpi_command
        What the site says about MPI oracles (see
        :class:`~palflow.pipeline.engine.agents.OracleAgent`).
    state, queue, next_task_id
        Where to continue from (see :meth:`resume`); a new campaign by default.
    policy
        The stopping policy's class (:class:`~palflow.pipeline.engine.stopping.StopPolicy`).
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
        queue: OracleQueue | None = None,
        next_task_id: int = 0,
        policy: type[StopPolicy] = StopPolicy,
    ) -> None:
        self.campaign = campaign
        self.run_dir = run
        self.apps = apps
        # Heavy imports happen here, in the main thread, never while a task thread
        # is running: an oracle's forked child would inherit a held import lock.
        registry.backend(campaign.model.name).preload()
        self.state = state or CampaignState.new(campaign, run, start)
        self.queue = queue or OracleQueue(campaign.selection.max_queue)
        self.policy = policy(campaign, self.state)
        self.engine = Engine(slots, run, self.policy, poll_s, next_task_id)
        self.journal = Journal(run)
        self.selector = Selector(
            campaign, seed=[campaign.seed, len(self.state.versions)], cutoff=campaign.model.cutoff
        )
        self.context = Context(
            campaign,
            run,
            self.state,
            self.queue,
            self.selector,
            self.policy,
            self.engine,
            apps,
            oracle=CalculatorSpec.of(campaign.oracle, mpi_command),
        )
        self.oracle = OracleAgent(self.context, oracle_resources)
        self.generator = GeneratorAgent(self.context)
        self.training = TrainingAgent(self.context)
        self.inference = InferenceAgent(self.context)
        self.agents = [self.oracle, self.generator, self.training, self.inference]
        """In the order they submit each turn."""
        for agent in self.agents:
            self.engine.register(agent)
        self._resumed_at: float | None = None

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
        budgets count what earlier sessions spent (see :mod:`palflow.pipeline.resume.journal`).
        ``began_at`` is when the resume began (default: now), for the record of how
        long it took until the first new task.
        """
        state, queue, next_task_id = resume_state(campaign, run)
        coordinator = cls(
            campaign, run, apps, slots, state.start, state=state, queue=queue,
            next_task_id=next_task_id, **options,
        )  # fmt: skip
        if coordinator.selector.needs_descriptors:  # the diversity measures' reference
            coordinator.selector.note_labelled(state.labelled_structures())
        coordinator._resumed_at = began_at or time.time()
        return coordinator

    # ------------------------------------------------------------------ public view
    @property
    def slots(self) -> dict[str, int]:
        return self.engine.slots

    @property
    def observers(self) -> list[Callable[[Coordinator], None]]:
        """Called once per turn with the coordinator (live view, report refresh)."""
        return self.engine.observers

    @observers.setter
    def observers(self, observers: list[Callable[[Coordinator], None]]) -> None:
        self.engine.observers = observers

    def view(self) -> CampaignView:
        """What the campaign has done so far."""
        state, campaign = self.state, self.campaign
        version = state.version
        return CampaignView(
            name=campaign.name,
            labels=state.n_labels_active,
            budget=campaign.stop.max_labels,
            max_wall_s=campaign.stop.max_wall_s,
            queue=len(self.queue),
            in_flight=self.engine.busy_counts(),
            version=version.number if version else None,
            version_labels=version.n_labels if version else None,
            test_force_mae=state.test_errors[-1]["force_mae"] if state.test_errors else None,
            failures=failure_counts(state.failures.values()),
            elapsed_s=time.time() - state.t0,
            stop_reason=state.stop_reason,
            systems={
                system.name: {
                    "labels": state.active_by_system[system.name],
                    "force_mae": (
                        state.test_errors[-1].get("systems", {}) if state.test_errors else {}
                    )
                    .get(system.name, {})
                    .get("force_mae"),
                }
                for system in campaign.systems
            },
            accurate={
                name: ratios["accurate"]
                for name, ratios in self.policy.exploration.ratios().items()
                if ratios["accurate"] is not None
            },
        )

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
            self.state.warm_start(self.campaign)
            self.state.pending_initial = self.state.initial_candidates(self.campaign)
        logger.info(
            "campaign %s %s in %s",
            self.campaign.name,
            "resumes" if self._resumed_at else "starts",
            self.run_dir.root,
        )
        self.begin()
        self.engine.run(self.turn, subject=self)
        return self.close()

    def begin(self) -> None:
        """Start the initial labels, then the held-out set; both need only the oracle.

        The first initial batches go first, so that training starts while the
        held-out set, which no other module waits for, is still being labelled.
        """
        self.oracle.submit_labels()
        self.oracle.submit_reference()

    def turn(self) -> bool:
        """One turn of the loop; returns whether to wait for the tasks in flight."""
        self.policy.check()
        self.submit_ready()
        self._note_resume_cost()
        self.journal.save(self.state, self.queue, self.engine)
        return self.policy.keep_waiting(self.engine)

    def submit_ready(self) -> None:
        """Let every agent submit what its free slots allow."""
        stopping = self.policy.stopping
        for agent in self.agents:
            agent.submit_ready(stopping)

    def _note_resume_cost(self) -> None:
        """Record, once, how long a resume took until its first task was submitted."""
        if self._resumed_at is None:
            return
        tasks = self.engine.tasks()
        if not tasks:
            return
        first = min(task.submitted for task in tasks)
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

    def close(self) -> dict[str, Any]:
        """Save everything, write ``summary.json`` and the exports; return the summary."""
        self.journal.save(self.state, self.queue, self.engine, force=True)
        self.run_dir.close()
        summary = self.state.summary(self.run_dir.read_events(), self.slots)
        summary.update(self.policy.verdict(summary))  # failed, failure, exit_status
        self.run_dir.write_json(SUMMARY_FILE, summary)
        self.run_dir.export_extxyz()
        write(
            self.run_dir.queue_at_stop,
            [c.atoms for c in self.queue.candidates()] or [],
            format="extxyz",
        )
        logger.info("campaign stopped: %s", summary["stop_reason"])
        if summary["failed"]:
            logger.error("campaign failed: %s", summary["failure"])
        return summary
