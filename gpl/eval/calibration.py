"""Fitting the pseudo-label calibrator on a training period, without leakage (cross-fitting).

The calibrator (:mod:`workers.labeler.calibrator`) maps the features of a (user, candidate) pair
(:mod:`workers.labeler.features`) to a click probability. It can only be fitted on rows with a real
label, i.e. exposures, and those rows must be scored against anchors that did *not* see them: anchors
built from a user's clicks sit on those very clicks (s1 = 1), and a calibrator fitted on them learns a
slope that fresh candidates do not have. So:

1. each user's training exposures are dealt into ``folds`` (3) interleaved folds (:func:`row_folds`):
   a user shown exposures in at least ``folds`` training requests by request, in time order (request j
   of the user → fold j mod 3, every exposure of a request in its fold); a user shown exposures in
   fewer by exposure, in the order shown (request time, then position: exposure j → fold j mod 3).
   Either way each exposure lies in exactly one fold, so no row is scored against anchors built from its
   own click. Folding by request keeps one screen's exposures together, but a user with one or two
   training requests would then have no click outside the fold being calibrated — on a data set of one
   training request per user no anchor could be built at all, and every anchor-feature calibrator
   would abstain for want of rows;
2. for fold f, the user's anchors are built from the clicks of the OTHER folds only (the anchor
   source's own rule: for content anchors the stream's k-means over the last ``anchors.history_items``
   distinct clicks, :class:`~workers.anchors.vector_anchors.ContentAnchorSource`), and the history centroid
   from the same clicks — for a user folded by exposure, the clicks of the other exposures of the same
   requests (:func:`~gpl.eval.anchor_sources.training_histories` with a row mask);
3. the calibration rows are fold f's exposures, with their similarity features against those anchors
   and their prior features computed leave-one-out (the row's own exposure and click are taken out
   of the item and user counts);
4. :func:`workers.labeler.calibrator.fit_calibrator` fits on all rows; its 5-fold CV over *users*
   decides abstention. When it abstains for too few rows, the reason says why in the data's numbers
   (users, exposures, clicks, users with clicks in two folds) and what would give rows
   (:func:`too_little_data`).

Prior features come from :class:`TrainingPriors`: the same counts the streaming labeler keeps
(:class:`~workers.labeler.interaction_stats.InteractionStats`: recalls and exposures per item, over
the requests counted; exposures and clicks per user), here over the training period.

Used by ``gpl eval`` (the GPL rows), ``gpl calibrate`` (writes the artifact the labeler loads) and
``gpl demo`` (:func:`fit_dataset_calibrator` on a training event set loaded with
``load_dataset(dir, training_only=True)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from gpl.eval.anchor_sources import content_anchors, training_histories
from gpl.eval.dataset import EvalDataset
from runtime.settings import Settings
from runtime.vectors.normalize import normalize
from workers.labeler.anchor_book import UserAnchors
from workers.labeler.calibrator import CalibrationFit, fit_calibrator
from workers.labeler.features import (
    FEATURES,
    PRIOR_FEATURES,
    anchor_weights,
    feature_matrix,
    prior_features,
    similarity_features,
)

FEATURE_SETS: dict[str, tuple[str, ...]] = {"content": FEATURES, "priors": PRIOR_FEATURES}
DEFAULT_FEATURE_SET = "priors"  # the validation rule's winner (docs/eval.md, "How the defaults were chosen")
SIMILARITY = frozenset({"s1", "s2", "s_mean", "s_cent"})
FOLDS = 3
L2 = 1e-4
EXPLORATION_MIN_ROWS = 500  # exposures of exploration requests before the calibrator prefers them
EXPLORATION_MIN_CLICKS = 50

AnchorFn = Callable[[dict[int, np.ndarray]], dict[int, UserAnchors]]
"""Histories (dense user → dense item ids, most recent last) → that source's anchors per user."""


def unit_centroid(anchors: UserAnchors, item_vectors: np.ndarray) -> np.ndarray:
    """The unit mean of the anchors' history vectors (what ``AnchorBook.centroid`` gives the labeler)."""
    h = anchors.history
    if not len(h):
        return np.zeros(item_vectors.shape[1], np.float32)
    return normalize(item_vectors[h].mean(axis=0)).astype(np.float32)


