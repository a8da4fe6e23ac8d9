"""The test side of the comparison: evaluation scopes and the metrics of one method's scores on each.

Scopes
    ``all``: every test request. ``fresh``: the same requests with only the candidates whose (user, item)
    pair was not exposed to that user in training (:func:`~gpl.eval.dataset.fresh_pairs`): no pair memory.
    ``anchored``: the test requests of users that had text anchors (when the LLM covers only a capped subset
    of users, this is where GPL can act at all).
"""

from __future__ import annotations

import math

import numpy as np

from gpl.eval import metrics as M
from gpl.eval.context import Context
from gpl.eval.dataset import EvalDataset, fresh_pairs

HR_KS = (3, 5, 10)
CURVE_KS = tuple(range(1, 21))
HEAD_FRACTION = 0.2


class Evaluator:
    """Test-side bookkeeping shared by every method: scopes, popularity, categories, vectors."""

    def __init__(self, ds: EvalDataset, ctx: Context, item_vectors: np.ndarray, anchored_users: set[int]) -> None:
        self.ds, self.ctx, self.vectors = ds, ctx, item_vectors
        train_ex = ds.exposed & ~ctx.row_test
        pop = np.bincount(ds.item[train_ex], minlength=ds.n_items)
        order = np.lexsort((np.arange(ds.n_items), -pop))
        self.is_tail = np.ones(ds.n_items, bool)
        self.is_tail[order[: math.ceil(HEAD_FRACTION * ds.n_items)]] = False
        self.scopes: dict[str, np.ndarray] = {"all": np.flatnonzero(ds.is_test)}
        # a scope's row filter (None: every candidate of its requests)
        self.row_masks: dict[str, np.ndarray | None] = {"all": None}
        # fresh pairs: test candidates whose (user, item) was never exposed to that user in training, so a
        # score there cannot come from remembering the pair (the benchmark issue: pair memory)
        fresh = fresh_pairs(ds, ctx.row_test)
        if fresh[ctx.test_rows].any():
            self.scopes["fresh"] = self.scopes["all"]
            self.row_masks["fresh"] = fresh
        anchored = np.flatnonzero(ds.is_test & np.isin(ds.req_user, list(anchored_users)))
        if 0 < len(anchored) < len(self.scopes["all"]):
            self.scopes["anchored"] = anchored
        # test row index -> position in ctx.test_rows (scores are computed once for all test rows)
        self.test_pos = np.full(len(ds.item), -1, np.int64)
        self.test_pos[ctx.test_rows] = np.arange(len(ctx.test_rows))

    def _rows(self, reqs: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Flat rows of ``reqs`` (optionally only where ``mask``) and their CSR offsets."""
        ptr = self.ds.ptr
        rows = np.concatenate([np.arange(ptr[r], ptr[r + 1]) for r in reqs]) if len(reqs) else np.zeros(0, np.int64)
        sizes = np.diff(ptr)[reqs]
        if mask is not None:
            keep = mask[rows]
            seg = np.repeat(np.arange(len(reqs)), sizes)
            sizes = np.bincount(seg[keep], minlength=len(reqs))
            rows = rows[keep]
        return rows, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def metrics(self, test_scores: np.ndarray, scope: str) -> dict[str, float]:
        ds = self.ds
        reqs = self.scopes[scope]
        keep = self.row_masks.get(scope)
        out: dict[str, float] = {}
        rows, ptr = self._rows(reqs, keep)
        s = test_scores[self.test_pos[rows]].astype(np.float64)
        lab = ds.label[rows]
        rel = lab == 1
        known = lab >= 0
        users = ds.req_user[ds.row_request[rows]]
        out["es_auc"] = M.auc(s[known], lab[known])
        out["es_gauc"] = M.gauc(s[known], lab[known], users[known])
        ranks = M.segment_ranks(s, ptr)
        for k in HR_KS:
            out[f"es_hr@{k}"] = M.hit_rate(s, rel, ptr, k, ranks)
        out["es_ndcg@10"] = M.ndcg(s, rel, ptr, 10, ranks)
        for k in CURVE_KS:
            out[f"curve_hr@{k}"] = M.hit_rate(s, rel, ptr, k, ranks)
        items = ds.item[rows]
        top = M.topk(s, ptr, 10)
        top_items = np.where(top >= 0, items[np.maximum(top, 0)], -1)
        out["tail_share@10"] = M.tail_share(top_items, self.is_tail)
        out["tail_hr@10"] = M.hit_rate(s, rel & self.is_tail[items], ptr, 10, ranks)
        out["coverage@10"] = M.category_coverage(top_items, ds.item_category)
        out["ild@10"] = M.intra_list_distance(top_items, self.vectors)
        erows, eptr = self._rows(reqs, ds.exposed if keep is None else ds.exposed & keep)
        es = test_scores[self.test_pos[erows]].astype(np.float64)
        elab = ds.label[erows]
        eusers = ds.req_user[ds.row_request[erows]]
        out["ex_auc"] = M.auc(es, elab)
        out["ex_gauc"] = M.gauc(es, elab, eusers)
        eranks = M.segment_ranks(es, eptr)
        for k in (3, 5):
            out[f"ex_hr@{k}"] = M.hit_rate(es, elab == 1, eptr, k, eranks)
        out["ex_ndcg@10"] = M.ndcg(es, elab == 1, eptr, 10, eranks)
        return out


__all__ = ["CURVE_KS", "Evaluator", "HEAD_FRACTION", "HR_KS"]
