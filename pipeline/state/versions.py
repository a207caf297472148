"""Ensemble versions: stacking the members into a new version, and its held-out errors."""

from __future__ import annotations

import logging
import time
from typing import Any

from palflow.apps.models import registry
from palflow.pipeline.state.records import Member, Version
from palflow.pipeline.state.rundir import RunDirectory

logger = logging.getLogger(__name__)


class VersionPublisher:
    """The versions part of :class:`~palflow.pipeline.state.campaign_state.CampaignState`."""

    run: RunDirectory
    members: list[Member]
    versions: list[Version]
    n_labels_active: int
    t0: float
    test_errors: list[dict[str, Any]]

    def maybe_publish_version(self, final: bool = False) -> Version | None:
        """Stack the members into a new ensemble version once each has advanced.

        With ``final``, publish whatever members advanced, so the last labels of a
        stopped campaign reach the last version.
        """
        fresh = [m.fresh for m in self.members]
        if not any(fresh) or not all(m.checkpoint for m in self.members):
            return None
        if not (all(fresh) or final):
            return None
        # Stacking loads the checkpoints with torch, which the coordinator imports
        # only once it publishes.
        from palflow.apps.training import stack_member_checkpoints

        number = self.versions[-1].number + 1 if self.versions else 1
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
        version = Version(
            number,
            path,
            self.n_labels_active,
            time.time() - self.t0,
            held_back=sum(m.held_back for m in self.members),
            val_force_mae=_mean_validation(self.members, "force_mae"),
            val_energy_mae_per_atom=_mean_validation(self.members, "energy_mae_per_atom"),
            n_validation=min((m.validation or {}).get("n", 0) for m in self.members),
        )
        self.versions.append(version)
        return version

    def publish_foundation(self, spec: dict[str, Any], seeds: list[int]) -> Version:
        """Publish version 0: the K members as each first trains from the foundation
        (its weights, the member's readout perturbation, the energy reference refitted
        to the labels so far), before any gradient step. It drives the first walkers,
        and its held-out error is the foundation's zero-shot error."""
        from palflow.apps.models.core import save_checkpoint

        backend = registry.backend(spec["name"])
        labelled = self.labelled_structures()
        members = [backend.new_member(spec, labelled, seed, device="cpu") for seed in seeds]
        ensemble = type(members[0]).stack(members).eval()
        path = self.run.ensemble(0)
        save_checkpoint(path, ensemble, {"version": 0, "labels": 0, "zero_shot": True})
        backend.export(ensemble, str(path).removesuffix(".pt"))
        version = Version(0, path, self.n_labels_active, time.time() - self.t0)
        self.versions.append(version)
        return version

    def record_test_error(
        self, version: Version, errors: dict[str, Any], metrics: dict[str, Any] | None = None
    ) -> None:
        """Keep a version's row of metrics: its held-out errors (None without a
        held-out set), and the metrology's ``metrics`` besides."""
        self.test_errors.append(
            {
                **(metrics or {}),
                "version": version.number,
                "labels": version.n_labels,
                "wall_s": version.wall_s,
                "force_mae": errors.get("force_mae"),
                "force_rmse": errors.get("force_rmse"),
                "energy_mae_per_atom": errors.get("energy_mae_per_atom"),
                "val_force_mae": version.val_force_mae,
                "val_energy_mae_per_atom": version.val_energy_mae_per_atom,
                "held_back": version.held_back,
                "n_validation": version.n_validation,
            }
        )


def _mean_validation(members: list[Member], key: str) -> float | None:
    """The members' mean validation error ``key``, or None where one has none."""
    values = [(m.validation or {}).get(key) for m in members]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)
