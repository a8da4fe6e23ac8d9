"""A training period as the calibrator fit reads it: counts, click histories and folds.

:class:`TrainingLog` is the shape of the data (flat candidate rows grouped by request, per-request user and
time, exposure and click per row). The application's ``EvalDataset`` (gpl/eval/dataset.py) has this shape,
so ``gpl calibrate``, ``gpl eval`` and ``gpl demo`` fit the same way, and the rules live here, beside the
streaming labeler whose counts they mirror (:class:`~workers.labeler.interaction_stats.InteractionStats`).
Folding is explained in :mod:`workers.labeler.calibrator_fit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from workers.history import recent_distinct
from workers.labeler.features import prior_features

FOLDS = 3


class TrainingLog(Protocol):
    """Dense ids throughout: users ``0..len(users)-1``, items ``0..n_items-1``, requests ``0..n_requests-1``;
    the flat candidate rows are grouped by request. Read-only: the fit never changes the data."""

    @property
    def users(self) -> list[str]: ...  # external user id of each dense user

    @property
    def n_items(self) -> int: ...

    @property
    def n_requests(self) -> int: ...

    @property
    def req_user(self) -> np.ndarray: ...  # per request: its user

    @property
    def req_ts(self) -> np.ndarray: ...  # per request: event time

    @property
    def is_test(self) -> np.ndarray: ...  # per request: in the held-out period

    @property
    def explored(self) -> np.ndarray: ...  # per request: its exposures were a uniform draw of the recall

    @property
    def row_request(self) -> np.ndarray: ...  # per flat candidate row: its request

    @property
    def row_user(self) -> np.ndarray: ...  # per row: its request's user

    @property
    def item(self) -> np.ndarray: ...  # per row: the candidate (dense item)

    @property
    def exposed(self) -> np.ndarray: ...  # per row: shown to the user

    @property
    def label(self) -> np.ndarray: ...  # per row: 1 click, 0 none (exposed rows; others -1 or the truth)

    @property
    def position(self) -> np.ndarray: ...  # per row: rank on the screen, -1 unexposed


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
    def of(cls, ds: TrainingLog, requests: np.ndarray) -> TrainingPriors:
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


def request_folds(ds: TrainingLog, requests: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Fold of each request in ``requests`` (-1 elsewhere): its rank in time among the user's, mod ``folds``."""
    req = np.flatnonzero(requests)
    req = req[np.lexsort((req, ds.req_ts[req], ds.req_user[req]))]
    u = ds.req_user[req]
    start = np.r_[True, u[1:] != u[:-1]] if len(u) else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(start, np.arange(len(req)), 0)) if len(req) else req
    fold = np.full(ds.n_requests, -1, np.int64)
    fold[req] = (np.arange(len(req)) - first) % folds
    return fold


def few_requests(ds: TrainingLog, requests: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Per user: True when they have training exposures in fewer than ``folds`` of ``requests``
    (such a user is folded by exposure, :func:`row_folds`)."""
    req = np.asarray(requests, bool)
    shown = np.bincount(ds.row_request[ds.exposed], minlength=ds.n_requests) > 0
    n_req = np.bincount(ds.req_user[req & shown], minlength=len(ds.users))
    return (n_req > 0) & (n_req < folds)


def row_folds(ds: TrainingLog, requests: np.ndarray, folds: int = FOLDS) -> np.ndarray:
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


def training_histories(ds: TrainingLog, n: int, requests: np.ndarray | None = None,
                       rows: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Per user: the last ``n`` distinct items clicked in training requests (dense ids, most recent last).

    ``requests`` (bool per request) restricts the history to those requests instead (cross-fitting builds
    anchors from some folds of the training period only). ``rows`` (bool per flat row) restricts it
    further, ANDed with ``requests``: a user folded by exposure has all of their clicks in one request,
    and the anchors of one fold must leave out that fold's exposures, not the whole request.
    """
    mask = ~ds.is_test if requests is None else np.asarray(requests, bool)
    keep = ds.exposed & (ds.label == 1) & mask[ds.row_request]
    if rows is not None:
        keep &= np.asarray(rows, bool)
    rows = np.flatnonzero(keep)
    req = ds.row_request[rows]
    order = np.lexsort((ds.position[rows], ds.req_ts[req], ds.req_user[req]))
    rows, req = rows[order], req[order]
    users = ds.req_user[req]
    out: dict[int, np.ndarray] = {}
    bounds = np.flatnonzero(np.diff(users)) + 1
    for chunk, u_rows in zip(np.split(np.arange(len(rows)), bounds), np.split(users, bounds), strict=True):
        if not len(chunk):
            continue
        out[int(u_rows[0])] = np.asarray(recent_distinct(ds.item[rows[chunk]].tolist(), n), np.int64)
    return out
