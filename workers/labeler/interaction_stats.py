"""Running counts behind the calibrator's prior features: how often each item was recalled and exposed,
and how often each user was shown something and clicked.

The labeler sees every candidate of its partitions twice over: unexposed ones in ``unexposed`` batches
and exposed ones as real-label samples on ``samples``. Counting both gives, for every item, its recall
count (exposed or not) and its exposure count, and per user exposures and clicks — the same quantities
``gpl eval`` counts over a training period, so a calibrator fitted there reads the stream's features on
the same scale. Item counts are kept per row of the labeler's :class:`ItemMatrix` (vectorised updates
and lookups, no per-candidate Python); with several labeler instances each counts the users of its own
partitions, which scales every item count by about the same factor (documented in docs/design.md).
"""

from __future__ import annotations

import numpy as np


class InteractionStats:
    """Item recall/exposure counts by item-matrix row; user exposure/click counts by user id."""

    def __init__(self) -> None:
        self.recalled = np.zeros(0, np.float64)
        self.exposed = np.zeros(0, np.float64)
        self.users: dict[str, list[float]] = {}  # user_id -> [exposures, clicks]
        self.exposures = 0.0
        self.clicks = 0.0
        self.requests = 0.0  # requests whose candidates were counted (the denominator of popularity shares)

    def _grow(self, rows: np.ndarray) -> None:
        need = int(np.maximum.reduce(rows)) + 1 if len(rows) else 0  # the ufunc: .max() adds a Python wrapper
        if need > len(self.recalled):
            size = max(need, 2 * len(self.recalled), 1024)
            self.recalled = np.concatenate([self.recalled, np.zeros(size - len(self.recalled))])
            self.exposed = np.concatenate([self.exposed, np.zeros(size - len(self.exposed))])

    def add_recalled(self, rows: np.ndarray) -> None:
        """Candidates of one request (unexposed ones; exposed ones come through :meth:`add_exposed`)."""
        rows = np.asarray(rows, np.int64)
        self._grow(rows)
        np.add.at(self.recalled, rows, 1.0)
        self.requests += 1.0

    def add_exposed(self, user_id: str, rows: np.ndarray, clicks: np.ndarray) -> None:
        """Real labels of one request: the exposed items (recalled too) and the user's clicks."""
        rows = np.asarray(rows, np.int64)
        self._grow(rows)
        np.add.at(self.recalled, rows, 1.0)
        np.add.at(self.exposed, rows, 1.0)
        n, c = float(len(rows)), float(np.asarray(clicks, np.float64).sum())
        u = self.users.setdefault(user_id, [0.0, 0.0])
        u[0] += n
        u[1] += c
        self.exposures += n
        self.clicks += c

    def items(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(recalled, exposed) counts of the rows (0 for rows never counted)."""
        rows = np.asarray(rows, np.int64)
        try:  # rows counted before (the request's own, just added) need no bounds pass
            return self.recalled[rows], self.exposed[rows]
        except IndexError:
            self._grow(rows)
            return self.recalled[rows], self.exposed[rows]

    def user(self, user_id: str) -> tuple[float, float]:
        """(exposures, clicks) of the user so far."""
        e, c = self.users.get(user_id, (0.0, 0.0))
        return float(e), float(c)

    @property
    def ctr(self) -> float:
        """The global click rate on exposures (a neutral 0.1 before any exposure was seen)."""
        return self.clicks / self.exposures if self.exposures else 0.1
