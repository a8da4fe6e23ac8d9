"""Closing the loop in the labeler: pseudo-labels met later by real labels refit the calibrator's level.

A calibrator is fitted on a past period; the stream drifts (new items, seasons, another exposure
policy), and the first symptom is that pseudo-labels stop matching what users do when those very
items are later shown to them. The labeler remembers the logit of each pseudo-label it made (bounded,
oldest forgotten first); when a real label for the same (user, item) arrives on ``samples`` it is a
*join*. Every ``every`` joins:

* the ECE of the joined pseudo-labels against their outcomes is measured; above ``alert`` the drift
  alert is raised (a log line and the ``gpl_calibration_drift`` gauge) — Prometheus rules page on it;
* the calibrator's intercept is refitted on the joins (1-D logistic regression of the outcomes on the
  stored logits, an offset only: the slopes stay those fitted offline on far more data) and the
  labeler switches to the refreshed calibrator, whose new version appears in every label's lineage.

The refit only moves the level; it cannot repair a calibrator whose features stopped ranking (that
shows as a high ECE that does not come down, and needs a refit offline).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np

from workers.labeler.calibrator import Calibrator, calibration_error, sigmoid
from workers.labeler.outcome_memory import OutcomeMemory

log = logging.getLogger(__name__)


def intercept_offset(logits: np.ndarray, y: np.ndarray, iters: int = 60, bound: float = 5.0) -> float:
    """δ in [-bound, bound] maximising Σ log-likelihood of y under sigmoid(logit + δ) (0 when there is no signal).

    The score Σ (y − sigmoid(logit + δ)) falls monotonically in δ, so its root is bracketed and found by
    bisection (to bound·2^-iters). Not Newton: from logits far from the outcomes (a calibrator that says 0.4 %
    where two in three are clicked) its first step overshoots to where every p is ~1, and it diverged to
    the wrong bound.
    """
    z = np.asarray(logits, np.float64)
    t = np.asarray(y, np.float64)
    if not len(z) or t.min() == t.max():
        return 0.0

    def score(d: float) -> float:
        return float((t - sigmoid(z + d)).sum())

    lo, hi = -bound, bound
    if score(lo) <= 0:
        return lo
    if score(hi) >= 0:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if score(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class Recalibrator:
    """Remembers pseudo-labels, joins real outcomes, refits the intercept every ``every`` joins."""

    def __init__(self, every: int, alert: float, capacity: int = 200_000) -> None:
        self.every = every
        self.alert = alert
        self.capacity = capacity
        self._made: OutcomeMemory[float] = OutcomeMemory(capacity)  # (user, item) → the pseudo-label's logit
        self._z: list[float] = []
        self._y: list[float] = []
        self.joined = 0
        self.refits = 0
        self.last_ece: float | None = None
        self.drifting = False

    def remember(self, user_id: str, item_ids: list[int], labels: np.ndarray) -> None:
        """Pseudo-labels just emitted (their logits are what the refit works on)."""
        q = np.clip(np.asarray(labels, np.float64), 1e-6, 1 - 1e-6)
        for item, z in zip(item_ids, np.log(q / (1 - q)).tolist(), strict=True):
            self._made.remember(user_id, item, z)

    def observe(self, user_id: str, item_ids: list[int], labels: list[float]) -> int:
        """Real labels of one request; returns how many met an earlier pseudo-label."""
        n = 0
        for item, y in zip(item_ids, labels, strict=True):
            z = self._made.take(user_id, item)
            if z is not None:
                self._z.append(z)
                self._y.append(float(y))
                n += 1
        self.joined += n
        return n

    def due(self) -> bool:
        return self.every > 0 and len(self._z) >= self.every

    def refit(self, cal: Calibrator) -> Calibrator:
        """The calibrator with its intercept moved to fit the joins so far; the joins are then cleared."""
        z, y = np.asarray(self._z), np.asarray(self._y)
        self._z, self._y = [], []
        self.last_ece = calibration_error(sigmoid(z), y)
        self.drifting = self.last_ece > self.alert
        if self.drifting:
            log.warning("calibration drift: ECE %.3f of %d pseudo-labels against later real labels > %.3f "
                        "(calibrator %s); refitting its intercept", self.last_ece, len(z), self.alert, cal.version)
        d = intercept_offset(z, y)
        self.refits += 1
        if not math.isfinite(d) or abs(d) < 1e-3:
            return cal
        info = {**cal.info, "refit_from": cal.version, "refit_joins": int(len(z)), "refit_offset": d,
                "refit_ece_before": self.last_ece}
        return dataclasses.replace(cal, intercept=cal.intercept + d, fitted_at=time.time(), info=info)
