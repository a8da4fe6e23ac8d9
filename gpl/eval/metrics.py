"""Offline metrics of the GPL comparison, vectorised over ragged requests (no per-request Python loop).

Why a module of our own: the evaluation scores ~2,500 test requests x 200 candidates per method and
seed, and the metrics need request-level grouping (HR@K, NDCG, GAUC, diversity of a top 10). A Python
loop per request would cost more than the training it evaluates. Everything here works on flat arrays
plus ``ptr`` (CSR offsets: request r owns ``[ptr[r], ptr[r+1])``) or a group id per row.

Definitions (the report and docs/eval.md repeat them):

* ranking within a request: by descending score; ties keep the request's candidate order (the recall
  order), so a method that scores everything alike is ranked as the recall stage ranked;
* ``auc``: Mann-Whitney U with tied scores counted as 1/2 (average ranks);
* ``gauc``: per-group AUC, averaged with weights = the group's impressions (its labeled rows); groups
  with only one class have no AUC and are left out (weight too);
* ``hit_rate``: HR@K = Σ_requests |top-K ∩ positives| / Σ_requests min(K, |positives|): the share of
  the positives the top K could have held that it does hold (1 = perfect); requests without a positive
  do not count;
* ``ndcg``: binary-relevance NDCG@K averaged over requests with at least one positive;
* ``ece``: expected calibration error over equal-width probability bins, weighted by bin size;
* ``tail_share``: mean share of the top K that are long-tail items;
* ``category_coverage``: mean number of distinct categories in the top K;
* ``intra_list_distance``: mean over requests of the mean pairwise cosine distance (1 - cos) of the top
  K's (normalised) vectors, from ‖Σv‖² so it is O(K·d) per request, not O(K²·d).
"""

from __future__ import annotations

import numpy as np

from runtime.vectors.normalize import normalize
from workers.labeler.calibrator import binary_auc, calibration_error


def segment_ids(ptr: np.ndarray) -> np.ndarray:
    """Request index of every flat row (int64), from CSR offsets."""
    ptr = np.asarray(ptr, np.int64)
    return np.repeat(np.arange(len(ptr) - 1, dtype=np.int64), np.diff(ptr))


