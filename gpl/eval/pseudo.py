"""GPL pseudo-labels for the offline comparison, made by the labeler's own code (workers/labeling.py).

Nothing of the method is re-implemented here: matching is :func:`workers.labeling.score`, the
sampling policy :func:`~workers.labeling.sample` seeded per request by
:class:`~workers.labeling.RequestRng`, the label map :class:`~workers.labeling.LabelMap` fitted by
:func:`~workers.labeling.fit_label_map`, the weight :func:`~workers.labeling.confidence` with
:func:`~workers.labeling.coherence_of` and :func:`~workers.labeling.consistency_of`. This module
only feeds them arrays from the dataset.

Calibration (no test data involved): the label map is fitted on TRAINING exposures of the users that
have anchors, scored against those anchors, *excluding the items the anchors were generated from*.
Those items are by construction next to an anchor and all clicked: keeping them would teach the map
that high similarity means "clicked" far more than it does for a fresh candidate. When the fit fails
(similarity does not rank clicks above non-clicks) the configured map is kept and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpl.eval.anchors import AnchorBook
from gpl.eval.dataset import EvalDataset
from gpl.runtime.settings import LabelerSettings
from workers.labeling.confidence import TERMS, coherence_of, confidence, consistency_of
from workers.labeling.label_map import LabelMap, fit_label_map
from workers.labeling.matching import score
from workers.labeling.sampling import RequestRng, sample


@dataclass
class PseudoLabels:
    rows: np.ndarray  # flat row indices (training, unexposed)
    p: np.ndarray  # float64 pseudo-labels
    w: np.ndarray  # float64 confidence weights
    sim: np.ndarray
    terms: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def similarities(
    ds: EvalDataset, item_vectors: np.ndarray, book: AnchorBook, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows kept, sim, matched) for the rows whose user has anchors; one matmul per user."""
    users = ds.req_user[ds.row_request[rows]]
    has = np.isin(users, np.fromiter(book.users, np.int64, len(book.users)))
    rows, users = rows[has], users[has]
    order = np.argsort(users, kind="stable")
    rows, users = rows[order], users[order]
    sim = np.empty(len(rows), np.float64)
    matched = np.empty(len(rows), np.int64)
    bounds = np.flatnonzero(np.diff(users)) + 1
    for part in np.split(np.arange(len(rows)), bounds):
        if not len(part):
            continue
        a = book.users[int(users[part[0]])]
        s, m = score(a.vectors, item_vectors[ds.item[rows[part]]])
        sim[part], matched[part] = s, m
    back = np.argsort(rows, kind="stable")
    return rows[back], sim[back], matched[back]


def fit_map(
    ds: EvalDataset, item_vectors: np.ndarray, book: AnchorBook, cfg: LabelerSettings
) -> tuple[LabelMap, dict[str, Any]]:
    """The label map fitted on training exposures (history items excluded); the configured one on failure."""
    train = ~ds.is_test[ds.row_request]
    rows = np.flatnonzero(ds.exposed & train)
    rows, sim, _ = similarities(ds, item_vectors, book, rows)
    users = ds.req_user[ds.row_request[rows]]
    in_hist = np.zeros(len(rows), bool)
    for u, a in book.users.items():
        m = users == u
        if m.any():
            in_hist[m] = np.isin(ds.item[rows[m]], a.history)
    y = ds.label[rows][~in_hist].astype(np.float64)
    s = sim[~in_hist]
    configured = LabelMap.from_settings(cfg)
    info: dict[str, Any] = {
        "fit_rows": int(len(s)),
        "fit_clicks": int(y.sum()),
        "excluded_history_rows": int(in_hist.sum()),
    }
    try:
        fitted = fit_label_map(s, y)
    except ValueError as e:
        info |= {"fitted": False, "reason": str(e), "map": configured.describe()}
        return configured, info
    info |= {
        "fitted": True,
        "map": fitted.describe(),
        "center": fitted.center,
        "temperature": fitted.temperature,
    }
    return fitted, info


def gpl_labels(
    ds: EvalDataset,
    item_vectors: np.ndarray,
    book: AnchorBook,
    cfg: LabelerSettings,
    label_map: LabelMap,
    seed: int,
) -> PseudoLabels:
    """Sample and pseudo-label the unexposed training candidates of every anchored user."""
    train = ~ds.is_test[ds.row_request]
    rows, sim, matched = similarities(ds, item_vectors, book, np.flatnonzero(~ds.exposed & train))
    req = ds.row_request[rows]
    request_rng = RequestRng(cfg.seed + seed)  # the labeler's per-request draw, shifted by the eval seed
    keep: list[np.ndarray] = []
    bounds = np.flatnonzero(np.diff(req)) + 1
    for part in np.split(np.arange(len(rows)), bounds):
        if not len(part):
            continue
        rid = ds.request_ids[int(req[part[0]])]
        keep.append(part[sample(sim[part], cfg.top_n, cfg.random_n, cfg.cap, request_rng(rid))])
    sel = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
    rows, sim, matched = rows[sel], sim[sel], matched[sel]
    p = label_map(sim)
    w = np.ones(len(rows))
    terms = {t: np.ones(len(rows)) for t in TERMS}
    users = ds.req_user[ds.row_request[rows]]
    for u in np.unique(users).tolist():
        m = users == u
        a = book.users[u]
        coh = coherence_of(a.vectors)
        con = consistency_of(a.vectors, item_vectors[a.history]) if cfg.use_consistency else 1.0
        wu, tu = confidence(coherence=coh, consistency=con, logprobs=a.logprobs, matched=matched[m], p=p[m], cfg=cfg)
        w[m] = wu
        for t in TERMS:
            terms[t][m] = tu[t]
    info = {
        "rows": int(len(rows)),
        "users": int(len(np.unique(users))),
        "mean_p": float(p.mean()) if len(p) else 0.0,
        "mean_w": float(w.mean()) if len(w) else 0.0,
        "mean_terms": {t: float(v.mean()) if len(v) else 0.0 for t, v in terms.items()},
    }
    return PseudoLabels(rows=rows, p=p, w=w, sim=sim, terms=terms, info=info)


__all__ = ["PseudoLabels", "similarities", "fit_map", "gpl_labels"]
