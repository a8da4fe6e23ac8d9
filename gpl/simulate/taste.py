"""The positive-control term of the semi-synthetic oracle: content taste with a stated share of the variance.

Why: the plain oracle (logistic MF on ratings) has no content term, so a method that labels by similarity
in the frozen content space has nothing of its own to find there; if it cannot beat the popularity priors,
one cannot tell a weak learner from a missing signal. The positive-control world adds

    logit'(u, i) = logit(u, i) + beta * cos(profile_u, v_i)

where ``v_i`` is the item's frozen content vector and ``profile_u`` the unit mean vector of the items the
user rated >= the oracle's threshold (all of them: it is the world's truth, not a feature any method sees).
``beta`` is solved so that the taste term explains ``share`` of the *within-request* variance of the new
logit over the simulated recall candidates (a pre-ranker ranks inside a request, so that is the variance
that matters): with a, c the request-demeaned logit and cosine, Va, Vc their variances and C their
covariance,

    beta^2 Vc / (Va + 2 beta C + beta^2 Vc) = share
    <=>  (1 - share) Vc beta^2 - 2 share C beta - share Va = 0,

whose positive root is taken. The caller re-solves the global offset afterwards, so the mean click
probability stays at the target.
"""

from __future__ import annotations

import math

import numpy as np


def liked_profiles(n_users: int, r_user: np.ndarray, r_item: np.ndarray, liked: np.ndarray,
                   item_vectors: np.ndarray, has_vector: np.ndarray) -> np.ndarray:
    """(U, d) unit mean vectors of each user's liked items that have a vector (zero when none)."""
    keep = liked & has_vector[r_item]
    prof = np.zeros((n_users, item_vectors.shape[1]), np.float64)
    np.add.at(prof, r_user[keep], item_vectors[r_item[keep]])
    norm = np.linalg.norm(prof, axis=1, keepdims=True)
    return (prof / np.maximum(norm, 1e-12)).astype(np.float32)


def within_request_moments(a: np.ndarray, c: np.ndarray, group: np.ndarray) -> tuple[float, float, float]:
    """(Va, Vc, C): variances and covariance of ``a`` and ``c`` after removing each group's mean."""
    n = np.bincount(group).astype(np.float64)
    n = np.maximum(n, 1.0)
    da = a - (np.bincount(group, a) / n)[group]
    dc = c - (np.bincount(group, c) / n)[group]
    return float((da * da).mean()), float((dc * dc).mean()), float((da * dc).mean())


def taste_weight(va: float, vc: float, cov: float, share: float) -> float:
    """The beta that gives the taste term ``share`` of the within-request variance (module docstring)."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    if vc <= 0.0:
        raise ValueError("the content cosine does not vary within requests: no taste term can be added")
    qa, qb, qc = (1.0 - share) * vc, -2.0 * share * cov, -share * va
    return (-qb + math.sqrt(qb * qb - 4.0 * qa * qc)) / (2.0 * qa)


def explained_share(a: np.ndarray, c: np.ndarray, group: np.ndarray, beta: float) -> float:
    """The share of the within-request variance of ``a + beta c`` that ``beta c`` accounts for (a check)."""
    va, vc, cov = within_request_moments(a, c, group)
    total = va + 2 * beta * cov + beta * beta * vc
    return float(beta * beta * vc / total) if total > 0 else 0.0


__all__ = ["explained_share", "liked_profiles", "taste_weight", "within_request_moments"]
