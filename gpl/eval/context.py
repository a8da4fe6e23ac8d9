"""What every compared method of one dataset shares: its training rows and the tensors they index.

Why a module of its own: the methods (gpl/eval/methods.py), the KD teachers (gpl/eval/teacher.py,
gpl/eval/kd.py), the scopes (gpl/eval/scopes.py) and the anchor cross feature (gpl/eval/anchor_feature.py)
all read the same per-dataset state, built once: the dense id buckets and item vectors, the exposed
training rows, the unexposed training candidates, the test rows and the two causal history profiles (the
pre-ranker's own history input, the teacher's click-history feature). A method only adds :class:`Rows`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gpl.eval.dataset import EvalDataset
from runtime.settings import Settings
from runtime.vectors.normalize import normalize
from workers.history import history_profile, recent_distinct
from workers.model import ModelConfig, RankTerm, item_buckets, user_buckets


@dataclass
class Rows:
    """Training rows: dense user, dense item, request (for the teacher's history feature), target."""

    user: np.ndarray  # int64
    item: np.ndarray  # int64
    req: np.ndarray  # int64
    label: np.ndarray  # float32 in [0, 1]
    weight: np.ndarray  # float32 (w; λ is applied by loss_weights)
    pseudo: np.ndarray  # bool: weight by λ·w (True) or 1 (False)
    offset: np.ndarray | None = None  # float32: the priors' part of each label's logit (rank_target=residual)

    def __len__(self) -> int:
        return len(self.user)

    @staticmethod
    def empty() -> Rows:
        z = np.zeros(0, np.int64)
        return Rows(z, z, z, np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, bool))


class Context:
    """What every method of one dataset shares: vectors, id buckets, history profiles, row sets."""

    def __init__(self, ds: EvalDataset, item_vectors: np.ndarray, settings: Settings, *, epochs: int) -> None:
        self.ds = ds
        self.settings = settings
        self.epochs = epochs
        t = settings.trainer
        self.lr = t.lr
        self.batch_size = t.batch_size
        self.pseudo_lambda = t.pseudo_lambda
        self.rank = RankTerm.from_settings(t)
        self.vectors = torch.from_numpy(np.ascontiguousarray(item_vectors, np.float32))
        self.user_bucket = torch.from_numpy(user_buckets(ds.users, t.hash_buckets))
        self.item_bucket = torch.from_numpy(item_buckets(ds.item_ids, t.hash_buckets))
        self.model_config = ModelConfig.from_settings(t, int(item_vectors.shape[1]))
        self.row_request = ds.row_request
        self.row_user = ds.req_user[self.row_request]
        self.row_test = ds.is_test[self.row_request]
        ex = np.flatnonzero(ds.exposed & ~self.row_test)
        self.train_exposed = Rows(
            self.row_user[ex],
            ds.item[ex],
            self.row_request[ex],
            ds.label[ex].astype(np.float32),
            np.ones(len(ex), np.float32),
            np.zeros(len(ex), bool),
        )
        self.train_unexposed = np.flatnonzero(~ds.exposed & ~self.row_test)
        self.test_rows = np.flatnonzero(self.row_test)
        self.profiles = torch.from_numpy(history_profiles(ds, item_vectors))
        n = self.model_config.history_items  # the pre-ranker's own history input (the stream's rule)
        self.recent = torch.from_numpy(recent_profiles(ds, item_vectors, n)) if n else None
        self.anchor_x: torch.Tensor | None = None  # (rows, 2): the student's anchor cross feature per flat row
        self.row_of: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None  # (request, item) -> flat row

    def use_anchor_cross(self, x: np.ndarray, row_of: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        """Give the student (``trainer.anchor_cross``) its per-row feature (gpl/eval/anchor_feature.py)."""
        self.anchor_x, self.row_of = torch.from_numpy(np.asarray(x, np.float32)), row_of

    def rows_of(self, flat: np.ndarray, label: np.ndarray, weight: np.ndarray, pseudo: bool,
                offset: np.ndarray | None = None) -> Rows:
        return Rows(
            self.row_user[flat],
            self.ds.item[flat],
            self.row_request[flat],
            label.astype(np.float32),
            weight.astype(np.float32),
            np.full(len(flat), pseudo),
            None if offset is None else offset.astype(np.float32),
        )


def recent_profiles(ds: EvalDataset, item_vectors: np.ndarray, n: int) -> np.ndarray:
    """(R, dim): per request the pre-ranker's history input as the trainer builds it
    (:func:`workers.history.history_profile` of the user's last ``n`` distinct clicked items in EARLIER
    training requests); test requests get every training click (what is known at the cut)."""
    R = ds.n_requests
    out = np.zeros((R, item_vectors.shape[1]), np.float32)
    click = ds.exposed & (ds.label == 1) & ~ds.is_test[ds.row_request]
    rows = np.flatnonzero(click)
    by_req: dict[int, list[int]] = {}
    for r, it in zip(ds.row_request[rows].tolist(), ds.item[rows].tolist(), strict=True):
        by_req.setdefault(r, []).append(it)
    seen: dict[int, list[int]] = {}  # user -> clicked items so far, in time order
    for r in np.lexsort((np.arange(R), ds.is_test, ds.req_ts, ds.req_user)).tolist():
        u = int(ds.req_user[r])
        h = seen.get(u, [])
        if h:
            out[r] = history_profile(item_vectors[h])
        if r in by_req:  # the last n distinct of (the last n distinct so far + these) is exact
            seen[u] = recent_distinct([*h, *by_req[r]], n)
    return out


def history_profiles(ds: EvalDataset, item_vectors: np.ndarray) -> np.ndarray:
    """(R, dim): per request the normalised mean vector of the user's clicks in EARLIER training requests.

    Test requests get the mean over all of the user's training clicks (what is known at the cut); zero
    when there is none. Causal, so the teacher's feature never contains the label it is trained on.
    """
    dim = item_vectors.shape[1]
    R = ds.n_requests
    train_req = ~ds.is_test
    click = ds.exposed & (ds.label == 1) & train_req[ds.row_request]
    sums = np.zeros((R, dim), np.float64)
    np.add.at(sums, ds.row_request[click], item_vectors[ds.item[click]])
    order = np.lexsort((np.arange(R), ds.req_ts, ds.req_user))  # by user, then time
    u = ds.req_user[order]
    cs = np.cumsum(sums[order], axis=0)
    start = np.ones(R, bool)
    start[1:] = u[1:] != u[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(R), 0))
    before = cs - sums[order]  # exclusive cumsum ...
    base = np.where(first[:, None] > 0, cs[np.maximum(first - 1, 0)], 0.0)
    prof_sorted = before - base  # ... restarted per user
    prof = np.empty_like(prof_sorted)
    prof[order] = prof_sorted
    total = np.zeros((len(ds.users), dim))
    np.add.at(total, ds.req_user[train_req], sums[train_req])
    test = ds.is_test
    prof[test] = total[ds.req_user[test]]
    return normalize(prof)