@dataclass
class TrainingPriors:
    """The labeler's interaction counts over the requests in ``requests`` (bool per request)."""

    recalled: np.ndarray  # per item: candidate rows (exposed or not)
    exposed: np.ndarray  # per item: exposures
    requests: float
    user_exposures: np.ndarray  # per user
    user_clicks: np.ndarray
    ctr: float

    @classmethod
    def of(cls, ds: EvalDataset, requests: np.ndarray) -> TrainingPriors:
        rows = np.asarray(requests, bool)[ds.row_request]
        ex = ds.exposed & rows
        click = (ds.label == 1) & ex
        users = ds.row_user
        n_u = len(ds.users)
        return cls(recalled=np.bincount(ds.item[rows], minlength=ds.n_items).astype(np.float64),
                   exposed=np.bincount(ds.item[ex], minlength=ds.n_items).astype(np.float64),
                   requests=float(np.asarray(requests, bool).sum()),
                   user_exposures=np.bincount(users[ex], minlength=n_u).astype(np.float64),
                   user_clicks=np.bincount(users[click], minlength=n_u).astype(np.float64),
                   ctr=float(click.sum() / max(ex.sum(), 1)))

    def features(self, items: np.ndarray, user: int | np.ndarray,
                 own_click: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Prior features of ``items`` for ``user``; ``own_click`` given: the rows are counted exposures,
        and each row's own exposure and click are left out (leave-one-out)."""
        exp = self.exposed[items]
        ue, uc = self.user_exposures[user], self.user_clicks[user]
        if own_click is not None:
            exp, ue, uc = exp - 1.0, ue - 1.0, uc - np.asarray(own_click, np.float64)
        return prior_features(self.recalled[items], exp, self.requests, np.maximum(ue, 0.0), np.maximum(uc, 0.0),
                              self.ctr)


def request_folds(ds: EvalDataset, requests: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Fold of each request in ``requests`` (-1 elsewhere): its rank in time among the user's, mod ``folds``."""
    req = np.flatnonzero(requests)
    req = req[np.lexsort((req, ds.req_ts[req], ds.req_user[req]))]
    u = ds.req_user[req]
    start = np.r_[True, u[1:] != u[:-1]] if len(u) else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(start, np.arange(len(req)), 0)) if len(req) else req
    fold = np.full(ds.n_requests, -1, np.int64)
    fold[req] = (np.arange(len(req)) - first) % folds
    return fold


def few_requests(ds: EvalDataset, requests: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Per user: True when they have training exposures in fewer than ``folds`` of ``requests``
    (such a user is folded by exposure, :func:`row_folds`)."""
    req = np.asarray(requests, bool)
    shown = np.bincount(ds.row_request[ds.exposed], minlength=ds.n_requests) > 0
    n_req = np.bincount(ds.req_user[req & shown], minlength=len(ds.users))
    return (n_req > 0) & (n_req < folds)


def row_folds(ds: EvalDataset, requests: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Fold of each exposed row of ``requests`` (-1 for other rows: unexposed, or outside ``requests``).

    A user with exposures in at least ``folds`` requests: the fold of the row's request
    (:func:`request_folds`). A user with fewer: their exposures in the order shown (request time,
    request, position) dealt one by one, exposure j → fold j mod ``folds`` (module docstring, why).
    """
    req = np.asarray(requests, bool)
    out = np.full(len(ds.item), -1, np.int64)
    ex = np.flatnonzero(ds.exposed & req[ds.row_request])
    few = few_requests(ds, req, folds)
    by_request = ex[~few[ds.row_user[ex]]]
    out[by_request] = request_folds(ds, req & ~few[ds.req_user], folds)[ds.row_request[by_request]]
    rows = ex[few[ds.row_user[ex]]]
    r = ds.row_request[rows]
    rows = rows[np.lexsort((rows, ds.position[rows], r, ds.req_ts[r], ds.req_user[r]))]
    u = ds.row_user[rows]
    start = np.r_[True, u[1:] != u[:-1]] if len(u) else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(start, np.arange(len(rows)), 0)) if len(rows) else rows
    out[rows] = (np.arange(len(rows)) - first) % folds
    return out


def similarity_parts(items: np.ndarray, anchors: UserAnchors, item_vectors: np.ndarray) -> dict[str, np.ndarray]:
    """The similarity features of ``items`` against one user's anchors, as ``label_candidates`` computes them."""
    v = item_vectors[items]
    return similarity_features(v @ anchors.vectors.T, v @ unit_centroid(anchors, item_vectors),
                               anchor_weights(anchors.logprobs))


@dataclass
class CrossFitRows:
    x: np.ndarray  # (n, F) features in the calibrator's column order
    y: np.ndarray  # clicks
    users: np.ndarray  # dense user of each row (CV groups)
    rows: np.ndarray  # flat dataset rows
    fold: np.ndarray  # fold of each row (its request's, or its own for a user folded by exposure)
    anchor_history: list[dict[int, np.ndarray]]  # per fold: the histories its anchors were built from
    exposure_folded_users: int = 0  # users shown exposures in fewer training requests than folds (row_folds)


def cross_fit_rows(ds: EvalDataset, item_vectors: np.ndarray, settings: Settings, *, features: tuple[str, ...],
                   anchor_fn: AnchorFn | None, requests: np.ndarray | None = None, folds: int = FOLDS,
                   targets: np.ndarray | None = None) -> CrossFitRows:
    """Calibration rows: each fold's exposures against anchors built from the other folds (module docstring).

    ``targets`` (bool per flat row) keeps only those exposures as calibration rows (the exploration slice);
    the anchors and histories still come from every click of the other folds."""
    train = ~ds.is_test if requests is None else np.asarray(requests, bool)
    fold = row_folds(ds, train, folds)
    priors = TrainingPriors.of(ds, train)
    needs_anchors = bool(SIMILARITY & set(features))
    if needs_anchors and anchor_fn is None:
        raise ValueError(f"features {features} need anchors: pass an anchor source")
    ex_rows = np.flatnonzero((fold >= 0) & (True if targets is None else np.asarray(targets, bool)))
    xs, ys, us, rs, fs, hists = [], [], [], [], [], []
    for f in range(folds):
        hist = training_histories(ds, settings.anchors.history_items, train, rows=(fold >= 0) & (fold != f))
        hists.append(hist)
        book = anchor_fn(hist) if needs_anchors and anchor_fn is not None else {}
        rows = ex_rows[fold[ex_rows] == f]
        users = ds.row_user[rows]
        rows, users = rows[np.argsort(users, kind="stable")], np.sort(users, kind="stable")
        bounds = np.flatnonzero(np.diff(users)) + 1
        for part in np.split(np.arange(len(rows)), bounds):
            if not len(part):
                continue
            u = int(users[part[0]])
            r = rows[part]
            items = ds.item[r]
            y = (ds.label[r] == 1).astype(np.float64)
            parts = priors.features(items, u, y)
            if needs_anchors:
                a = book.get(u)
                if a is None:  # no anchors for this user from the other folds: the stream would not label
                    continue
                parts |= similarity_parts(items, a, item_vectors)
            xs.append(feature_matrix(features, parts))
            ys.append(y)
            us.append(np.full(len(r), u))
            rs.append(r)
            fs.append(np.full(len(r), f))
    cat = (lambda a, dt: np.concatenate(a).astype(dt) if a else np.zeros(0, dt))  # noqa: E731
    x = np.concatenate(xs) if xs else np.zeros((0, len(features)))
    return CrossFitRows(x, cat(ys, np.float64), cat(us, np.int64), cat(rs, np.int64), cat(fs, np.int64), hists,
                        exposure_folded_users=int(few_requests(ds, train, folds).sum()))


def too_little_data(ds: EvalDataset, cf: CrossFitRows, requests: np.ndarray, features: tuple[str, ...],
                    folds: int = FOLDS) -> str:
    """Why cross-fitting gave too few rows to fit on, in the data's numbers, and what would give more.

    A calibration row needs its user's anchors from a click in another fold, and the fit needs clicks
    among the rows: so what counts is users with clicks in at least two folds, i.e. with at least two
    clicked exposures (one to anchor on, one to learn from).
    """
    req = np.asarray(requests, bool)
    fold = row_folds(ds, req, folds)
    ex = fold >= 0
    click = ex & (ds.label == 1)
    users = np.unique(ds.row_user[ex])
    pairs = np.unique(ds.row_user[click] * folds + fold[click])
    two_folds = int((np.bincount(pairs // folds, minlength=len(ds.users)) >= 2).sum())
    two_clicks = int((np.bincount(ds.row_user[click], minlength=len(ds.users)) >= 2).sum())
    counts = (f"training period: {len(users)} users, {int(ex.sum())} exposures, {int(click.sum())} clicks; "
              f"{two_clicks} users with ≥ 2 clicked exposures, {two_folds} with clicks in ≥ 2 of the {folds} folds")
    anchored = bool(SIMILARITY & set(features))
    if not ex.any():
        return (f"no exposed training rows in {int(req.sum())} training requests: the calibrator learns from "
                "exposures and their clicks — needs exposure events in the training period")
    if anchored and not len(cf.y):
        return (f"no user has a click in another fold to build anchors for their calibration rows from ({counts}) "
                "— needs users with ≥ 2 clicked exposures, or the 'priors' feature set, which needs no anchors")
    more = "more users with ≥ 2 clicked exposures" if anchored else "more clicked training exposures"
    return (f"{len(cf.y)} cross-fitted rows with {int(cf.y.sum())} clicks from {len(np.unique(cf.users))} users "
            f"({counts}) — fit_calibrator needs at least 50 rows, clicked and not: needs {more}")


def exploration_slice(ds: EvalDataset, requests: np.ndarray) -> tuple[np.ndarray | None, dict[str, float]]:
    """(rows to calibrate on, what was found): the exposures of exploration requests when there are enough of
    them, else None (every exposure).

    Why: a ranker chose the ordinary exposures, so their click rate is the rate of what a ranker liked, while
    the labeler labels what it did NOT show; an exposure drawn uniformly from the recall is a sample of the
    very candidates being labeled. The rule (fixed before measuring): prefer the slice when it holds at least
    ``EXPLORATION_MIN_CLICKS`` clicks and ``EXPLORATION_MIN_ROWS`` exposures, enough for the calibrator's
    few weights; below that its variance costs more than the selection bias it removes.
    """
    rows = ds.exposed & ds.explored[ds.row_request] & np.asarray(requests, bool)[ds.row_request]
    n, clicks = int(rows.sum()), int((ds.label[rows] == 1).sum())
    use = n >= EXPLORATION_MIN_ROWS and clicks >= EXPLORATION_MIN_CLICKS
    return (rows if use else None), {"exploration_rows": float(n), "exploration_clicks": float(clicks),
                                     "exploration_used": float(use)}


def fit_dataset_calibrator(ds: EvalDataset, item_vectors: np.ndarray, settings: Settings, *,
                           features: tuple[str, ...] = FEATURES, anchor_fn: AnchorFn | None = None,
                           requests: np.ndarray | None = None, folds: int = FOLDS, l2: float = L2) -> CalibrationFit:
    """Cross-fit and fit the calibrator on the training period of ``ds`` (or the ``requests`` given).

    ``anchor_fn`` defaults to the content anchors (``anchors.k`` clusters). The artifact is made for
    ``encoder.model`` and ``labeler.catalogue``, so the streaming labeler accepts it. Returns the
    :class:`~workers.labeler.calibrator.CalibrationFit` (``abstain`` with the reason when it does not
    beat the base rate on held-out users: the caller then makes no pseudo-labels).
    """
    if anchor_fn is None and SIMILARITY & set(features):
        anchor_fn = content_anchors(ds, {}, [], item_vectors, k=settings.anchors.k).make
    train = ~ds.is_test if requests is None else np.asarray(requests, bool)
    slice_rows, slice_info = exploration_slice(ds, train)
    if not settings.labeler.prefer_exploration:
        slice_rows, slice_info["exploration_used"] = None, 0.0
    cf = cross_fit_rows(ds, item_vectors, settings, features=features, anchor_fn=anchor_fn, requests=requests,
                        folds=folds, targets=slice_rows)
    fit = fit_calibrator(cf.x, cf.y, cf.users, features, encoder=settings.encoder.model,
                         catalogue=settings.labeler.catalogue, monotone="s1" if "s1" in features else None, l2=l2)
    fit.cv.update({"cross_fit_folds": float(folds), "cross_fit_users": float(len(np.unique(cf.users))),
                   "exposure_folded_users": float(cf.exposure_folded_users), **slice_info})
    if fit.abstain and fit.reason.startswith("too little data"):  # fit_calibrator's floor, explained here
        fit = replace(fit, reason=f"{fit.reason}: {too_little_data(ds, cf, train, features, folds)}")
    return fit


__all__ = ["AnchorFn", "CrossFitRows", "exploration_slice", "FEATURE_SETS", "PRIOR_FEATURES", "TrainingPriors",
           "cross_fit_rows", "few_requests", "fit_dataset_calibrator", "request_folds", "row_folds",
           "similarity_parts", "too_little_data", "unit_centroid"]
