"""Which frames to label, and in what order: selection rules and the oracle queue."""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ase import Atoms

from palflow.apps.contracts import FailureKind

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A structure waiting for the oracle, with the uncertainty that put it there."""

    candidate_id: int
    atoms: Atoms
    force_disagreement: float
    """Largest atomic force spread across the ensemble, eV/Å."""
    energy_disagreement: float
    """Ensemble energy spread, eV/atom."""
    version: int
    """Ensemble version that produced the scores."""
    attempts: int = 0
    """Oracle attempts that failed transiently so far."""
    priority: float | None = None
    """Place in the queue, highest first, when the measure is not the force spread
    (e.g. a random draw); None ranks by ``force_disagreement``. ``math.inf`` pins it
    at the front: re-scoring neither re-ranks nor drops it (the frames of a failed
    MD check, queued on a resume)."""
    system: str = ""
    """The system it belongs to (``[[systems]]``); empty in runs made before."""

    @property
    def rank(self) -> float:
        """What orders the queue."""
        return self.force_disagreement if self.priority is None else self.priority


def retry_allowed(candidate: Candidate, reason: str, max_attempts: int) -> bool:
    """Whether a failed structure gets another oracle attempt: a transient failure,
    with attempts left of ``max_attempts`` (the campaign's ``oracle.max_attempts``)."""
    transient = FailureKind.of(reason).transient
    return transient and candidate.attempts + 1 < max_attempts


def select_frames(
    force_disagreement: Sequence[float],
    threshold: float,
    max_picks: int,
    min_gap: int,
) -> list[int]:
    """Pick frame indices of one trajectory worth labelling.

    Frames above ``threshold`` are taken most uncertain first. A frame closer than
    ``min_gap`` frames to one already taken is skipped, so that consecutive, nearly
    identical MD frames do not fill a batch.

    Returns
    -------
    list of int
        Picked indices, most uncertain first, at most ``max_picks`` of them.
    """
    order = sorted(
        (i for i, value in enumerate(force_disagreement) if value > threshold),
        key=lambda i: force_disagreement[i],
        reverse=True,
    )
    picked: list[int] = []
    for index in order:
        if len(picked) == max_picks:
            break
        if all(abs(index - other) >= min_gap for other in picked):
            picked.append(index)
    return picked


class OracleQueue:
    """Candidates ordered by their rank (the force disagreement by default), highest
    first.

    The queue is bounded: past ``max_size`` the least uncertain candidate is dropped.
    When a newer ensemble re-scores the queue (PAL's dynamic oracle list) candidates
    that fell below the threshold leave it and the rest are re-ordered.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._items: dict[int, Candidate] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, candidate_id: int) -> bool:
        return candidate_id in self._items

    def candidates(self) -> list[Candidate]:
        """All queued candidates, highest rank first."""
        return sorted(self._items.values(), key=lambda c: c.rank, reverse=True)

    def push(self, candidate: Candidate) -> list[Candidate]:
        """Add a candidate; return those evicted to respect ``max_size``."""
        self._items[candidate.candidate_id] = candidate
        evicted = []
        while len(self._items) > self.max_size:
            lowest = min(self._items.values(), key=lambda c: c.rank)
            evicted.append(self._items.pop(lowest.candidate_id))
        return evicted

    def pop_batch(self, size: int) -> list[Candidate]:
        """Remove and return the ``size`` highest-ranked candidates."""
        batch = heapq.nlargest(size, self._items.values(), key=lambda c: c.rank)
        for candidate in batch:
            del self._items[candidate.candidate_id]
        return batch

    def remove(self, candidate_ids: Sequence[int]) -> list[Candidate]:
        """Remove and return the candidates with these ids, in that order."""
        return [self._items.pop(i) for i in candidate_ids]

    def rescore(
        self,
        scores: Mapping[int, tuple[float, ...]],
        version: int,
        threshold: float,
    ) -> list[Candidate]:
        """Apply scores from ensemble ``version``; drop candidates now below threshold.

        Scores from an ensemble older than the one a candidate was scored with are
        ignored, so a slow re-score never overwrites a fresher one.

        Parameters
        ----------
        scores
            ``candidate_id -> (force_disagreement eV/Å, energy_disagreement eV/atom)``,
            optionally followed by the selection measure's score, which then sets the
            candidate's priority and meets the threshold (else the force spread
            does). Ids no longer queued (already sent to the oracle) are ignored.

        Returns
        -------
        list of Candidate
            Those dropped because they are no longer uncertain.
        """
        dropped = []
        for candidate_id, (force, energy, *score) in scores.items():
            candidate = self._items.get(candidate_id)
            if candidate is None or candidate.version > version or candidate.priority == math.inf:
                continue
            candidate.force_disagreement = force
            candidate.energy_disagreement = energy
            candidate.version = version
            if score:
                candidate.priority = float(score[0])
            if candidate.rank <= threshold:
                dropped.append(self._items.pop(candidate_id))
        return dropped

    def extend(self, candidates: Iterable[Candidate]) -> list[Candidate]:
        """Push several candidates; return all evicted."""
        evicted = []
        for candidate in candidates:
            evicted.extend(self.push(candidate))
        return evicted
