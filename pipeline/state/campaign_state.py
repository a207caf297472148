"""What a campaign knows at any moment: labels, walkers, members, ensemble versions.

The coordinator decides what to submit; this module holds the bookkeeping that
those decisions read, and writes the files that other tasks consume (training
snapshots, stacked ensemble checkpoints).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import read, write
from palflow.apps.contracts import MODULES, failure_counts
from palflow.apps.data.dataset import read_arrays, read_dataset, write_dataset
from palflow.pipeline.config.settings import Campaign
from palflow.pipeline.policies.metrology import learning_curve_area
from palflow.pipeline.policies.selection import Candidate
from palflow.pipeline.state.metrics import busy_fractions, concurrency_fraction
from palflow.pipeline.state.rundir import RunDirectory
from palflow.pipeline.state.structures import (  # noqa: F401 (re-exported: their home was here)
    element_carrier,
    load_start_structure,
    load_start_structures,
    read_labelled_file,
)

logger = logging.getLogger(__name__)


@dataclass
class Walker:
    """One MD walker; it moves on from its last sound frame, or resets to its home,
    its system's start configuration."""

    walker_id: int
    start_path: str
    busy: bool = False
    segments: int = 0
    resets: int = 0
    system: str = ""
    """The system it samples (empty in runs made before systems had names)."""
    home: str = ""
    """Where it resets to; empty: the campaign's start structure."""
    temperature_K: float | None = None
    """Its own temperature; None: its system's generator settings."""


@dataclass
class Member:
    """One ensemble member and the checkpoint its training has reached."""

    index: int
    checkpoint: str | None = None
    busy: bool = False
    tasks: int = 0
    epochs: int = 0
    trained_on: int = 0
    """Labels (initial and active) in the snapshot of its latest finished task."""
    fresh: bool = False
    """Advanced since the last published ensemble version."""

    def advance(self, checkpoint: str, labels: int, epochs: int) -> None:
        """Move to a newer checkpoint; the older one is in a stacked version already."""
        previous, self.checkpoint = self.checkpoint, checkpoint
        self.trained_on, self.epochs, self.fresh = labels, epochs, True
        if previous and previous != checkpoint and os.path.exists(previous):
            os.remove(previous)


@dataclass(frozen=True)
class Version:
    """A published ensemble: K member checkpoints stacked into one file."""

    number: int
    path: str
    n_labels: int
    """Active-learning labels when it was published."""
    wall_s: float


@dataclass(frozen=True)
class Snapshot:
    """A training snapshot: the labels one training task sees, as files."""

    train_path: str
    valid_path: str | None
    n_labels: int


INITIAL_SOURCES = ("initial", "file")
"""Sources of labels that count as initial, not against the active-label budget: the
rattled start structures, and a warm start's file (:mod:`palflow.pipeline.resume.warm_start`)."""


def is_initial(source: str) -> bool:
    return source in INITIAL_SOURCES


