"""The confidence weight of a pseudo-label: ``w = coherence · consistency · generation · margin``.

Every term lies in [0, 1] and each is switched off (replaced by 1) by its ``labeler.use_<term>`` flag,
for ablations. The definitions are in the package docstring (``workers/labeler/__init__.py``).
"""
from __future__ import annotations

import logging

import numpy as np

from runtime.settings import LabelerSettings

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- confidence

TERMS = ("coherence", "consistency", "generation", "margin")


def coherence_of(anchors: np.ndarray) -> float:
    """``(1 + mean pairwise cos) / 2`` of normalised anchors; 1 for a single anchor."""
    k = anchors.shape[0]
    if k < 2:
        return 1.0
    g = anchors @ anchors.T
    mean_off = (float(g.sum()) - float(np.trace(g))) / (k * (k - 1))
    return float(np.clip((1.0 + mean_off) / 2.0, 0.0, 1.0))


def consistency_of(anchors: np.ndarray, history: np.ndarray) -> float:
    """``(1 + cos(anchor centroid, history centroid)) / 2``; 1 without history vectors."""
    if history.shape[0] == 0:
        return 1.0
    ca, ch = anchors.mean(axis=0), history.mean(axis=0)
    na, nh = float(np.linalg.norm(ca)), float(np.linalg.norm(ch))
    if na == 0 or nh == 0:
        return 0.5  # a centroid at the origin points nowhere: neither agreeing nor disagreeing
    return float(np.clip((1.0 + float(ca @ ch) / (na * nh)) / 2.0, 0.0, 1.0))


def confidence(*, coherence: float, consistency: float, logprobs: np.ndarray, matched: np.ndarray,
               p: np.ndarray, cfg: LabelerSettings) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(weights, terms): the per-sample product of the enabled terms and each term's values.

    See the module docstring for the formula. A disabled term is 1 for every sample (so lineage shows
    what the weight was made of).
    """
    t = np.empty((len(TERMS), int(p.shape[0])))  # rows in TERMS order; a disabled term is 1
    t[0] = coherence if cfg.use_coherence else 1.0
    t[1] = consistency if cfg.use_consistency else 1.0
    if cfg.use_generation:
        np.minimum(np.exp(logprobs.astype(np.float64))[matched], 1.0, out=t[2])  # exp of K values, not m
    else:
        t[2] = 1.0
    if cfg.use_margin:
        np.abs(2.0 * p - 1.0, out=t[3])
    else:
        t[3] = 1.0
    w = t[0] * t[1]  # three products: a reduction over 4 rows costs more in set-up than it computes
    w *= t[2]
    w *= t[3]
    return w, dict(zip(TERMS, t, strict=True))


def describe_weight(cfg: LabelerSettings) -> str:
    enabled = [t for t in TERMS if getattr(cfg, f"use_{t}")]
    return "*".join(enabled) if enabled else "1"
