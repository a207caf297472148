"""Convergence without a test set: the exploration ratios and the accurate-ratio stop.

Every frame a generator segment records falls in one of three classes, by the
selection score the coordinator gives it (DP-GEN's trust levels):

- **accurate**: below the lower trust level (the selection threshold in force when
  the segment was scored): the ensemble agrees, nothing to learn there;
- **candidate**: at or above it, and not past the upper trust level: worth a label;
- **failed**: past the upper trust level (that frame and every later one of the
  segment), and the frame at which a walker blew up.

:class:`ExplorationTally` keeps, per system, the counts of the ``stop.accurate_window``
most recent segments. Each new ensemble version takes a snapshot of the ratios
(:meth:`ExplorationTally.ratios`), which goes to ``metrics.jsonl`` with the version,
and :meth:`ExplorationTally.converged` says whether the accurate ratio has held at
``stop.accurate_versions`` versions in a row. A version counts towards that only when
new segments entered a window since the previous one, so a quick run of versions
cannot confirm an old window again and again. A resumed campaign starts its windows
and its streak afresh.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from palflow.pipeline.config.settings import Campaign


@dataclass(frozen=True)
class SegmentCounts:
    """The frames of one generator segment, by class."""

    accurate: int
    candidate: int
    failed: int

    @property
    def frames(self) -> int:
        return self.accurate + self.candidate + self.failed

    @classmethod
    def classify(
        cls, scores: np.ndarray, lower: float, outside: np.ndarray, blew_up: bool
    ) -> SegmentCounts:
        """Count a segment's frames from their ``scores``, the lower trust level
        ``lower``, which frames lie past the upper trust level (``outside``), and
        whether the walker blew up (one more failed frame: the one that ended it)."""
        scores = np.asarray(scores, dtype=float)
        cut = int(np.argmax(outside)) if np.any(outside) else len(scores)
        finite = np.isfinite(scores[:cut])
        accurate = int(np.sum(scores[:cut][finite] < lower))
        candidate = int(finite.sum()) - accurate
        return cls(accurate, candidate, len(scores) - int(finite.sum()) + int(blew_up))


class ExplorationTally:
    """The exploration ratios of a campaign, per system (see the module's description)."""

    def __init__(self, campaign: Campaign) -> None:
        stop = campaign.stop
        self.target = stop.accurate_ratio
        self.window = stop.accurate_window
        self.versions_needed = stop.accurate_versions
        self.systems = [s.name for s in campaign.all_systems()]
        self.segments: dict[str, deque[SegmentCounts]] = {
            name: deque(maxlen=self.window) for name in self.systems
        }
        self.seen = 0
        """Segments counted so far, all systems."""
        self._seen_at_last_version = 0
        self.streak = 0
        """Versions in a row, each with new segments, at which the accurate ratio held."""

    def add(self, system: str, counts: SegmentCounts) -> None:
        """Count one segment of ``system``."""
        if counts.frames == 0:
            return
        self.segments.setdefault(system or self.systems[0], deque(maxlen=self.window)).append(
            counts
        )
        self.seen += 1

    def ratios(self) -> dict[str, dict[str, Any]]:
        """Per system: the ``accurate``, ``candidate`` and ``failed`` shares of the
        frames in its window (None before its first segment), the ``frames`` and
        the ``segments`` they come from."""
        out = {}
        for name in self.systems:
            window = self.segments.get(name, ())
            frames = sum(c.frames for c in window)
            counts = {
                share: sum(getattr(c, share) for c in window)
                for share in ("accurate", "candidate", "failed")
            }
            out[name] = {
                **{share: n / frames if frames else None for share, n in counts.items()},
                "frames": frames,
                "segments": len(window),
            }
        return out

    def holds(self, ratios: dict[str, dict[str, Any]]) -> bool:
        """Whether every system's window is full and its accurate ratio at the target."""
        return bool(self.target) and all(
            r["segments"] >= self.window
            and r["accurate"] is not None
            and r["accurate"] >= self.target
            for r in ratios.values()
        )

    def note_version(self) -> dict[str, dict[str, Any]]:
        """Take the ratios at a new ensemble version, and advance the streak; returns
        the ratios for the version's record."""
        ratios = self.ratios()
        if self.seen > self._seen_at_last_version:
            self.streak = self.streak + 1 if self.holds(ratios) else 0
            self._seen_at_last_version = self.seen
        elif not self.holds(ratios):
            self.streak = 0
        return ratios

    @property
    def converged(self) -> bool:
        """Whether the accurate ratio has held at enough versions in a row."""
        return bool(self.target) and self.streak >= self.versions_needed

    def reason(self) -> str:
        return (
            f"accurate ratio >= {self.target:g} over the last {self.window} generator "
            f"segments of every system, at {self.streak} ensemble versions in a row"
        )
