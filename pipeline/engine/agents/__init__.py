"""One agent per module: what it submits now, and what its results change.

==========  =================  ===============================================================
agent       task kinds         on completion
==========  =================  ===============================================================
oracle      label, reference   labels enter ``labels.db`` and the next training snapshot;
                               failed structures are tried again or recorded; the held-out
                               set exists
generator   generate           frames the selection picks enter the oracle queue; each walker
                               moves on, or is reset when it blew up
training    train              the member's checkpoint advances; once every member has, a new
                               ensemble version is published
inference   score, evaluate    the oracle queue is re-scored with the newer ensemble; the test
                               errors of a version are recorded
==========  =================  ===============================================================

Agents share one :class:`Context`; they never call each other. The engine
(:mod:`palflow.pipeline.engine.core`) routes each finished task to the agent of its kind.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from palflow.apps.contracts import CalculatorSpec, Request
from palflow.pipeline.config.settings import Campaign
from palflow.pipeline.engine.core import Engine, TaskRecord
from palflow.pipeline.engine.stopping import StopPolicy
from palflow.pipeline.policies.selection import OracleQueue
from palflow.pipeline.policies.strategies import Selector
from palflow.pipeline.state.campaign_state import CampaignState
from palflow.pipeline.state.rundir import RunDirectory


@dataclass
class Context:
    """What every agent reads and changes: the campaign's settings, files and state."""

    campaign: Campaign
    run: RunDirectory
    state: CampaignState
    queue: OracleQueue
    selector: Selector
    policy: StopPolicy
    engine: Engine
    apps: Any
    """:class:`palflow.pipeline.engine.coordinator.Apps`: how each kind of task is submitted."""
    oracle: CalculatorSpec
    """The campaign's oracle on this site, as every oracle task (and the members' spec,
    for isolated-atom energies) takes it; built once, by the coordinator."""

    def submit(self, record: TaskRecord, request: Request, **options: Any) -> None:
        """Submit ``request`` to its app as the task ``record``."""
        call: Callable[..., Future] = getattr(self.apps, request.app)
        self.engine.submit(record, call, **request.kwargs(), **options)


from palflow.pipeline.engine.agents.generator import GeneratorAgent  # noqa: E402
from palflow.pipeline.engine.agents.inference import InferenceAgent  # noqa: E402
from palflow.pipeline.engine.agents.oracle import OracleAgent  # noqa: E402
from palflow.pipeline.engine.agents.training import TrainingAgent  # noqa: E402

__all__ = ["Context", "GeneratorAgent", "InferenceAgent", "OracleAgent", "TrainingAgent"]
