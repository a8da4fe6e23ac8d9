"""GPL pseudo-labels for the offline comparison, made by the labeler's own code (workers/labeling.py).

Nothing of the method is re-implemented here: every request is labeled by the labeler's own
:func:`workers.labeling.assemble.label_candidates` (match, sampling policy, label map, confidence
weight), with the labeler's per-request draw (:class:`~workers.labeling.sampling.RequestRng`); the map
is fitted by :func:`workers.labeling.label_map.fit_label_map`. This module only feeds them arrays.

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

from gpl.eval.anchors import SourceAnchors
from gpl.eval.dataset import EvalDataset
from gpl.runtime.settings import LabelerSettings
from workers.labeling.assemble import label_candidates
from workers.labeling.confidence import TERMS, consistency_of
from workers.labeling.label_map import LabelMap, fit_label_map
from workers.labeling.matching import score
from workers.labeling.sampling import RequestRng


@dataclass
class PseudoLabels:
    rows: np.ndarray  # flat row indices (training, unexposed)
    p: np.ndarray  # float64 pseudo-labels
    w: np.ndarray  # float64 confidence weights
    sim: np.ndarray
    terms: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def similarities(
    ds: EvalDataset, item_vectors: np.ndarray, book: SourceAnchors, rows: np.ndarray
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
    ds: EvalDataset, item_vectors: np.ndarray, book: SourceAnchors, cfg: LabelerSettings
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
    book: SourceAnchors,
    cfg: LabelerSettings,
    label_map: LabelMap,
    seed: int,
) -> PseudoLabels:
    """Pseudo-label the unexposed training candidates of every anchored user, request by request.

    Each request goes through :func:`workers.labeling.assemble.label_candidates`, the labeler's own
    match → sample → label → weight step, with the request's draw from the labeler's
    :class:`~workers.labeling.sampling.RequestRng` (seeded by ``labeler.seed`` + the eval seed).
    """
    train = ~ds.is_test[ds.row_request]
    rows = np.flatnonzero(~ds.exposed & train)
    users = ds.req_user[ds.row_request[rows]]
    rows = rows[np.isin(users, np.fromiter(book.users, np.int64, len(book.users)))]
    rows = rows[np.argsort(ds.row_request[rows], kind="stable")]
    req = ds.row_request[rows]
    request_rng = RequestRng(cfg.seed + seed)
    consistency: dict[int, float] = {}
    out_rows, out_p, out_w, out_sim = [], [], [], []
    out_terms: dict[str, list[np.ndarray]] = {t: [] for t in TERMS}
    bounds = np.flatnonzero(np.diff(req)) + 1
    for part in np.split(np.arange(len(rows)), bounds):
        if not len(part):
            continue
        r = int(req[part[0]])
        u = int(ds.req_user[r])
        a = book.users[u]
        if u not in consistency:
            consistency[u] = consistency_of(a.vectors, item_vectors[a.history]) if cfg.use_consistency else 1.0
        items = ds.item[rows[part]]
        lab = label_candidates(items, item_vectors[items], a, consistency=consistency[u], label=label_map,
                               cfg=cfg, rng=request_rng(ds.request_ids[r]))
        out_rows.append(rows[part][lab.pos])
        out_p.append(lab.label)
        out_w.append(lab.weight)
        out_sim.append(lab.sim)
        for t in TERMS:
            out_terms[t].append(lab.terms[t])
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))  # noqa: E731
    sel_rows = cat(out_rows, np.int64)
    order = np.argsort(sel_rows, kind="stable")
    sel_rows = sel_rows[order]
    p, w, sim = cat(out_p, np.float64)[order], cat(out_w, np.float64)[order], cat(out_sim, np.float64)[order]
    terms = {t: cat(v, np.float64)[order] for t, v in out_terms.items()}
    labeled_users = ds.req_user[ds.row_request[sel_rows]]
    info = {
        "rows": int(len(sel_rows)),
        "users": int(len(np.unique(labeled_users))),
        "mean_p": float(p.mean()) if len(p) else 0.0,
        "mean_w": float(w.mean()) if len(w) else 0.0,
        "mean_terms": {t: float(v.mean()) if len(v) else 0.0 for t, v in terms.items()},
    }
    return PseudoLabels(rows=sel_rows, p=p, w=w, sim=sim, terms=terms, info=info)


__all__ = ["PseudoLabels", "similarities", "fit_map", "gpl_labels"]
