"""How much of a difference between two models a held-out slice can see: a paired bootstrap.

Why: the publication gate (workers/trainer/publish.py) compares a checkpoint with the published model on a slice
of 1,000–2,000 held-out rows. Each model's GAUC on such a slice is uncertain by about ±0.02, far more than
the gate's margin (0.005), so a fixed margin refused checkpoints for differences that were sampling noise
(9 of 14 in one demo run). Both models are scored on the *same* rows, so the difference is much less
noisy than either figure; resampling the slice and recomputing the difference on each draw gives its
spread:

* AUC: rows resampled with replacement; each draw's AUC is computed from per-row counts on one sort of
  the scores (ties count half), for both models with the same counts.
* GAUC: users resampled (a user's rows are not independent draws), each user's own AUC computed once:
  a draw is a weighted mean of the per-user differences.

Seeded (the gate passes the candidate's version), so a decision is reproducible from its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

RESAMPLES = 400
CONFIDENCE = 0.90  # two-sided: the upper end is a 95 % one-sided bound


@dataclass(frozen=True)
class Paired:
    """Point difference (candidate − published) and its bootstrap interval, per metric."""

    auc: tuple[float, float, float]  # (difference, low, high)
    gauc: tuple[float, float, float]
    resamples: int
    confidence: float

    def interval(self, metric: str) -> tuple[float, float]:
        d = self.auc if metric.upper() == "AUC" else self.gauc
        return d[1], d[2]

    def to_json(self) -> dict[str, Any]:
        def clean(t: tuple[float, float, float]) -> list[float | None]:
            return [None if np.isnan(v) else round(float(v), 6) for v in t]

        return {"auc": clean(self.auc), "gauc": clean(self.gauc), "resamples": self.resamples,
                "confidence": self.confidence, "method": "paired bootstrap (AUC: rows, GAUC: users)"}


def per_user_auc(scores: np.ndarray, labels: np.ndarray, users: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(AUC of each user with both classes, that user's row count), in sorted user order; ties share their
    average rank within the user. Vectorised: one sort for all users."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    if s.size == 0:
        return np.zeros(0), np.zeros(0)
    _, g = np.unique(np.asarray(users), return_inverse=True)
    order = np.lexsort((s, g))
    gs, ss, n = g[order], s[order], len(s)
    new_run = np.r_[True, (gs[1:] != gs[:-1]) | (ss[1:] != ss[:-1])]  # a tie run: same user, same score
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], n]
    group_first = np.searchsorted(gs, np.arange(int(gs[-1]) + 1))
    avg = (run_start + run_end - 1) / 2.0  # 0-based mean position of each run
    ranks = np.empty(n)
    ranks[order] = avg[np.cumsum(new_run) - 1] - group_first[gs] + 1.0
    n_all = np.bincount(g).astype(np.float64)
    n_pos = np.bincount(g, weights=y)
    rank_pos = np.bincount(g, weights=np.where(y, ranks, 0.0))
    ok = (n_pos > 0) & (n_pos < n_all)
    per_user = (rank_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * (n_all[ok] - n_pos[ok]))
    return per_user, n_all[ok]


def weighted_aucs(scores: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUC under each row of ``counts`` (draws × rows: how often each row was drawn); NaN for a draw
    without both classes. One sort of the scores serves every draw."""
    order = np.argsort(scores, kind="stable")
    s, y = np.asarray(scores)[order], np.asarray(labels).astype(bool)[order]
    c = counts[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups of equal scores
    pos = np.add.reduceat(c * y, starts, axis=1)
    neg = np.add.reduceat(c * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored strictly lower than each group
    p_tot, n_tot = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray((pos * (below + 0.5 * neg)).sum(axis=1) / (p_tot * n_tot))


def _point(a: np.ndarray, y: np.ndarray) -> float:
    return float(weighted_aucs(a, y, np.ones((1, len(y))))[0])


def _bounds(d: np.ndarray, confidence: float) -> tuple[float, float]:
    d = d[~np.isnan(d)]
    if d.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(d, [tail, 100.0 - tail])
    return float(lo), float(hi)


def paired_bootstrap(cand: np.ndarray, pub: np.ndarray, labels: np.ndarray, users: list[str], *,
                     resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> Paired:
    """The difference candidate − published in AUC and GAUC on one slice, with its bootstrap interval."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    n = len(y)
    rows = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
    d_auc = weighted_aucs(cand, y, rows) - weighted_aucs(pub, y, rows)
    lo, hi = _bounds(d_auc, confidence)
    auc = (_point(cand, y) - _point(pub, y), lo, hi)
    ua, w = per_user_auc(cand, y, users)
    ub, _ = per_user_auc(pub, y, users)
    if w.size:
        draws = rng.multinomial(w.size, np.full(w.size, 1.0 / w.size), size=resamples) * w
        d_gauc = draws @ (ua - ub) / draws.sum(axis=1)
        lo, hi = _bounds(d_gauc, confidence)
        gauc = (float(((ua - ub) * w).sum() / w.sum()), lo, hi)
    else:
        gauc = (float("nan"), float("nan"), float("nan"))
    return Paired(auc=auc, gauc=gauc, resamples=resamples, confidence=confidence)
