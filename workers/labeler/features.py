"""What the calibrator reads about a (user, candidate) pair — one definition for the stream and for eval.

Similarity features (from the user's anchors and history, all in the frozen space):

* ``s1``, ``s2`` — best and second-best anchor cosine (``s2 = s1`` with one anchor): is the candidate
  close to one interest, or between two?
* ``s_mean`` — anchor cosines averaged with weights ∝ exp(anchor log-prob): for content anchors the
  share of the history in each cluster, for generated anchors their relative probability — close to the
  user's taste as a whole, or to one corner of it;
* ``s_cent`` — cosine to the normalised centroid of the history the anchors came from.

Prior features (counts of what has been seen so far; :class:`~workers.labeler.interaction_stats.InteractionStats`
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

import functools
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


def calibrator_inputs(names: tuple[str, ...], sims: np.ndarray, centroid_cos: np.ndarray, weights: np.ndarray,
                      priors: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(x, s1): ``feature_matrix(names, {**similarity_features(sims, centroid_cos, weights), **priors})``
    and the best cosine ``s1`` as float64, the same values bit for bit, built in place.

    The labeler's path when every candidate is scored (a top part): the top two go straight into their
    columns of ``x`` and nothing else is copied twice (~half the numpy calls of the dict route, whose
    every call costs a few µs on a core whose caches the gather has just flushed). ``s_mean`` is the
    same ``(m, K) float64 @ (K,)`` product as :func:`similarity_features` (another layout would sum in
    another order).
    """
    m = int(sims.shape[0])
    x = np.empty((m, len(names)))
    col = _columns(names)
    s = np.asarray(sims, np.float64)
    j1, j2 = col.get("s1"), col.get("s2")
    s1 = x[:, j1] if j1 is not None else np.empty(m)
    if s.shape[1] == 1:
        s1[...] = s[:, 0]
        if j2 is not None:
            x[:, j2] = s1
    else:  # on the cosines as given (float32 from the matrix): a max or min is exact, half the bytes
        _top_two(sims, s1, x[:, j2] if j2 is not None else np.empty(m))
    if "s_mean" in col:
        x[:, col["s_mean"]] = s @ np.asarray(weights, np.float64)
    if "s_cent" in col:
        x[:, col["s_cent"]] = centroid_cos
    for name, j in col.items():
        if name not in SIMILARITY_FEATURES:
            x[:, j] = priors[name]  # a KeyError names the feature nobody computed
    return x, s1


@functools.lru_cache(maxsize=64)
def _columns(names: tuple[str, ...]) -> dict[str, int]:
    return {n: j for j, n in enumerate(names)}


def _top_two(s: np.ndarray, best: np.ndarray | None = None, second: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Largest and second-largest of each row of an (m, K >= 2) array (a repeated maximum is both),
    written into ``best`` and ``second`` when given (e.g. columns of a feature matrix).

    A tournament over the columns of the transposed copy: pair the first half of the columns with the
    second, keep each pair's (larger, smaller), then merge pairs of (top, second) as
    ``top = max(a1, b1)``, ``second = max(min(a1, b1), max(a2, b2))`` until one lane is left; an odd
    column out joins lane 0. Every step is one numpy call over a contiguous (lanes, m) block, ~10
    calls for K = 8: ``np.partition(s, K - 2, axis=1)`` pays a per-row setup on the short axis (~75
    µs for 1,000 x 8), a column-by-column loop 21 calls, a row sort ~20 µs. Only max and min: the
    values are the array's own, in its dtype, so they equal a sort's exactly.
    """
    t = np.ascontiguousarray(s.T)
    h = t.shape[0] // 2
    hi = np.maximum(t[:h], t[h : 2 * h])
    lo = np.minimum(t[:h], t[h : 2 * h])
    if t.shape[0] % 2:  # the odd column joins lane 0 as (c, -inf)
        _join(hi, lo, t[2 * h :], None)
    written = False  # the last step wrote into best and second
    while hi.shape[0] > 1:
        n = hi.shape[0]
        h = n // 2
        written = n == 2 and best is not None and second is not None
        nlo = np.maximum(np.minimum(hi[:h], hi[h : 2 * h]), np.maximum(lo[:h], lo[h : 2 * h]),
                         out=second[None, :] if written else None)  # type: ignore[index]
        nhi = np.maximum(hi[:h], hi[h : 2 * h], out=best[None, :] if written else None)  # type: ignore[index]
        if n % 2:
            _join(nhi, nlo, hi[2 * h :], lo[2 * h :])
        hi, lo = nhi, nlo
    if best is None or second is None:
        return hi[0], lo[0]
    if not written:
        best[...] = hi[0]
        second[...] = lo[0]
    return best, second


def _join(hi: np.ndarray, lo: np.ndarray, c_hi: np.ndarray, c_lo: np.ndarray | None) -> None:
    """Merge one more lane (its top ``c_hi``, second ``c_lo``; None: -inf) into lane 0, in place."""
    cand = np.minimum(hi[:1], c_hi)
    if c_lo is not None:
        np.maximum(cand, c_lo, out=cand)
    np.maximum(lo[:1], cand, out=lo[:1])
    np.maximum(hi[:1], c_hi, out=hi[:1])


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