@dataclass
class CampaignState:
    """Bookkeeping of one campaign."""

    campaign: Campaign
    run: RunDirectory
    start: Atoms
    start_path: str
    walkers: list[Walker]
    members: list[Member]
    t0: float = field(default_factory=time.time)
    versions: list[Version] = field(default_factory=list)
    labelled: list[Atoms] = field(default_factory=list)
    label_ids: list[int] = field(default_factory=list)
    n_labels_active: int = 0
    n_labels_initial: int = 0
    failures: dict[int, str] = field(default_factory=dict)
    test_errors: list[dict[str, Any]] = field(default_factory=list)
    train_snapshot: Snapshot | None = None
    pending_initial: list[Candidate] = field(default_factory=list)
    stop_reason: str | None = None
    stop_time: float = 0.0
    test_ready: bool = False
    evaluated_version: int = 0
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
    def n_labels_total(self) -> int:
        return len(self.labelled)

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

    def model_spec(self, campaign: Campaign) -> dict[str, Any]:
        """The spec every member is built with, fixed at its first use (see
        :func:`palflow.pipeline.config.models.resolve_model_spec`)."""
        if self.resolved_model is None:
            from palflow.pipeline.config.models import resolve_model_spec

            spec = resolve_model_spec(campaign, self.labelled, self.elements())
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
        from palflow.pipeline.resume import warm_start

        if campaign.initial.file:
            frames = warm_start.read_warm_labels(campaign.initial.file, campaign, self.elements())
            metadata = [
                {"candidate_id": self.new_candidate_id(), "source": warm_start.SOURCE}
                for _ in frames
            ]
            self.add_labels(frames, metadata)
            logger.info("warm start: %d labels from %s", len(frames), campaign.initial.file)
        if campaign.initial.ensemble:
            paths = warm_start.warm_member_checkpoints(campaign, self.run.root / "models")
            for member, path in zip(self.members, paths, strict=True):
                member.checkpoint = path
            logger.info("warm start: members continue from %s", campaign.initial.ensemble)

    def use_test_file(self, path: str) -> None:
        """Take the held-out set from a labelled structure file."""
        write_dataset(self.run.test_set, read_labelled_file(path))
        self.test_ready = True

    def record_failure(self, candidate_id: int, reason: str) -> None:
        self.failures[candidate_id] = reason

    def harvest(self, out_path: str, oracle_task: int) -> tuple[int, list[tuple[int, str]]]:
        """Store the good labels of a finished oracle batch, each candidate id once.

        Returns
        -------
        tuple
            New labels stored, and ``(candidate_id, reason)`` of those that failed:
            whether they are tried again is the caller's decision.
        """
        asked = read_arrays(RunDirectory.batch_input_of(out_path))
        answered = read_arrays(out_path)
        structures = read_dataset(out_path)
        known = set(self.label_ids)
        good, metadata, failed = [], [], []
        for index, atoms in enumerate(structures):
            candidate_id = int(answered["candidate_id"][index])
            status = str(answered["status"][index])
            if status != "ok":
                failed.append((candidate_id, status))
                continue
            if candidate_id in known:
                continue
            good.append(atoms)
            metadata.append(
                {
                    "candidate_id": candidate_id,
                    "source": str(asked["source"][index]),
                    "oracle_task": oracle_task,
                    "scored_version": int(asked["version"][index]),
                    "system": str(asked["system"][index]) if "system" in asked else "",
                    "predicted_force_disagreement": float(asked["force_disagreement"][index]),
                }
            )
        self.add_labels(good, metadata)
        return len(good), failed

    def add_labels(self, structures: list[Atoms], metadata: list[dict]) -> None:
        """Store new labels and write the training snapshot that includes them."""
        if not structures:
            return
        self.run.store_labels(structures, metadata)
        self.labelled.extend(structures)
        self.label_ids.extend(m["candidate_id"] for m in metadata)
        initial = sum(is_initial(m["source"]) for m in metadata)
        self.active_by_system.update(
            m.get("system", "") for m in metadata if not is_initial(m["source"])
        )
        self.n_labels_initial += initial
        self.n_labels_active += len(structures) - initial
        self.write_snapshot()

    def write_snapshot(self) -> None:
        settings = self.campaign.training
        window = settings.rolling_window or len(self.labelled)
        structures = self.labelled[-window:]
        ids = np.asarray(self.label_ids[-window:])
        # A fixed hash of the candidate id keeps each label on one side for good.
        is_valid = (ids * 2654435761 % 1000) / 1000 < settings.validation_fraction
        if is_valid.all():
            is_valid[:] = False
        total = len(self.labelled)
        train_path, valid_path = self.run.train_snapshot(total)
        write_dataset(train_path, [s for s, v in zip(structures, is_valid, strict=True) if not v])
        if not is_valid.any():
            valid_path = None
        else:
            write_dataset(valid_path, [s for s, v in zip(structures, is_valid, strict=True) if v])
        self.train_snapshot = Snapshot(train_path, valid_path, total)

    def maybe_publish_version(self, final: bool = False) -> Version | None:
        """Stack the members into a new ensemble version once each has advanced.

        With ``final``, publish whatever members advanced, so the last labels of a
        stopped campaign reach the last version.
        """
        from palflow.apps.training import stack_member_checkpoints

        fresh = [m.fresh for m in self.members]
        if not any(fresh) or not all(m.checkpoint for m in self.members):
            return None
        if not (all(fresh) or final):
            return None
        number = len(self.versions) + 1
        path = self.run.ensemble(number)
        stack_member_checkpoints(
            [m.checkpoint for m in self.members],
            path,
            extra={
                "version": number,
                "labels": self.n_labels_active,
                "epochs": [m.epochs for m in self.members],
            },
        )
        for member in self.members:
            member.fresh = False
        version = Version(number, path, self.n_labels_active, time.time() - self.t0)
        self.versions.append(version)
        return version

    def record_test_error(
        self, version: Version, errors: dict[str, Any], metrics: dict[str, Any] | None = None
    ) -> None:
        """Keep a version's held-out errors, and the metrology's ``metrics`` besides."""
        self.test_errors.append(
            {
                **(metrics or {}),
                "version": version.number,
                "labels": version.n_labels,
                "wall_s": version.wall_s,
                "force_mae": errors["force_mae"],
                "force_rmse": errors.get("force_rmse"),
                "energy_mae_per_atom": errors.get("energy_mae_per_atom"),
            }
        )

    # ---------------------------------------------------------------- the end
    def summary(self, events: list[dict[str, Any]], slots: dict[str, int]) -> dict[str, Any]:
        """What ``summary.json`` says about the campaign."""
        t_end = time.time()
        kinds = failure_counts(self.failures.values())
        errors = sorted(self.test_errors, key=lambda e: e["version"])
        return {
            "campaign": self.campaign.name,
            "stop_reason": self.stop_reason or "nothing left to run",
            "labels": self.n_labels_active,
            "initial_labels": self.n_labels_initial,
            "oracle_failures": self.n_failures,
            "oracle_failures_by_kind": kinds,
            "oracle_retries_by_kind": dict(self.retried),
            "started_at": self.t0,
            "wall_s": t_end - self.t0,
            "stopped_at_s": self.stop_time - self.t0 if self.stop_reason else None,
            "versions": len(self.versions),
            "test_force_mae": [[e["labels"], e["wall_s"], e["force_mae"]] for e in errors],
            "test_errors": errors,
            # Mean test force MAE over the label range: one number per learning curve.
            "learning_curve_area": learning_curve_area(
                [e["labels"] for e in errors], [e["force_mae"] for e in errors]
            ),
            "busy_fraction": busy_fractions(events, self.t0, t_end),
            "all_modules_busy_fraction": concurrency_fraction(
                events, self.t0, t_end, tuple(m for m in MODULES if m != "infer")
            ),
            "slots": slots,
            "tasks": dict(Counter(e["module"] for e in events)),
            "failed_tasks": dict(Counter(e["module"] for e in events if not e["ok"])),
            "walker_resets": sum(w.resets for w in self.walkers),
            "resumes": self.resumes,
            # Per system: active labels, and the newest version's held-out errors.
            "systems": {
                system.name: {
                    "labels": self.active_by_system[system.name],
                    **(errors[-1].get("systems", {}).get(system.name, {}) if errors else {}),
                }
                for system in self.campaign.all_systems()
            },
        }
