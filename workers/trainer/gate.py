"""The publishing gate's figures and rule: held-out AUC and GAUC of a model, the decision between two.

Why a module of its own: both are pure (two models scored on one slice; the rule a function of their
figures and of the paired interval), so they are tested without files or a trainer, and ``gpl demo``
reads the same :class:`Decision` records back. What the rule says and why is told in
``workers/trainer/publish.py``, which runs it at every checkpoint; the files a publication writes are
``workers/trainer/published_area.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from workers.labeler.calibrator import binary_auc
from workers.model import PreRanker
from workers.trainer.gate_noise import Paired, per_user_auc
from workers.trainer.holdout import HoldoutRows

BASELINE = 0.5  # AUC and GAUC of a constant scorer


def gauc(scores: np.ndarray, labels: np.ndarray, users: list[str]) -> tuple[float, int]:
    """(impression-weighted mean of per-user AUCs, users counted); users with one class are left out.

    Vectorised (one sort, ties share their average rank within the user): the gate runs at every
    checkpoint, and a per-user loop cost 0.2 s on 20,000 rows.
    """
    per_user, weight = per_user_auc(scores, labels, users)
    if per_user.size == 0:
        return float("nan"), 0
    return float((per_user * weight).sum() / weight.sum()), int(per_user.size)


@dataclass(frozen=True)
class Scores:
    """A model's figures on the held-out slice."""

    auc: float
    gauc: float
    rows: int
    positives: int
    gauc_users: int


def measure(model: PreRanker, rows: HoldoutRows) -> Scores:
    """Held-out AUC and GAUC of ``model`` (on logits: both are rank metrics, the sigmoid changes nothing)."""
    return scores_of(predict(model, rows), rows)


def scores_of(p: np.ndarray, rows: HoldoutRows) -> Scores:
    g, users = gauc(p, rows.labels, rows.users)
    return Scores(binary_auc(p, rows.labels), g, len(rows), int(rows.labels.sum()), users)


def predict(model: PreRanker, rows: HoldoutRows) -> np.ndarray:
    """The model's logits on the held-out rows (eval mode, no gradient; the training mode is restored)."""
    b = model.cfg.hash_buckets
    was_training = model.training
    try:
        with torch.no_grad():
            hist = None
            if model.cfg.history_items:
                h = rows.history if rows.history is not None else np.zeros_like(rows.vectors)
                hist = torch.from_numpy(np.ascontiguousarray(h, np.float32))
            anchor = None  # a row held out before the model read anchors has zeros (as a user without anchors)
            if model.cfg.anchor_cross:
                a = rows.anchor if rows.anchor is not None else np.zeros((len(rows), 2), np.float32)
                anchor = torch.from_numpy(np.ascontiguousarray(a, np.float32))
            p = model.eval()(torch.from_numpy(rows.buckets("user", b)), torch.from_numpy(rows.buckets("item", b)),
                             torch.from_numpy(rows.vectors), hist, anchor).numpy()
    finally:
        model.train(was_training)
    return np.asarray(p)


def decide(candidate: Scores, published: Scores | None, margin: float, min_rows: int,
           paired: Paired | None = None) -> tuple[str, str]:
    """(outcome, reason): ``published``, ``refused`` or ``insufficient``. Pure: both figures are on one slice.

    With ``paired`` (the bootstrap interval of candidate − published on that slice) a metric fails only
    when the interval's upper end is below ``-margin``; without it, when the point difference is."""
    if candidate.rows < min_rows or math.isnan(candidate.auc):
        return "insufficient", (f"holdout has {candidate.rows} rows ({candidate.positives} clicks); the gate needs "
                                f"{min_rows} with clicks and non-clicks")
    if published is None:
        beats = candidate.auc > BASELINE and (math.isnan(candidate.gauc) or candidate.gauc > BASELINE)
        return ("published", "first publication: beats a constant scorer") if beats else (
            "refused", f"nothing published and AUC {candidate.auc:.4f} / GAUC {candidate.gauc:.4f} do not beat "
                       f"a constant scorer ({BASELINE})")
    failures = []
    for name, c, p in (("AUC", candidate.auc, published.auc), ("GAUC", candidate.gauc, published.gauc)):
        if math.isnan(c):  # groups depend on the labels only, so GAUC is NaN for both models or for neither
            continue
        hi = paired.interval(name)[1] if paired is not None else c - p
        if hi < -margin:
            noise = "" if paired is None else f" (difference {c - p:+.4f}, {paired.confidence:.0%} interval up to " \
                                               f"{hi:+.4f} on {paired.resamples} paired resamples)"
            failures.append(f"{name} {c:.4f} < published {p:.4f} - {margin}{noise}")
    if failures:
        return "refused", "; ".join(failures)
    if paired is None:
        return "published", f"AUC and GAUC within {margin} of the published model or better"
    return "published", (f"AUC and GAUC not worse than the published model by more than {margin} beyond the "
                         f"slice's noise (differences' {paired.confidence:.0%} intervals reach above -{margin})")


@dataclass(frozen=True)
class Decision:
    """One gate decision, as written to ``gate.jsonl``."""

    candidate: int
    published: int | None  # the version gated against; None: the constant-scorer baseline
    outcome: str
    reason: str
    margin: float
    candidate_scores: Scores
    published_scores: Scores | None
    at: float
    interval: dict[str, Any] | None = None  # the paired bootstrap of candidate - published (Paired.to_json)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("candidate_scores", "published_scores"):  # NaN is not JSON
            if d[key] is not None:
                d[key] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d[key].items()}
        return d
