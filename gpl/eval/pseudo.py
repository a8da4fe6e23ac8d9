"""GPL pseudo-labels for the offline comparison, made by the labeler's own code (workers/labeler/).

Nothing of the method is re-implemented here: every request's unexposed training candidates go
through :func:`workers.labeler.pseudo_labels.label_candidates` — the streaming labeler's match → features
→ calibrated label → sample → confidence weight step — with the labeler's per-request draw
(:class:`~workers.labeler.sampling.RequestRng`). This module only feeds it arrays: the user's anchors,
the unit history centroid, and the candidates' prior features from the training period
(:class:`workers.labeler.training_log.TrainingPriors`, the counts the labeler keeps online).

The label is a :class:`~workers.labeler.calibrator.Calibrator` cross-fitted on the training period
(:mod:`workers.labeler.calibrator_fit`), or — for the ``gpl-map`` ablation only — the configured fixed
:class:`~workers.labeler.label_map.LabelMap`. A calibrator that abstains means no pseudo-labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpl.eval.anchor_sources import SourceAnchors
from gpl.eval.dataset import EvalDataset
from runtime.settings import LabelerSettings
from workers.labeler.anchor_book import no_anchors
from workers.labeler.calibrator import Calibrator
from workers.labeler.calibrator_fit import unit_centroid
from workers.labeler.confidence import TERMS, consistency_of
from workers.labeler.features import needs_anchors
from workers.labeler.label_map import LabelMap
from workers.labeler.pseudo_labels import label_candidates
from workers.labeler.sampling import RequestRng
from workers.labeler.training_log import TrainingPriors
from workers.model import whole_logit


@dataclass
class PseudoLabels:
    rows: np.ndarray  # flat row indices (training, unexposed)
    p: np.ndarray  # float64 pseudo-labels
    w: np.ndarray  # float64 confidence weights
    sim: np.ndarray
    terms: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    prior: np.ndarray | None = None  # float64: the priors' part of each label's logit (the rank term's offset)

    @staticmethod
    def empty(info: dict[str, Any]) -> PseudoLabels:
        z = np.zeros(0)
        return PseudoLabels(np.zeros(0, np.int64), z, z, z, {t: z for t in TERMS}, info, z)


def gpl_labels(
    ds: EvalDataset,
    item_vectors: np.ndarray,
    book: SourceAnchors,
    cfg: LabelerSettings,
    label: LabelMap | Calibrator,
    seed: int,
    priors: TrainingPriors | None = None,
    requests: np.ndarray | None = None,
) -> PseudoLabels:
    """Pseudo-label the unexposed training candidates of every anchored user (of every user, for a calibrator
    that reads no similarity — as the labeler does), request by request.

    Each request goes through :func:`workers.labeler.pseudo_labels.label_candidates` with the request's
    draw from the labeler's :class:`~workers.labeler.sampling.RequestRng` (seeded by ``labeler.seed`` +
    the eval seed). ``requests`` (bool per request) defaults to the training requests.
    """
    train = ~ds.is_test if requests is None else np.asarray(requests, bool)
    if isinstance(label, Calibrator) and priors is None:
        priors = TrainingPriors.of(ds, train)
    rows = np.flatnonzero(~ds.exposed & train[ds.row_request])
    users = ds.row_user[rows]
    # as in the stream: a calibrator that reads no similarity labels users without anchors too (stand-in set)
    stand_in = isinstance(label, Calibrator) and not needs_anchors(label.features)
    if not stand_in:
        rows = rows[np.isin(users, np.fromiter(book.users, np.int64, len(book.users)))]
    rows = rows[np.argsort(ds.row_request[rows], kind="stable")]
    req = ds.row_request[rows]
    request_rng = RequestRng(cfg.seed + seed)
    per_user: dict[int, tuple[float, np.ndarray]] = {}
    out_rows, out_p, out_w, out_sim, out_prior = [], [], [], [], []
    out_terms: dict[str, list[np.ndarray]] = {t: [] for t in TERMS}
    bounds = np.flatnonzero(np.diff(req)) + 1
    for part in np.split(np.arange(len(rows)), bounds):
        if not len(part):
            continue
        r = int(req[part[0]])
        u = int(ds.req_user[r])
        a = book.users.get(u) or no_anchors(ds.users[u], item_vectors.shape[1], "")
        if u not in per_user:
            cons = consistency_of(a.vectors, item_vectors[a.history]) if cfg.use_consistency else 1.0
            per_user[u] = (cons, unit_centroid(a, item_vectors))
        consistency, centroid = per_user[u]
        items = ds.item[rows[part]]
        pri = priors.features(items, u) if isinstance(label, Calibrator) and priors is not None else None
        lab = label_candidates(items, item_vectors[items], a, consistency=consistency, label=label, cfg=cfg,
                               rng=request_rng(ds.request_ids[r]), centroid=centroid, priors=pri)
        out_rows.append(rows[part][lab.pos])
        out_p.append(lab.label)
        out_w.append(lab.weight)
        out_sim.append(lab.sim)
        out_prior.append(lab.prior if lab.prior is not None else whole_logit(lab.label))  # all prior: no residual
        for t in TERMS:
            out_terms[t].append(lab.terms[t])
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))  # noqa: E731
    sel_rows = cat(out_rows, np.int64)
    order = np.argsort(sel_rows, kind="stable")
    sel_rows = sel_rows[order]
    p, w, sim = cat(out_p, np.float64)[order], cat(out_w, np.float64)[order], cat(out_sim, np.float64)[order]
    terms = {t: cat(v, np.float64)[order] for t, v in out_terms.items()}
    prior = cat(out_prior, np.float64)[order]
    labeled_users = ds.row_user[sel_rows]
    info = {
        "rows": int(len(sel_rows)),
        "users": int(len(np.unique(labeled_users))),
        "label": label.describe(),
        "mean_p": float(p.mean()) if len(p) else 0.0,
        "mean_w": float(w.mean()) if len(w) else 0.0,
        "mean_terms": {t: float(v.mean()) if len(v) else 0.0 for t, v in terms.items()},
    }
    return PseudoLabels(rows=sel_rows, p=p, w=w, sim=sim, terms=terms, info=info, prior=prior)


__all__ = ["PseudoLabels", "gpl_labels"]
