"""What a campaign knows at any moment: labels, walkers, members, ensemble versions.

The coordinator decides what to submit; :class:`CampaignState` holds the bookkeeping
that those decisions read. It is one dataclass assembled from parts, each in its
own module:

* :mod:`palflow.pipeline.state.records`: the walker, member, version and snapshot
  records it keeps;
* :mod:`palflow.pipeline.state.labels`: harvesting an oracle batch into
  ``labels.db`` and the label log, and the training snapshot (rows of the log);
* :mod:`palflow.pipeline.state.versions`: publishing ensemble versions and keeping
  their held-out errors;
* :mod:`palflow.pipeline.state.summary`: ``summary.json``.

This module keeps the state itself: a new campaign's walkers and members, the
queries, the initial candidates and the warm start.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import read, write

from palflow.apps.contracts import CalculatorSpec
from palflow.apps.data.dataset import write_dataset
from palflow.apps.data.label_log import LabelLog
from palflow.pipeline.config.models import resolve_model_spec
from palflow.pipeline.config.settings import Campaign
from palflow.pipeline.policies.selection import Candidate
from palflow.pipeline.resume.warm_start import SOURCE as WARM_SOURCE
from palflow.pipeline.resume.warm_start import read_warm_labels, warm_member_checkpoints
from palflow.pipeline.state.labels import LabelStore
from palflow.pipeline.state.records import Member, Snapshot, Version, Walker
from palflow.pipeline.state.rundir import RunDirectory
from palflow.pipeline.state.structures import (
    element_carrier,
    load_start_structures,
    read_labelled_file,
)
from palflow.pipeline.state.summary import CampaignSummary
from palflow.pipeline.state.versions import VersionPublisher

logger = logging.getLogger(__name__)


@dataclass
class CampaignState(LabelStore, VersionPublisher, CampaignSummary):
    """Bookkeeping of one campaign."""

    campaign: Campaign
    run: RunDirectory
    start: Atoms
    start_path: str
    walkers: list[Walker]
    members: list[Member]
    t0: float = field(default_factory=time.time)
    versions: list[Version] = field(default_factory=list)
    label_log: LabelLog | None = None
    """Every label, on disk (:mod:`palflow.apps.data.label_log`); made by the first."""
    labelled_ids: set[int] = field(default_factory=set)
    n_labels_active: int = 0
    n_labels_initial: int = 0
    failures: dict[int, str] = field(default_factory=dict)
    test_errors: list[dict[str, Any]] = field(default_factory=list)
    train_snapshot: Snapshot | None = None
    pending_initial: list[Candidate] = field(default_factory=list)
    stop_reason: str | None = None
    stop_time: float = 0.0
    test_ready: bool = False
    evaluated_version: int = -1
    rescored_version: int = 0
    last_candidate_id: int = 0
    resumes: list[dict[str, Any]] = field(default_factory=list)
    resolved_model: dict[str, Any] | None = None
    """The members' spec, once fixed (:meth:`model_spec`)."""
    active_by_system: Counter[str] = field(default_factory=Counter)
    """Active labels per system name."""
    retried: Counter[str] = field(default_factory=Counter)
    """Oracle attempts that failed transiently and were tried again, by kind."""

    @classmethod
    def new(cls, campaign: Campaign, run: RunDirectory, start: Atoms) -> CampaignState:
        """A new campaign's state. With one ``[system]``, ``start`` is its start
        structure (a file's further frames are read from it); with ``[[systems]]``
        every start structure is read from the systems, and the first system's first
        is the campaign's ``start``."""
        walkers = []
        frames_of = {
            system.name: load_start_structures(system.structure, system.vacuum)
            for system in campaign.all_systems()
        }
        if campaign.systems:
            start = next(iter(frames_of.values()))[0]
        else:
            frames_of[campaign.system.name][0] = start
        start_path = run.start_structure
        write(start_path, start, format="extxyz")
        for system in campaign.all_systems():
            frames = frames_of[system.name]
            homes = []
            for k, atoms in enumerate(frames):
                path = run.system_start(system.name, k)
                write(path, atoms, format="extxyz")
                homes.append(path)
            temperatures = system.temperatures_K or [None]
            for i in range(system.n_walkers or campaign.generator.n_walkers):
                home = homes[i % len(homes)]
                walkers.append(
                    Walker(
                        len(walkers),
                        home,
                        system=system.name,
                        home=home,
                        temperature_K=temperatures[i % len(temperatures)],
                    )  # fmt: skip
                )
        return cls(
            campaign=campaign,
            run=run,
            start=start,
            start_path=start_path,
            walkers=walkers,
            members=[Member(i) for i in range(campaign.model.n_members)],
        )

    # ---------------------------------------------------------------- queries
    @property
    def version(self) -> Version | None:
        """The newest published ensemble."""
        return self.versions[-1] if self.versions else None

    @property
    def n_failures(self) -> int:
        return len(self.failures)

    def label_room(self, campaign: Campaign, in_flight: int) -> int:
        """Active labels that may still be requested within the budget."""
        return campaign.stop.max_labels - self.n_labels_active - in_flight

    def elements(self) -> Atoms:
        """One structure holding the elements of every system's start structures."""
        homes = dict.fromkeys(w.home for w in self.walkers if w.home)
        return element_carrier([self.start, *(read(path) for path in homes)])

    def model_spec(self, campaign: Campaign, oracle: CalculatorSpec) -> dict[str, Any]:
        """The spec every member is built with, fixed at its first use (see
        :func:`palflow.pipeline.config.models.resolve_model_spec`; ``oracle`` is the
        campaign's oracle on this site)."""
        if self.resolved_model is None:
            labelled = self.labelled_structures()
            spec = resolve_model_spec(campaign, labelled, self.elements(), oracle)
            if spec.get("foundation"):
                # Workers read the run's own copy: the run directory is where every
                # node looks, and the user's file may move or change.
                shutil.copyfile(spec["foundation"], self.run.foundation_model)
                spec["foundation"] = self.run.foundation_model
            self.resolved_model = spec
        return self.resolved_model

    # ---------------------------------------------------------------- changes
    def new_candidate_id(self) -> int:
        self.last_candidate_id += 1
        return self.last_candidate_id

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            logger.info("stopping: %s", reason)
            self.stop_reason = reason
            self.stop_time = time.time()

    def initial_candidates(self, campaign: Campaign) -> list[Candidate]:
        """Each system's start configurations and rattled copies of them,
        ``initial.n_structures`` per system, labelled before any training; none with a
        warm start from labelled structures (``initial.file``)."""
        if campaign.initial.file:
            return []
        rng = np.random.default_rng(campaign.seed)
        candidates = []
        for system in campaign.all_systems():
            homes = list(dict.fromkeys(w.home for w in self.walkers if w.system == system.name))
            starts = [read(path) for path in homes] or [self.start]
            for index in range(campaign.initial.n_structures):
                atoms = starts[index % len(starts)].copy()
                if index >= len(starts):
                    noise = rng.normal(0.0, campaign.initial.rattle, atoms.positions.shape)
                    atoms.positions += noise
                candidates.append(
                    Candidate(
                        self.new_candidate_id(), atoms, float("inf"), 0.0, 0, system=system.name
                    )  # fmt: skip
                )
        return candidates

    def warm_start(self, campaign: Campaign) -> None:
        """Take ``initial.file``'s labels and ``initial.ensemble``'s members, once, at
        the start of a run (resume finds both in the run directory)."""
        if campaign.initial.file:
            frames = read_warm_labels(campaign.initial.file, campaign, self.elements())
            metadata = [
                {"candidate_id": self.new_candidate_id(), "source": WARM_SOURCE} for _ in frames
            ]
            self.add_labels(frames, metadata)
            logger.info("warm start: %d labels from %s", len(frames), campaign.initial.file)
        if campaign.initial.ensemble:
            paths = warm_member_checkpoints(campaign, self.run.root / "models")
            for member, path in zip(self.members, paths, strict=True):
                member.checkpoint = path
            logger.info("warm start: members continue from %s", campaign.initial.ensemble)

    def use_test_file(self, path: str) -> None:
        """Take the held-out set from a labelled structure file."""
        write_dataset(self.run.test_set, read_labelled_file(path))
        self.test_ready = True

    def record_failure(self, candidate_id: int, reason: str) -> None:
        self.failures[candidate_id] = reason