def segment_ranks(scores: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """0-based rank of each row inside its request, by descending score, ties in row order."""
    seg = segment_ids(ptr)
    n = len(seg)
    order = np.lexsort((np.arange(n), -np.asarray(scores, np.float64), seg))
    ranks = np.empty(n, np.int64)
    ranks[order] = np.arange(n, dtype=np.int64) - np.asarray(ptr, np.int64)[seg[order]]
    return ranks


def topk(scores: np.ndarray, ptr: np.ndarray, k: int) -> np.ndarray:
    """(R, k) flat row indices of each request's top k, best first; -1 pads short requests."""
    ptr = np.asarray(ptr, np.int64)
    seg = segment_ids(ptr)
    ranks = segment_ranks(scores, ptr)
    out = np.full((len(ptr) - 1, k), -1, np.int64)
    keep = ranks < k
    out[seg[keep], ranks[keep]] = np.flatnonzero(keep)
    return out


def _average_ranks(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` within each group, ties sharing their average rank."""
    n = len(values)
    order = np.lexsort((values, groups))
    v, g = values[order], groups[order]
    # a new tie-run starts where the group or the value changes
    start = np.ones(n, bool)
    if n > 1:
        start[1:] = (g[1:] != g[:-1]) | (v[1:] != v[:-1])
    run = np.cumsum(start) - 1
    run_first = np.flatnonzero(start)
    run_last = np.append(run_first[1:], n) - 1
    gstart = np.ones(n, bool)
    if n > 1:
        gstart[1:] = g[1:] != g[:-1]
    group_first = np.maximum.accumulate(np.where(gstart, np.arange(n), 0))
    # rank within the group of the run's first and last element, averaged
    avg = (run_first[run] + run_last[run]) / 2.0 - group_first + 1.0
    ranks = np.empty(n, np.float64)
    ranks[order] = avg
    return ranks


def group_auc_values(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group ids, AUC per group, rows per group) for the groups having both classes."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    g = np.asarray(groups, np.int64)
    if s.size == 0:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    uniq, gi = np.unique(g, return_inverse=True)
    ranks = _average_ranks(s, gi)
    n_pos = np.bincount(gi, weights=y, minlength=len(uniq))
    n_all = np.bincount(gi, minlength=len(uniq)).astype(np.float64)
    n_neg = n_all - n_pos
    rank_pos = np.bincount(gi, weights=np.where(y, ranks, 0.0), minlength=len(uniq))
    ok = (n_pos > 0) & (n_neg > 0)
    auc = (rank_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return uniq[ok], auc, n_all[ok].astype(np.int64)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (ties count 1/2); NaN when only one class is present. The calibrator's own implementation
    (:func:`workers.labeler.calibrator.binary_auc`), so eval and the stream measure alike."""
    return binary_auc(scores, labels)


def gauc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Impression-weighted mean of per-group AUCs (groups with one class left out); NaN if none."""
    _, a, n = group_auc_values(scores, labels, groups)
    return float((a * n).sum() / n.sum()) if n.sum() else float("nan")


def hit_rate(
    scores: np.ndarray, relevant: np.ndarray, ptr: np.ndarray, k: int, ranks: np.ndarray | None = None
) -> float:
    """HR@K: Σ |top-K ∩ positives| / Σ min(K, |positives|) over requests with a positive."""
    rel = np.asarray(relevant).astype(bool)
    r = segment_ranks(scores, ptr) if ranks is None else ranks
    seg = segment_ids(ptr)
    n_req = len(ptr) - 1
    hits = np.bincount(seg[rel & (r < k)], minlength=n_req)
    n_rel = np.bincount(seg[rel], minlength=n_req)
    denom = np.minimum(n_rel, k).sum()
    return float(hits.sum() / denom) if denom else float("nan")


def ndcg(scores: np.ndarray, relevant: np.ndarray, ptr: np.ndarray, k: int, ranks: np.ndarray | None = None) -> float:
    """Binary NDCG@K, mean over requests with at least one positive."""
    rel = np.asarray(relevant).astype(bool)
    r = segment_ranks(scores, ptr) if ranks is None else ranks
    seg = segment_ids(ptr)
    n_req = len(ptr) - 1
    inside = rel & (r < k)
    dcg = np.bincount(seg[inside], weights=1.0 / np.log2(r[inside] + 2.0), minlength=n_req)
    n_rel = np.bincount(seg[rel], minlength=n_req)
    disc = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))])
    idcg = disc[np.minimum(n_rel, k)]
    has = n_rel > 0
    return float((dcg[has] / idcg[has]).mean()) if has.any() else float("nan")


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean prediction, observed rate, count) per equal-width bin of [0, 1]; empty bins give NaN."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    y = np.asarray(y, np.float64)
    b = np.minimum((p * bins).astype(np.int64), bins - 1)
    cnt = np.bincount(b, minlength=bins).astype(np.float64)
    sp = np.bincount(b, weights=p, minlength=bins)
    sy = np.bincount(b, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sp / cnt, sy / cnt, cnt.astype(np.int64)


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: Σ_b n_b/N · |mean p_b − mean y_b| over equal-width bins (the calibrator's
    :func:`workers.labeler.calibrator.calibration_error`)."""
    return calibration_error(p, y, bins)


def tail_share(top: np.ndarray, is_tail_row: np.ndarray) -> float:
    """Mean share of long-tail rows in each request's top K (``top`` from :func:`topk`)."""
    valid = top >= 0
    tail = valid & np.asarray(is_tail_row, bool)[np.maximum(top, 0)]
    n = valid.sum(1)
    ok = n > 0
    return float((tail.sum(1)[ok] / n[ok]).mean()) if ok.any() else float("nan")


def category_coverage(top: np.ndarray, category_row: np.ndarray) -> float:
    """Mean number of distinct categories among each request's top K."""
    valid = top >= 0
    cats = np.asarray(category_row, np.int64)[np.maximum(top, 0)]
    n_cat = int(cats.max()) + 1 if cats.size else 1
    req = np.broadcast_to(np.arange(top.shape[0])[:, None], top.shape)
    keys = np.unique(req[valid] * n_cat + cats[valid])
    per = np.bincount(keys // n_cat, minlength=top.shape[0])
    ok = valid.any(1)
    return float(per[ok].mean()) if ok.any() else float("nan")


def intra_list_distance(top: np.ndarray, vectors_row: np.ndarray) -> float:
    """Mean pairwise cosine distance within each top K (requests with < 2 items left out).

    For unit vectors Σ_{i≠j} cos = ‖Σ v‖² − K, so the mean pairwise cosine is (‖Σv‖² − K)/(K(K−1)).
    """
    valid = top >= 0
    v = np.asarray(vectors_row, np.float32)[np.maximum(top, 0)]  # (R, K, d)
    v = normalize(v, axis=2) * valid[:, :, None]
    k = valid.sum(1).astype(np.float64)
    total = np.square(v.sum(1, dtype=np.float64)).sum(1)
    ok = k >= 2
    mean_cos = (total[ok] - k[ok]) / (k[ok] * (k[ok] - 1))
    return float((1.0 - mean_cos).mean()) if ok.any() else float("nan")


__all__ = [
    "segment_ids",
    "segment_ranks",
    "topk",
    "auc",
    "gauc",
    "group_auc_values",
    "hit_rate",
    "ndcg",
    "reliability",
    "ece",
    "tail_share",
    "category_coverage",
    "intra_list_distance",
]


def label_fidelity(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int = 10) -> dict[str, float]:
    """How faithfully a student reproduces the order of its training labels, per request (``groups``).

    ``spearman``: mean over requests with at least 3 labeled rows and some spread in both of the rank
    correlation of student score and label (ties at average rank); ``overlap@k``: mean share of the
    label's top k (k capped at the request's rows - 1, so a request is never trivially full) that the
    student's top k holds. NaN when no request qualifies.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, np.float64)
    _, g = np.unique(np.asarray(groups, np.int64), return_inverse=True)
    n = np.bincount(g)
    rs, ry = _average_ranks(s, g), _average_ranks(y, g)
    mean_s = np.bincount(g, rs) / n
    mean_y = np.bincount(g, ry) / n
    ds, dy = rs - mean_s[g], ry - mean_y[g]
    cov = np.bincount(g, ds * dy)
    var = np.bincount(g, ds * ds) * np.bincount(g, dy * dy)
    ok = (n >= 3) & (var > 0)
    rho = cov[ok] / np.sqrt(var[ok])
    kk = np.minimum(k, n - 1)[g]  # per row: its request's k
    top_s, top_y = (rs > n[g] - kk), (ry > n[g] - kk)  # ranks are ascending: the top k hold the largest
    hit = np.bincount(g, top_s & top_y) / np.maximum(np.bincount(g, top_y), 1)
    ok_k = ok & (np.bincount(g, top_y) > 0)
    return {"spearman": float(rho.mean()) if len(rho) else float("nan"),
            f"overlap@{k}": float(hit[ok_k].mean()) if ok_k.any() else float("nan")}
