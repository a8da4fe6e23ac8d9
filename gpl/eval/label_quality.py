"""How good each method's added labels are: against the truth, in the student's hands, in the closed loop.

Why a module of its own: these diagnostics (results.json ``pseudo_labels`` and ``closed_loop_calibration``,
the ``pl_*`` and ``fid_*`` columns) judge the labels a method adds to the exposed training data, not the
ranking its student ends with (gpl/eval/scopes.py, gpl/eval/metrics.py); the driver (gpl/eval/run.py)
calls them once per method and seed, and none of them feeds back into training.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpl.eval import metrics as M
from gpl.eval.anchor_sources import SourceAnchors
from gpl.eval.context import Context
from gpl.eval.dataset import EvalDataset
from gpl.eval.methods import StudentNet, predict
from gpl.eval.metrics import label_fidelity
from gpl.eval.pseudo import PseudoLabels
from workers.calibration import CalibrationBook

PL_KEYS = ("pl_mean", "pl_truth_rate", "pl_auc", "pl_auc_all", "pl_ece", "pl_w_auc", "pl_w_ece")


def pseudo_quality(ds: EvalDataset, rows: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> dict[str, Any]:
    """Soft labels against the truth where it is known: AUC, ECE, truth rate, reliability curve; and the
    weights: AUC of w against correctness (|p - y| < 0.5) and ECE of w against agreement 1 - |y - p|."""
    lab = ds.label[rows]
    known = lab >= 0
    y, q = lab[known].astype(np.float64), np.asarray(p, np.float64)[known]
    wk = np.ones(len(q)) if w is None else np.asarray(w, np.float64)[known]
    mp, my, cnt = M.reliability(q, y, 10)
    return {
        "pl_truth_rate": float(y.mean()) if len(y) else float("nan"),
        "pl_w_auc": M.auc(wk, (np.abs(q - y) < 0.5).astype(np.int64)),
        "pl_w_ece": M.ece(np.clip(wk, 0.0, 1.0), 1.0 - np.abs(y - q), 10),
        "pl_auc": M.auc(q, y),
        "pl_auc_all": M.auc(np.asarray(p, np.float64), (lab == 1).astype(np.int64)),
        "pl_mean": float(np.mean(p)) if len(p) else float("nan"),
        "pl_ece": M.ece(q, y, 10),
        "pl_known": int(known.sum()),
        "pl_rows": int(len(rows)),
        "reliability": {
            "predicted": [None if not np.isfinite(v) else float(v) for v in mp],
            "observed": [None if not np.isfinite(v) else float(v) for v in my],
            "count": cnt.tolist(),
        },
    }


def student_fidelity(student: StudentNet, ctx: Context, rows: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """The trained student's agreement with the order of its own added labels, per training request
    (``fid_spearman``, ``fid_overlap@10``; :func:`gpl.eval.metrics.label_fidelity`)."""
    if not len(rows):
        return {}
    scores, _ = predict(student, ctx, ctx.row_user[rows], ctx.ds.item[rows], ctx.row_request[rows])
    fid = label_fidelity(scores, p, ctx.row_request[rows])
    return {f"fid_{k}": v for k, v in fid.items()}


def closed_loop(ds: EvalDataset, labels: PseudoLabels, book_meta: SourceAnchors) -> dict[str, Any]:
    """Replay the dataset through :class:`CalibrationBook`: GPL's training pseudo-labels, joined with
    the real labels the same (user, item) got in any later request (training or test)."""
    cal = CalibrationBook(capacity=10_000_000)
    req_of_pl = ds.row_request[labels.rows]
    order = np.argsort(req_of_pl, kind="stable")
    pl_rows, pl_req = labels.rows[order], req_of_pl[order]
    pl_bounds = np.searchsorted(pl_req, np.arange(ds.n_requests + 1))
    ex_rows = np.flatnonzero(ds.exposed)
    ex_req = ds.row_request[ex_rows]
    ex_bounds = np.searchsorted(ex_req, np.arange(ds.n_requests + 1))
    p_sorted, w_sorted = labels.p[order], labels.w[order]
    for r in range(ds.n_requests):  # requests are in time order
        user = ds.users[int(ds.req_user[r])]
        ea, eb = ex_bounds[r], ex_bounds[r + 1]
        if eb > ea:
            er = ex_rows[ea:eb]
            cal.join([user] * len(er), ds.item_ids[ds.item[er]].tolist(), ds.label[er].tolist())
        pa, pb = pl_bounds[r], pl_bounds[r + 1]
        if pb > pa:
            pr = pl_rows[pa:pb]
            anchors = book_meta.users.get(int(ds.req_user[r]))  # None: a prior-only label without anchors
            fb = bool(anchors.fallback) if anchors is not None else False
            cal.remember(
                [user] * len(pr),
                ds.item_ids[ds.item[pr]].tolist(),
                p_sorted[pa:pb].tolist(),
                w_sorted[pa:pb].tolist(),
                (book_meta.model, book_meta.prompt_hash, fb),
                [1] * len(pr),
            )
    return cal.snapshot()
