"""Labels: from an oracle batch's result file into ``labels.db`` and the training snapshot.

This is the middle of one label's route. The oracle agent
(:mod:`palflow.pipeline.engine.agents.oracle`) sends a batch and, once it returns,
calls :meth:`LabelStore.harvest`; the good labels go into ``labels.db`` in one
transaction and into a new training snapshot (:meth:`LabelStore.write_snapshot`),
whose files :mod:`palflow.pipeline.state.rundir` names and the next training task
(:mod:`palflow.apps.training`) reads.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
from ase import Atoms

from palflow.apps.data.dataset import read_arrays, read_dataset, structure_key, write_dataset
from palflow.pipeline.config.settings import Campaign
from palflow.pipeline.state.records import Snapshot, is_initial
from palflow.pipeline.state.rundir import RunDirectory

logger = logging.getLogger(__name__)


class LabelStore:
    """The labels part of :class:`~palflow.pipeline.state.campaign_state.CampaignState`."""

    campaign: Campaign
    run: RunDirectory
    labelled: list[Atoms]
    label_ids: list[int]
    n_labels_active: int
    n_labels_initial: int
    active_by_system: Counter[str]
    train_snapshot: Snapshot | None

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

    def restore_labels(self) -> None:
        """Read back every label of ``labels.db``, on resume (no snapshot is written)."""
        if not self.run.labels_db.exists():
            return
        for row in self.run.labels().select(sort="id"):
            self.labelled.append(row.toatoms())
            self.label_ids.append(int(row.candidate_id))
            if is_initial(row.source):
                self.n_labels_initial += 1
            else:
                self.n_labels_active += 1
                self.active_by_system[row.get("system", "")] += 1

    def write_snapshot(self) -> None:
        """Write the training and validation files of every label so far (or of the
        newest ``training.rolling_window``)."""
        settings = self.campaign.training
        window = settings.rolling_window or len(self.labelled)
        structures = self.labelled[-window:]
        # A hash of each label's content keeps it on one side for good, in a resumed
        # run and in a warm start from this run's labels too.
        keys = np.array([structure_key(atoms) % 1000 for atoms in structures])
        is_valid = keys / 1000 < settings.validation_fraction
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
