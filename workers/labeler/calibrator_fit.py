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
   requests (:func:`~workers.labeler.training_log.training_histories` with a row mask);
3. the calibration rows are fold f's exposures, with their similarity features against those anchors
   and their prior features computed leave-one-out (the row's own exposure and click are taken out
   of the item and user counts);
4. :func:`workers.labeler.calibrator.fit_calibrator` fits on all rows; its 5-fold CV over *users*
   decides abstention. When it abstains for too few rows, the reason says why in the data's numbers
   (users, exposures, clicks, users with clicks in two folds) and what would give rows
   (:func:`too_little_data`).

Prior features come from :class:`~workers.labeler.training_log.TrainingPriors`: the same counts the
streaming labeler keeps (:class:`~workers.labeler.interaction_stats.InteractionStats`: recalls and
exposures per item, over the requests counted; exposures and clicks per user), here over the training
period.

Used by ``gpl eval`` (the GPL rows), ``gpl calibrate`` (writes the artifact the labeler loads) and
``gpl demo`` (:func:`fit_dataset_calibrator` on a training event set loaded with
``load_dataset(dir, training_only=True)``): any :class:`~workers.labeler.training_log.TrainingLog`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from runtime.settings import Settings
from runtime.vectors.normalize import normalize
from workers.anchors.vector_anchors import ContentAnchorSource
from workers.labeler.anchor_book import UserAnchors
from workers.labeler.calibrator import CalibrationFit, fit_calibrator
from workers.labeler.features import (
    FEATURES,
    PRIOR_FEATURES,
    anchor_weights,
    feature_matrix,
    similarity_features,
)
from workers.labeler.training_log import (
    FOLDS,
    TrainingLog,
    TrainingPriors,
    few_requests,
    row_folds,
    training_histories,
)

FEATURE_SETS: dict[str, tuple[str, ...]] = {"content": FEATURES, "priors": PRIOR_FEATURES}
DEFAULT_FEATURE_SET = "priors"  # the validation rule's winner (docs/eval.md, "How the defaults were chosen")
SIMILARITY = frozenset({"s1", "s2", "s_mean", "s_cent"})
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


def content_user_anchors(users: list[str], histories: dict[int, np.ndarray], item_vectors: np.ndarray, *,
                         k: int) -> dict[int, UserAnchors]:
    """The streaming ``content`` backend's anchors (k-means clusters of each user's history vectors) for
    every user in ``histories``; ``users`` maps a dense user to the id the anchors carry."""
    src = ContentAnchorSource()
    out: dict[int, UserAnchors] = {}
    for u, hist in histories.items():
        a = src.one(item_vectors[hist], k)
        if len(a):
            out[u] = UserAnchors.of(a.vectors, np.asarray(a.logprobs, np.float32), history=hist, user_id=users[u],
                                    model=src.model, prompt_hash=src.prompt_hash, texts=tuple(a.labels))
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


def cross_fit_rows(ds: TrainingLog, item_vectors: np.ndarray, settings: Settings, *, features: tuple[str, ...],
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


def too_little_data(ds: TrainingLog, cf: CrossFitRows, requests: np.ndarray, features: tuple[str, ...],
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


def exploration_slice(ds: TrainingLog, requests: np.ndarray) -> tuple[np.ndarray | None, dict[str, float]]:
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


def fit_dataset_calibrator(ds: TrainingLog, item_vectors: np.ndarray, settings: Settings, *,
                           features: tuple[str, ...] = FEATURES, anchor_fn: AnchorFn | None = None,
                           requests: np.ndarray | None = None, folds: int = FOLDS, l2: float = L2) -> CalibrationFit:
    """Cross-fit and fit the calibrator on the training period of ``ds`` (or the ``requests`` given).

    ``anchor_fn`` defaults to the content anchors (``anchors.k`` clusters). The artifact is made for
    ``encoder.model`` and ``labeler.catalogue``, so the streaming labeler accepts it. Returns the
    :class:`~workers.labeler.calibrator.CalibrationFit` (``abstain`` with the reason when it does not
    beat the base rate on held-out users: the caller then makes no pseudo-labels).
    """
    if anchor_fn is None and SIMILARITY & set(features):
        users, k = ds.users, settings.anchors.k

        def anchor_fn(hists: dict[int, np.ndarray]) -> dict[int, UserAnchors]:
            return content_user_anchors(users, hists, item_vectors, k=k)
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
