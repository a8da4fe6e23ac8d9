"""What the calibrator reads about a (user, candidate) pair — one definition for the stream and for eval.

Similarity features (from the user's anchors and history, all in the frozen space):

* ``s1``, ``s2`` — best and second-best anchor cosine (``s2 = s1`` with one anchor): is the candidate
  close to one interest, or between two?
* ``s_mean`` — anchor cosines averaged with weights ∝ exp(anchor log-prob): for content anchors the
  share of the history in each cluster, for generated anchors their relative probability — close to the
  user's taste as a whole, or to one corner of it;
* ``s_cent`` — cosine to the normalised centroid of the history the anchors came from.

Prior features (counts of what has been seen so far; :class:`~workers.labeling.interaction_stats.InteractionStats`
in the stream, the training period in eval):

* ``log_recall`` — log((1 + times the item was recalled) / (1 + requests counted)): defined for every
  candidate, exposed or not;
* ``log_exposed`` — log((1 + times the item was exposed) / (1 + requests counted));
* ``user_ctr`` — the user's click rate on exposures, smoothed towards the global rate with
  ``smoothing`` pseudo-exposures, as a logit.

Popularity is a *share* of the requests counted, not a raw count, so a calibrator fitted on a training
period reads a labeler's running counts on the same scale however long that labeler has been counting
(on one period the two differ by a constant, which the calibrator's standardisation absorbs).

Left out on purpose: an item's own click rate, anchor coherence and history size. For a candidate that
was never exposed an item click rate is not observed but imputed (the smoothing target is the
*exposed* click rate, several times the unexposed one), and a calibrator fitted on exposures then
extrapolates the wrong way — measured on the semi-synthetic benchmark (docs/eval.md).
"""

from __future__ import annotations

import math

import numpy as np

FEATURES: tuple[str, ...] = ("s1", "s2", "s_mean", "s_cent", "log_recall", "log_exposed", "user_ctr")
SIMILARITY_FEATURES: tuple[str, ...] = ("s1", "s2", "s_mean", "s_cent")  # need the user's anchors
PRIOR_FEATURES: tuple[str, ...] = ("log_recall", "log_exposed", "user_ctr")  # need only the counts


def needs_anchors(features: tuple[str, ...]) -> bool:
    """Whether a calibrator over ``features`` can label a user only once the user has anchors."""
    return bool(set(features) & set(SIMILARITY_FEATURES))
SMOOTHING = 10.0  # pseudo-exposures of the user click-rate prior


def anchor_weights(logprobs: np.ndarray) -> np.ndarray:
    """Weights ∝ exp(log-prob), summing to 1 (uniform when all are equal or absent)."""
    lp = np.asarray(logprobs, np.float64)
    if not len(lp) or not np.isfinite(lp).all():
        return np.full(len(lp), 1.0 / max(len(lp), 1))
    e = np.exp(lp - lp.max())
    return e / e.sum()


def similarity_features(sims: np.ndarray, centroid_cos: np.ndarray,
                        weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """From the (m, K) anchor cosines, the (m,) centroid cosines and the anchors' (K,) weights."""
    s = np.asarray(sims, np.float64)
    w = np.full(s.shape[1], 1.0 / s.shape[1]) if weights is None else np.asarray(weights, np.float64)
    if s.shape[1] == 1:
        s1 = s[:, 0]
        s2 = s1
    else:
        s1, s2 = _top_two(s)
    return {"s1": s1, "s2": s2, "s_mean": s @ w, "s_cent": np.asarray(centroid_cos, np.float64)}


SMALL_ROWS = 128  # up to this many candidates a row sort beats the column loop (the drawn ones: 40)


def _top_two(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest and second-largest of each row (a repeated maximum is both).

    Many rows (every candidate, with a top part): ``np.partition(s, K - 2, axis=1)`` gives the same
    values but pays a per-row setup on the short axis (~75 µs for 1,000 x 8); 3 vectorised operations
    per column of the transposed copy are ~40 µs. Few rows (the 40 drawn): those 21 operations cost
    ~9 µs of call overhead, one row sort ~3 µs.
    """
    if s.shape[0] <= SMALL_ROWS:
        srt = np.sort(s, axis=1)
        return srt[:, -1], srt[:, -2]
    cols = np.ascontiguousarray(s.T)
    best = cols[0].copy()
    second = np.full_like(best, -np.inf)
    tmp = np.empty_like(best)
    for col in cols[1:]:
        np.minimum(best, col, out=tmp)
        np.maximum(second, tmp, out=second)
        np.maximum(best, col, out=best)
    return best, second


def prior_features(recalled: np.ndarray, exposed: np.ndarray, requests: float, user_exposures: float | np.ndarray,
                   user_clicks: float | np.ndarray, global_ctr: float,
                   smoothing: float = SMOOTHING) -> dict[str, np.ndarray]:
    """From per-candidate item counts over ``requests`` requests and the user's exposure and click counts.

    The user's counts are one number per request in the stream (scalar arithmetic, a few µs less per
    request) and one per candidate in eval (arrays); both give the same values.
    """
    m = min(max(float(global_ctr), 1e-4), 1 - 1e-4)
    n = len(recalled)
    if isinstance(user_exposures, float | int) and isinstance(user_clicks, float | int):
        r = min(max((user_clicks + smoothing * m) / (user_exposures + smoothing), 1e-6), 1 - 1e-6)
        user_ctr = np.empty(n)
        user_ctr.fill(math.log(r / (1 - r)))  # np.full is empty + copyto behind a Python wrapper
    else:
        rate = (np.asarray(user_clicks, np.float64) + smoothing * m) / (
            np.asarray(user_exposures, np.float64) + smoothing)
        rate = np.clip(rate, 1e-6, 1 - 1e-6)
        user_ctr = np.broadcast_to(np.log(rate / (1 - rate)), (n,)).astype(np.float64)
    base = math.log1p(max(requests, 0.0))
    return {
        "log_recall": np.log1p(np.maximum(np.asarray(recalled, np.float64), 0)) - base,
        "log_exposed": np.log1p(np.maximum(np.asarray(exposed, np.float64), 0)) - base,
        "user_ctr": user_ctr,
    }


def feature_matrix(names: tuple[str, ...], parts: dict[str, np.ndarray]) -> np.ndarray:
    """The (m, F) matrix in the calibrator's column order; KeyError names a feature nobody computed."""
    first = parts[names[0]]  # a KeyError names the feature nobody computed
    x = np.empty((len(first), len(names)))
    for j, n in enumerate(names):
        x[:, j] = parts[n]
    return x
