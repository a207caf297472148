"""Labels: from an oracle batch's result file into ``labels.db`` and the label log.

This is the middle of one label's route. The oracle agent
(:mod:`palflow.pipeline.engine.agents.oracle`) sends a batch and, once it returns,
calls :meth:`LabelStore.harvest`; the good labels go into ``labels.db`` in one
transaction, then are appended to the label log (:mod:`palflow.apps.data.label_log`),
and the training snapshot becomes the log's newest rows
(:meth:`LabelStore.write_snapshot`): a range, never a copy, which the next training
task (:mod:`palflow.apps.training`) reads.

``labels.db`` is the campaign's record; the log is what tasks read, and a resume
mends it from the database (:meth:`LabelStore.restore_labels`): it appends the rows
the log lacks (a kill between the two writes, or a run directory of a version
without a log), and rebuilds it when it does not match.
"""

from __future__ import annotations

import logging
from collections import Counter

from ase import Atoms

from palflow.apps.data.dataset import read_arrays, structures_from_arrays
from palflow.apps.data.label_log import LabelLog, LabelLogError, read_selection
from palflow.pipeline.config.settings import Campaign
from palflow.pipeline.state.records import Snapshot, is_initial
from palflow.pipeline.state.rundir import RunDirectory

logger = logging.getLogger(__name__)


class LabelStore:
    """The labels part of :class:`~palflow.pipeline.state.campaign_state.CampaignState`.

    In memory: the candidate ids labelled, and counts. The structures stay on disk.
    """

    campaign: Campaign
    run: RunDirectory
    label_log: LabelLog | None
    labelled_ids: set[int]
    n_labels_active: int
    n_labels_initial: int
    active_by_system: Counter[str]
    train_snapshot: Snapshot | None

    @property
    def n_labels_total(self) -> int:
        return len(self.label_log) if self.label_log is not None else 0

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
        structures = structures_from_arrays(answered)
        good, metadata, failed, taken = [], [], [], set()
        for index, atoms in enumerate(structures):
            candidate_id = int(answered["candidate_id"][index])
            status = str(answered["status"][index])
            if status != "ok":
                failed.append((candidate_id, status))
                continue
            if candidate_id in self.labelled_ids or candidate_id in taken:
                continue
            taken.add(candidate_id)
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
        # Both files read whole: a resume need not read them again unless they change.
        self.run.note_checked(RunDirectory.batch_input_of(out_path), out_path)
        return len(good), failed

    def add_labels(self, structures: list[Atoms], metadata: list[dict]) -> None:
        """Store new labels: ``labels.db`` first (the record), then the label log, and
        the training snapshot that includes them."""
        if not structures:
            return
        self.run.store_labels(structures, metadata)
        self._log().append(structures, [_log_fields(m) for m in metadata])
        self._count(metadata)
        self.write_snapshot()

    def _log(self) -> LabelLog:
        if self.label_log is None:
            self.label_log = LabelLog.create(self.run.label_log)
        return self.label_log

    def _count(self, metadata: list[dict]) -> None:
        for m in metadata:
            self.labelled_ids.add(int(m["candidate_id"]))
            if is_initial(m["source"]):
                self.n_labels_initial += 1
            else:
                self.n_labels_active += 1
                self.active_by_system[m.get("system", "")] += 1

    def restore_labels(self) -> None:
        """On resume: open the label log, mend it from ``labels.db``, and take its
        ids and counts (no structure is read, and no snapshot written)."""
        stored = self.run.stored_candidate_ids()
        self.label_log = _mended_log(self.run, stored)
        log = self.label_log
        names = log.system_names()
        for candidate_id, initial, system in zip(
            log.column("candidate_id"), log.column("initial"), names, strict=True
        ):
            self.labelled_ids.add(candidate_id)
            if initial:
                self.n_labels_initial += 1
            else:
                self.n_labels_active += 1
                self.active_by_system[system] += 1

    def labelled_structures(self, start: int = 0, stop: int | None = None) -> list[Atoms]:
        """Labels ``[start, stop)`` read back from the log (for what needs the
        structures themselves, once: a model's spec, the diversity measures)."""
        if self.label_log is None:
            return []
        stop = len(self.label_log) if stop is None else stop
        return read_selection(self.label_log.selection(start, stop, "all", 0.0))

    def write_snapshot(self) -> None:
        """Make the training snapshot the log's labels so far (or its newest
        ``training.rolling_window``), split by each label's content into training and
        validation rows: a resumed run and a warm start from this run's labels keep
        each label on its side."""
        if self.label_log is None or not len(self.label_log):
            return
        settings = self.campaign.training
        log, total = self.label_log, len(self.label_log)
        start = max(0, total - (settings.rolling_window or total))
        fraction = settings.validation_fraction
        n_valid = log.count_valid(start, total, fraction)
        valid = None
        if 0 < n_valid < total - start:  # all validation labels: none is (all train)
            valid = log.selection(start, total, "valid", fraction)
        train = log.selection(start, total, "train", fraction)
        self.train_snapshot = Snapshot(train, valid, total)


def _log_fields(metadata: dict) -> dict:
    """What the label log keeps of a label's ``labels.db`` fields."""
    return {
        "candidate_id": int(metadata["candidate_id"]),
        "initial": is_initial(metadata["source"]),
        "system": metadata.get("system", "") or "",
    }


def _mended_log(run: RunDirectory, stored: list[int]) -> LabelLog:
    """The run's label log, matching ``stored`` (the candidate ids of ``labels.db``,
    in row order): opened, completed with the rows it lacks, or made again from the
    database when it is missing (a run of an earlier version), damaged or different."""
    folder = run.label_log
    try:
        log = LabelLog.open(folder)
        have = log.column("candidate_id")
        if len(have) > len(stored) or have != stored[: len(have)]:
            raise LabelLogError(f"{folder.name}/ does not match labels.db")
    except LabelLogError as error:
        if (folder / "log.json").exists():  # mend_label_log moves a damaged one aside
            logger.warning("resume: the label log %s: it is made again from labels.db", error)
        elif stored and any(folder.parent.glob("train.*.npz")):
            logger.info(
                "resume: this run of an earlier version keeps its labels in labels.db "
                "and data/train.*.npz; its %d labels go into the label log data/labels/, "
                "once (the data/train.*.npz files are no longer read, and may be deleted)",
                len(stored),
            )
        log = LabelLog.create(folder)
    missing = len(stored) - len(log)
    if missing > 0:
        rows = run.labels().select(sort="id", offset=len(log))
        structures, metadata = [], []
        for row in rows:
            structures.append(row.toatoms())
            metadata.append(_log_fields(dict(row.key_value_pairs)))
        log.append(structures, metadata)
        logger.info("resume: %d labels of labels.db appended to the label log", missing)
    return log
