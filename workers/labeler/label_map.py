"""The label map: similarity to a click probability, ``p = sigmoid((s - center) / temperature)``.

A logistic map because the quantity it stands for is a click probability, and a 1-D logistic regression
of real labels on ``s`` has exactly this form; :func:`fit_label_map` fits it on exposed samples scored
against the same user's anchors. The map is monotone in ``s``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from runtime.settings import LabelerSettings
from schemas.events import SampleBatch
from workers.labeler.anchor_book import AnchorBook
from workers.labeler.item_matrix import ItemMatrix
from workers.labeler.matching import score

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelMap:
    """``p = sigmoid((s - center) / temperature)``: similarity to a click probability (monotone)."""

    center: float
    temperature: float

    @classmethod
    def from_settings(cls, cfg: LabelerSettings) -> LabelMap:
        return cls(cfg.label_center, cfg.label_temperature)

    def __call__(self, sim: np.ndarray) -> np.ndarray:
        z = (np.asarray(sim, np.float64) - self.center) / self.temperature
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # = sigmoid(z), without overflow for large |z|

    def describe(self) -> str:
        return f"sigmoid((s-{self.center:.6g})/{self.temperature:.6g})"


def label_map(sim: np.ndarray, cfg: LabelerSettings) -> np.ndarray:
    """The pseudo-label of each similarity under the configured map."""
    return LabelMap.from_settings(cfg)(sim)


def fit_label_map(sims: np.ndarray, labels: np.ndarray, *, l2: float = 1e-6, iters: int = 50) -> LabelMap:
    """Calibrate the map: 1-D logistic regression ``y ~ sigmoid(a + b·s)`` by Newton steps.

    ``center = -a/b`` and ``temperature = 1/b``. ``labels`` are real labels (0/1, or soft) of exposed
    items, ``sims`` their similarity to the same user's anchors (:func:`score_exposed`). A small ridge
    ``l2`` keeps the Hessian invertible when the data are separable. Raises ValueError when ``s`` does
    not rank clicks above non-clicks (b <= 0): no monotone map would be calibrated.
    """
    s = np.asarray(sims, np.float64).ravel()
    y = np.asarray(labels, np.float64).ravel()
    if s.size != y.size or s.size < 2:
        raise ValueError(f"need matching sims and labels (got {s.size} and {y.size})")
    x = np.stack([np.ones_like(s), s], axis=1)
    mean = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    w = np.array([math.log(mean / (1 - mean)), 0.0])
    reg = l2 * s.size
    for _ in range(iters):
        p = 0.5 * (1.0 + np.tanh(0.5 * (x @ w)))
        grad = x.T @ (p - y) + reg * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    a, b = float(w[0]), float(w[1])
    if not b > 0:
        raise ValueError(f"similarity does not separate the labels (slope {b:.4g}); keep the configured map")
    return LabelMap(center=-a / b, temperature=1.0 / b)


def score_exposed(batch: SampleBatch, cache: AnchorBook, items: ItemMatrix) -> tuple[np.ndarray, np.ndarray]:
    """(sims, labels) of a real-label SampleBatch against the user's anchors, for :func:`fit_label_map`."""
    entry = cache.get(batch.user_id)
    real = [s for s in batch.samples if s.source != "pseudo"]
    if entry is None or not real:
        return np.zeros(0), np.zeros(0)
    ids = np.asarray([s.item_id for s in real], np.int64)
    labels = np.asarray([s.label for s in real], np.float64)
    rows, missing = items.lookup(ids)
    sim, _ = score(entry.vectors, items.gather(rows[~missing]))
    return sim.astype(np.float64), labels[~missing]
