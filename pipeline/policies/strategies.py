"""Selection strategies: the campaign's measure, thresholds and query, in one object.

:class:`Selector` is what the coordinator asks:

- :meth:`Selector.score` — a score per frame with the campaign's measure
  (:mod:`palflow.pipeline.policies.measures`);
- :meth:`Selector.threshold` — the lower trust level now: fixed, a percentile of
  recent scores, or calibrated against the errors on the validation labels (never
  the held-out test set, which is only reported);
- :meth:`Selector.out_of_domain` — the upper trust level;
- :meth:`Selector.pick_batch` — the next oracle batch from the queue, by the
  query (:class:`TopQuery`, :class:`CoresetQuery`, :class:`ClusterQuery` or the
  user's :class:`~palflow.pipeline.policies.protocols.Query`), with a share drawn at random.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import Atoms
from scipy.spatial.distance import cdist

from palflow.apps.common import import_object
from palflow.apps.errors import PluginError
from palflow.pipeline.config.settings import Campaign
from palflow.pipeline.policies.measures import (
    NEEDS_DESCRIPTORS,
    EnsemblePrediction,
    MeasureContext,
    descriptor,
    get_measure,
)
from palflow.pipeline.policies.protocols import Evaluation, Query, QueryContext
from palflow.pipeline.policies.selection import Candidate, OracleQueue

logger = logging.getLogger(__name__)


class TopQuery:
    """The highest-scored candidates (the default)."""

    def select(
        self, candidates: Sequence[Candidate], size: int, context: QueryContext
    ) -> list[Candidate]:
        return list(candidates[:size])


class CoresetQuery:
    """Farthest-point sampling (greedy coreset): each pick is the candidate farthest,
    in descriptor space, from the labelled set and from the picks before it."""

    def select(
        self, candidates: Sequence[Candidate], size: int, context: QueryContext
    ) -> list[Candidate]:
        if not candidates:
            return []
        points = context.descriptors([c.atoms for c in candidates])
        known = context.labelled_descriptors
        nearest = np.full(len(candidates), np.inf)
        if known is not None and len(known):
            nearest = cdist(points, known).min(axis=1)
        picked: list[int] = []
        for _ in range(min(size, len(candidates))):
            if np.isinf(nearest).all():  # nothing known yet: start from the top score
                choice = 0
            else:
                masked = nearest.copy()
                masked[picked] = -1.0
                choice = int(np.argmax(masked))
            picked.append(choice)
            nearest = np.minimum(nearest, cdist(points, points[choice : choice + 1])[:, 0])
        return [candidates[i] for i in picked]


class ClusterQuery:
    """Representative sampling: k-means of the queue's descriptors into ``size``
    clusters, and the highest-scored candidate of each."""

    def select(
        self, candidates: Sequence[Candidate], size: int, context: QueryContext
    ) -> list[Candidate]:
        if len(candidates) <= size:
            return list(candidates)
        from scipy.cluster.vq import kmeans2

        points = context.descriptors([c.atoms for c in candidates])
        seed = int(context.rng.integers(2**31))
        _, assignment = kmeans2(points, size, minit="++", seed=seed)
        best: dict[int, int] = {}
        for index, cluster in enumerate(assignment):  # candidates come best first
            best.setdefault(int(cluster), index)
        chosen = sorted(best.values())
        if len(chosen) < size:  # an empty cluster: fill with the next best
            chosen += [i for i in range(len(candidates)) if i not in best.values()][
                : size - len(chosen)
            ]
        return [candidates[i] for i in chosen]


QUERIES: dict[str, type] = {"top": TopQuery, "coreset": CoresetQuery, "cluster": ClusterQuery}
"""The built-in queries by name."""


def make_query(name: str) -> Query:
    """The query named ``name``, or an instance of the class at a ``module:Class`` path.

    Raises
    ------
    PluginError
        When the name is unknown, or the class has no ``select`` method.
    """
    if name in QUERIES:
        return QUERIES[name]()
    if ":" not in name:
        raise PluginError(
            f"unknown query {name!r}: built in are {', '.join(QUERIES)}, or give 'module:Class'"
        )

    obj = import_object(name)
    query = obj() if isinstance(obj, type) else obj
    if not isinstance(query, Query):
        raise PluginError(f"query {name!r} has no select(candidates, size, context) method")
    return query


class Selector:
    """The campaign's selection strategy (see the module's description).

    Parameters
    ----------
    campaign
        Its ``selection`` section decides everything here.
    seed
        Seed of the random numbers (random and Thompson measures, random share,
        k-means).
    cutoff
        Descriptor cutoff, Å (the model's).
    """

    def __init__(self, campaign: Campaign, seed: Any = 0, cutoff: float = 5.0) -> None:
        settings = campaign.selection
        self.settings = settings
        self.measure = get_measure(settings.measure)
        self.query = make_query(settings.query)
        self.rng = np.random.default_rng(seed)
        self.cutoff = cutoff
        self.needs_descriptors = settings.measure in NEEDS_DESCRIPTORS or settings.query in (
            "coreset",
            "cluster",
        )
        self.labelled_descriptors: np.ndarray | None = None
        self.recent: deque[float] = deque(maxlen=settings.threshold_window)
        self.calibration: float | None = None
        """Force error per unit score on the validation labels, from the newest
        evaluation."""

    # ---------------------------------------------------------------- scores
    @property
    def ranks_by_ensemble(self) -> bool:
        """Whether a newer ensemble changes scores (False for ``random``)."""
        return self.settings.measure != "random"

    def descriptors(self, structures: Sequence[Atoms]) -> np.ndarray:
        return descriptor(structures, cutoff=self.cutoff)

    def note_labelled(self, structures: Sequence[Atoms]) -> None:
        """Take labelled structures into the diversity measures' reference set."""
        if not self.needs_descriptors or not structures:
            return
        new = self.descriptors(structures)
        known = self.labelled_descriptors
        self.labelled_descriptors = new if known is None else np.vstack([known, new])

    def score(
        self, prediction: EnsemblePrediction, structures: Sequence[Atoms] | None = None
    ) -> np.ndarray:
        """The measure's score of each structure; recent scores feed the percentile.

        ``structures`` are read only by measures of descriptors (``needs_descriptors``).
        """
        if self.needs_descriptors and prediction.descriptors is None:
            if structures is None:
                raise ValueError(f"measure {self.settings.measure!r} needs the structures")
            prediction.descriptors = self.descriptors(structures)
        context = MeasureContext(
            rng=self.rng,
            labelled_descriptors=self.labelled_descriptors,
            options=dict(self.settings.measure_options),
        )
        scores = np.asarray(self.measure(prediction, context), dtype=float)
        if scores.shape != (prediction.n_structures,):
            raise ValueError(
                f"measure {self.settings.measure!r} returned shape {scores.shape}, "
                f"expected ({prediction.n_structures},)"
            )
        self.recent.extend(scores[np.isfinite(scores)].tolist())
        return scores

    # ---------------------------------------------------------------- trust levels
    def threshold(self) -> float:
        """The lower trust level now (``-inf`` for ``random``: every frame may go)."""
        settings = self.settings
        if settings.measure == "random":
            return -np.inf
        if settings.threshold_mode == "percentile" and len(self.recent) >= 10:
            return float(np.percentile(self.recent, settings.threshold_percentile))
        if settings.threshold_mode == "calibrated" and self.calibration:
            return settings.calibration_target / self.calibration
        return settings.threshold

    def out_of_domain(self, scores: np.ndarray) -> np.ndarray:
        """Which scores lie above the upper trust level (all False without one)."""
        upper = self.settings.upper_threshold
        return np.zeros(len(scores), bool) if not upper else np.asarray(scores) > upper

    def calibrate(self, evaluation: Evaluation) -> None:
        """Fit force error ≈ c · spread on ``evaluation`` (median ratio), for the
        ``calibrated`` threshold: the score at which the expected error reaches the
        target is then target / c. Scores are taken to be in force units. The
        inference agent passes the validation labels' evaluation, never the held-out
        set's."""
        spread, error = evaluation.force_spread, evaluation.force_error
        usable = (spread > 0) & np.isfinite(error)
        if usable.sum() >= 3:
            self.calibration = float(np.median(error[usable] / spread[usable]))

    # ---------------------------------------------------------------- the batch
    def pick_batch(self, queue: OracleQueue, size: int) -> list[Candidate]:
        """Remove and return the next oracle batch: ``random_fraction`` of it at random,
        the rest by the query."""
        candidates = queue.candidates()
        if not candidates or size <= 0:
            return []
        size = min(size, len(candidates))
        n_random = int(round(self.settings.random_fraction * size))
        context = QueryContext(self.rng, self.labelled_descriptors, self.descriptors)
        chosen = list(self.query.select(candidates, size - n_random, context))[: size - n_random]
        ids = {c.candidate_id for c in chosen}
        rest = [c for c in candidates if c.candidate_id not in ids]
        if n_random and rest:
            draw = self.rng.choice(len(rest), size=min(n_random, len(rest)), replace=False)
            chosen += [rest[i] for i in sorted(draw)]
        return queue.remove([c.candidate_id for c in chosen])
