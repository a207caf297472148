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
(:mod:`pipeline.engine`) routes each finished task to the agent of its kind.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from apps.contracts import Request
from pipeline.campaign_state import CampaignState
from pipeline.engine import Engine, TaskRecord
from pipeline.rundir import RunDirectory
from pipeline.selection import OracleQueue
from pipeline.settings import Campaign
from pipeline.stopping import StopPolicy
from pipeline.strategies import Selector


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
    """:class:`pipeline.coordinator.Apps`: how each kind of task is submitted."""

    def submit(self, record: TaskRecord, request: Request, **options: Any) -> None:
        """Submit ``request`` to its app as the task ``record``."""
        call: Callable[..., Future] = getattr(self.apps, request.app)
        self.engine.submit(record, call, **request.kwargs(), **options)


from pipeline.agents.generator import GeneratorAgent  # noqa: E402
from pipeline.agents.inference import InferenceAgent  # noqa: E402
from pipeline.agents.oracle import OracleAgent  # noqa: E402
from pipeline.agents.training import TrainingAgent  # noqa: E402

__all__ = ["Context", "GeneratorAgent", "InferenceAgent", "OracleAgent", "TrainingAgent"]
