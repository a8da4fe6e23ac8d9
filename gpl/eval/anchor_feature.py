"""The student's anchor cross feature in ``gpl eval`` (``trainer.anchor_cross``), per flat row.

The same feature as the stream's (:func:`workers.anchor_cross.anchor_cross`: best and top-2 mean cosine of
the candidate to the user's anchors), from ONE anchor source for every method — the content anchors, the
stream's default backend — so the comparison is between labels, never between inputs: the priors-label
student reads exactly the feature the anchor-label student reads.

Which anchor set a row sees (the offline anchors are one set per user from the training period, the
stream's are the set current before the request):

* test rows: the anchors of every training click (what is known at the cut);
* training rows: anchors built from the clicks of the OTHER cross-fitting folds only (the calibrator's
  folds, :func:`workers.labeler.training_log.row_folds` for exposures, the request's fold for its unexposed
  candidates), so no training row is scored against anchors made from its own request's clicks. Without
  that, a clicked exposure would lie in the very cluster it helped form, the feature would separate the
  training clicks better than it can ever separate a new request's, and the student would learn to trust
  it more than serving warrants. Rows of a user folded by exposure (fewer training requests than folds)
  that were not exposed get the full set (their request has no fold).

A user without anchors (no training click; none from the other folds) gets zeros, as online.
"""

from __future__ import annotations

import numpy as np
import torch

from gpl.eval.anchor_sources import SourceAnchors, content_anchors, pick_users, training_histories
from gpl.eval.context import Context
from gpl.eval.dataset import EvalDataset
from runtime.settings import Settings
from workers.anchor_cross import ANCHOR_CROSS_DIM
from workers.labeler.anchor_book import UserAnchors
from workers.labeler.training_log import FOLDS, request_folds, row_folds

CHUNK = 16_384


def padded(users: dict[int, UserAnchors], n_users: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(U, K, dim) anchor vectors and the (U, K) mask of real anchors (K the largest set)."""
    k = max((len(a.vectors) for a in users.values()), default=1)
    vec = np.zeros((n_users, k, dim), np.float32)
    mask = np.zeros((n_users, k), bool)
    for u, a in users.items():
        vec[u, : len(a.vectors)] = a.vectors
        mask[u, : len(a.vectors)] = True
    return vec, mask


def cross_rows(users: dict[int, UserAnchors], row_user: np.ndarray, row_item: np.ndarray,
               item_vectors: np.ndarray) -> np.ndarray:
    """(n, 2) :func:`workers.anchor_cross.anchor_cross` of each row's item against its user's set, vectorised:
    the same values as the stream's function (max; mean of the two largest, the max again for one anchor)."""
    out = np.zeros((len(row_user), ANCHOR_CROSS_DIM), np.float32)
    if not users or not len(row_user):
        return out
    vec, mask = padded(users, int(max(int(row_user.max()) + 1, max(users) + 1)), item_vectors.shape[1])
    tv, tm, items = torch.from_numpy(vec), torch.from_numpy(mask), torch.from_numpy(item_vectors)
    for s in range(0, len(row_user), CHUNK):
        u = torch.from_numpy(row_user[s : s + CHUNK])
        v = items[torch.from_numpy(row_item[s : s + CHUNK])]
        m = tm[u]
        sims = torch.einsum("nd,nkd->nk", v, tv[u]).masked_fill(~m, -torch.inf)
        top = sims.topk(min(2, sims.shape[1]), dim=1).values
        best = top[:, 0]
        second = torch.where(torch.isfinite(top[:, -1]), top[:, -1], best)
        has = m.any(dim=1)
        out[s : s + CHUNK, 0] = torch.where(has, best, 0.0).numpy()
        out[s : s + CHUNK, 1] = torch.where(has, (best + second) / 2, 0.0).numpy()
    return out


def row_anchor_cross(ds: EvalDataset, item_vectors: np.ndarray, book: SourceAnchors, history_items: int,
                     folds: int = FOLDS) -> np.ndarray:
    """(rows, 2) float32: every flat row's anchor cross feature under the rule of the module docstring."""
    train = ~ds.is_test
    ex_fold = row_folds(ds, train, folds)  # -1 for unexposed rows and test rows
    req_fold = request_folds(ds, train, folds)[ds.row_request]
    fold = np.where(ds.exposed, ex_fold, req_fold)
    fold[ds.is_test[ds.row_request]] = -1
    row_user = ds.req_user[ds.row_request]
    out = np.zeros((len(ds.item), ANCHOR_CROSS_DIM), np.float32)
    vectors = np.ascontiguousarray(item_vectors, np.float32)
    full = np.flatnonzero(fold < 0)
    out[full] = cross_rows(book.users, row_user[full], ds.item[full], vectors)
    if book.make is None:
        raise ValueError("the anchor source cannot rebuild anchors per fold (no make): use the content anchors")
    for f in range(folds):
        rows = np.flatnonzero(fold == f)
        if not len(rows):
            continue
        hist = training_histories(ds, history_items, train, rows=(ex_fold >= 0) & (ex_fold != f))
        out[rows] = cross_rows(book.make(hist), row_user[rows], ds.item[rows], vectors)
    return out


class RowLookup:
    """Flat row of each (request, item) pair, by binary search over the sorted keys (a pair recalled twice
    maps to one of its rows: the same request and item, so the same feature)."""

    def __init__(self, ds: EvalDataset) -> None:
        self.n_items = int(ds.n_items)
        keys = ds.row_request.astype(np.int64) * self.n_items + ds.item.astype(np.int64)
        self.order = np.argsort(keys, kind="stable")
        self.keys = keys[self.order]

    def __call__(self, req: np.ndarray, item: np.ndarray) -> np.ndarray:
        k = np.asarray(req, np.int64) * self.n_items + np.asarray(item, np.int64)
        at = np.minimum(np.searchsorted(self.keys, k), len(self.keys) - 1)
        if not np.array_equal(self.keys[at], k):
            raise KeyError("a (request, item) pair that is not a row of the data set")
        return np.asarray(self.order[at])


def attach(ctx: Context, ds: EvalDataset, item_vectors: np.ndarray, settings: Settings,
           books: dict[str, SourceAnchors]) -> dict[str, float]:
    """Give ``ctx`` the feature when ``trainer.anchor_cross`` is on (content anchors, built here if no method
    asked for them); returns what results.json records about it (empty when off)."""
    if not settings.trainer.anchor_cross:
        return {}
    book = books.get("content")
    if book is None:
        hist = training_histories(ds, settings.anchors.history_items)
        book = content_anchors(ds, hist, pick_users(ds, hist, None), item_vectors, k=settings.anchors.k)
    x = row_anchor_cross(ds, item_vectors, book, settings.anchors.history_items)
    ctx.use_anchor_cross(x, RowLookup(ds))
    has = np.abs(x).sum(axis=1) > 0
    return {"anchor_cross_rows_with_anchors": float(has.mean()), "anchor_cross_best_mean": float(x[has, 0].mean())
            if has.any() else 0.0}


__all__ = ["attach", "RowLookup", "cross_rows", "padded", "row_anchor_cross"]
