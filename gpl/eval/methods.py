"""The compared methods: what each adds to the exposed training data, and the one training loop they share.

Every method trains the same :class:`workers.model.PreRanker` with the same loss through the
trainer's own step (:func:`workers.model.objective_step`: exposed rows weigh 1, added rows λ·w), the
same optimiser, batch size, number of epochs *and optimizer steps*, and the same
seed. They differ only in the rows added from the unexposed training candidates:

``exposed``
    nothing: the biased baseline.
``negatives``
    per training request, up to ``cap`` (labeler.cap, 40 by default, i.e. 4 per exposed item)
    unexposed candidates drawn uniformly, label 0, weight 1 as if they were real negatives.
``kd``, ``ukd``
    the fair distillation baselines (gpl/eval/kd.py): the teacher's logit through GPL's calibrator and
    sampling, and UKD's click-adaptive teacher.
``kd-raw``
    the same uniform draw, soft label = the teacher's probability, weight λ. The teacher
    (:class:`Teacher`) is a bigger ranker with more features than the pre-ranker — a 2-hidden-layer MLP
    that also sees the user's click history (the mean content vector of the user's earlier training
    clicks, causal) — trained on the exposed rows only, for the same epochs.
``ukd-mcdropout``
    KD whose weights are λ·exp(−σ/σ̄): σ the standard deviation of 8 MC-dropout passes of the same
    teacher, σ̄ its mean over the drawn rows (scale-free; mean weight ≈ e^-1..1). Uncertain soft
    labels count less, as in uncertainty-regularised KD.
``gpl*``
    rows and labels from the labeler's own ``label_candidates`` (gpl/eval/gpl_rows.py): the top
    ``top_n`` candidates by calibrated p plus ``random_n`` uniform ones, ≤ ``cap`` per request, soft
    label from the calibrator cross-fitted on training exposures, weight λ·w(confidence).

A step takes ``batch_size`` exposed rows and the matching slice of the added rows (all added rows are
shuffled and split over the epoch's steps), so every method makes exactly the same number of steps
and sees each exposed row equally often.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gpl.eval.dataset import EvalDataset
from runtime.settings import Settings
from runtime.vectors.normalize import normalize
from workers.history import history_profile, recent_distinct
from workers.model import (
    ModelConfig,
    PreRanker,
    RankTerm,
    item_buckets,
    make_optimizer,
    objective_step,
    user_buckets,
)

MC_PASSES = 8
TEACHER_HIDDEN = 128
TEACHER_DROPOUT = 0.2


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


class Teacher(nn.Module):
    """The KD teacher: a ranker with more capacity and one more feature (the user's click history).

    Inputs: the pre-ranker's hashed ids (same embedding size) and content vector, plus the history
    profile p; interactions u·c, p·c, u·i and the cosine of p and the item, then two hidden layers
    (128, 64; the pre-ranker has one of 64) with dropout, whose MC passes give UKD its uncertainty.
    Sized so that training it costs about twice a pre-ranker's (measured: a 32-d, 256-wide first
    version took 15x as long, mostly in the MC passes).
    """

    def __init__(self, cfg: ModelConfig, hidden: int = TEACHER_HIDDEN, dropout: float = TEACHER_DROPOUT) -> None:
        super().__init__()
        d = cfg.id_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 7919)
            self.user_emb = nn.Embedding(cfg.hash_buckets, d)
            self.item_emb = nn.Embedding(cfg.hash_buckets, d)
            self.content = nn.Linear(cfg.content_dim, d)
            self.profile = nn.Linear(cfg.content_dim, d)
            self.mlp = nn.Sequential(
                nn.Linear(7 * d + 1, hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, hidden // 2),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden // 2, 1),
            )
            nn.init.normal_(self.user_emb.weight, std=0.05)
            nn.init.normal_(self.item_emb.weight, std=0.05)

    def features(
        self, users: torch.Tensor, items: torch.Tensor, vectors: torch.Tensor, profiles: torch.Tensor
    ) -> torch.Tensor:
        u, i = self.user_emb(users), self.item_emb(items)
        c, p = self.content(vectors), self.profile(profiles)
        cos = (vectors * profiles).sum(1, keepdim=True)
        return torch.cat([u, i, c, p, u * c, p * c, u * i, cos], dim=1)

    def forward(
        self, users: torch.Tensor, items: torch.Tensor, vectors: torch.Tensor, profiles: torch.Tensor
    ) -> torch.Tensor:
        return self.mlp(self.features(users, items, vectors, profiles)).squeeze(1)


class Net(Protocol):
    def logits(self, ctx: Context, user: np.ndarray, item: np.ndarray, req: np.ndarray) -> torch.Tensor: ...


class StudentNet:
    """The pre-ranker under test, fed from dense indices (hash buckets precomputed once per dataset)."""

    def __init__(self, ctx: Context, seed: int) -> None:
        cfg = ModelConfig(**{**ctx.model_config.to_dict(), "seed": seed})
        self.model = PreRanker(cfg)

    def logits(self, ctx: Context, user: np.ndarray, item: np.ndarray, req: np.ndarray) -> torch.Tensor:
        it = torch.from_numpy(item)
        hist = ctx.recent[torch.from_numpy(req)] if ctx.recent is not None else None
        anchor = None
        if self.model.cfg.anchor_cross:
            if ctx.anchor_x is None or ctx.row_of is None:
                raise ValueError("trainer.anchor_cross is on but the context has no anchor feature (use_anchor_cross)")
            anchor = ctx.anchor_x[torch.from_numpy(ctx.row_of(req, item))]
        return self.model(ctx.user_bucket[torch.from_numpy(user)], ctx.item_bucket[it], ctx.vectors[it], hist,
                          anchor)

    @property
    def module(self) -> nn.Module:
        return self.model


class TeacherNet:
    def __init__(self, ctx: Context, seed: int) -> None:
        cfg = ModelConfig(**{**ctx.model_config.to_dict(), "seed": seed})
        self.model = Teacher(cfg)

    def _features(self, ctx: Context, user: np.ndarray, item: np.ndarray, req: np.ndarray) -> torch.Tensor:
        it = torch.from_numpy(item)
        return self.model.features(
            ctx.user_bucket[torch.from_numpy(user)],
            ctx.item_bucket[it],
            ctx.vectors[it],
            ctx.profiles[torch.from_numpy(req)],
        )

    def logits(self, ctx: Context, user: np.ndarray, item: np.ndarray, req: np.ndarray) -> torch.Tensor:
        return self.model.mlp(self._features(ctx, user, item, req)).squeeze(1)

    @torch.no_grad()
    def mc_std(self, ctx: Context, user: np.ndarray, item: np.ndarray, req: np.ndarray, passes: int) -> np.ndarray:
        """Std of ``passes`` dropout-on predictions (features once: dropout lives in the MLP only)."""
        x = self._features(ctx, user, item, req)
        self.model.mlp.train()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(12345 + len(user))
                ps = torch.stack([torch.sigmoid(self.model.mlp(x).squeeze(1)) for _ in range(passes)])
        finally:
            self.model.mlp.eval()
        return ps.std(dim=0).numpy()

    @property
    def module(self) -> nn.Module:
        return self.model


def fit(
    net: StudentNet | TeacherNet,
    ctx: Context,
    extra: Rows,
    seed: int,
    *,
    desc: str = "train",
    progress: bool = True,
    exposed: Rows | None = None,
) -> dict[str, float]:
    """Train ``net`` on the exposed training rows (or the subset ``exposed``: cross-fitted teachers) plus
    ``extra``; returns the last epoch's mean losses."""
    ex = ctx.train_exposed if exposed is None else exposed
    n, bs = len(ex), ctx.batch_size
    steps = max(1, math.ceil(n / bs))
    rng = np.random.default_rng(seed)
    model = net.module
    opt = make_optimizer(model.parameters(), ctx.lr)
    model.train()
    bar = tqdm(total=steps * ctx.epochs, desc=desc, unit="step", disable=not progress, leave=False)
    last: dict[str, float] = {}
    for _ in range(ctx.epochs):
        perm = rng.permutation(n)
        chunks = _chunks(extra, steps, rng, by_request=ctx.rank.weight > 0) if len(extra) else None
        tot = 0.0
        for s in range(steps):
            a = perm[s * bs : (s + 1) * bs]
            user, item, req, lab = ex.user[a], ex.item[a], ex.req[a], ex.label[a]
            w = np.ones(len(a), np.float32)
            pseudo = np.zeros(len(a), bool)
            off = np.zeros(len(a), np.float32)
            if chunks is not None and len(chunks[s]):
                b = chunks[s]
                user = np.concatenate([user, extra.user[b]])
                item = np.concatenate([item, extra.item[b]])
                req = np.concatenate([req, extra.req[b]])
                lab = np.concatenate([lab, extra.label[b]])
                w = np.concatenate([w, extra.weight[b]])
                pseudo = np.concatenate([pseudo, extra.pseudo[b]])
                extra_off = extra.offset[b] if extra.offset is not None else np.zeros(len(b), np.float32)
                off = np.concatenate([off, extra_off])
            parts = objective_step(opt, net.logits(ctx, user, item, req), lab, pseudo, w, ctx.pseudo_lambda,
                                   group=req, rank=ctx.rank, offset=off)
            tot += parts["total"]
            bar.update(1)
        last = {"loss": tot / steps}
    bar.close()
    model.eval()
    return last


def _chunks(extra: Rows, steps: int, rng: np.random.Generator, *, by_request: bool) -> list[np.ndarray]:
    """The added rows split over an epoch's steps: shuffled rows, or — for the rank term, which compares the
    candidates of one request — shuffled whole requests, so each request's rows share a step (as in the
    stream, where a SampleBatch's rows are buffered together)."""
    if not by_request:
        return np.array_split(rng.permutation(len(extra)), steps)
    reqs, inv = np.unique(extra.req, return_inverse=True)
    slot = rng.permutation(len(reqs))[inv]  # each request's place in the epoch
    order = np.argsort(slot, kind="stable")
    bounds = np.searchsorted(slot[order], [len(reqs) * s // steps for s in range(1, steps)])
    return np.split(order, bounds)


@torch.no_grad()
def predict(
    net: StudentNet | TeacherNet,
    ctx: Context,
    user: np.ndarray,
    item: np.ndarray,
    req: np.ndarray,
    *,
    chunk: int = 65536,
    mc: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities, MC-dropout std or None); ``mc`` > 0 (teacher only) runs that many dropout passes."""
    if mc and not isinstance(net, TeacherNet):
        raise ValueError("MC-dropout needs the teacher (the pre-ranker has no dropout)")
    net.module.eval()
    p = np.empty(len(user), np.float32)
    sd = np.empty(len(user), np.float32) if mc else None
    for s in range(0, len(user), chunk):
        sl = slice(s, s + chunk)
        p[sl] = torch.sigmoid(net.logits(ctx, user[sl], item[sl], req[sl])).numpy()
        if sd is not None and isinstance(net, TeacherNet):
            sd[sl] = net.mc_std(ctx, user[sl], item[sl], req[sl], mc)
    return p, sd


def uniform_unexposed(ctx: Context, per_request: int, seed: int) -> np.ndarray:
    """Up to ``per_request`` unexposed training rows per request, drawn uniformly (flat row indices)."""
    rows = ctx.train_unexposed
    rng = np.random.default_rng(seed)
    key = rng.random(len(rows))
    req = ctx.row_request[rows]
    order = np.lexsort((key, req))
    rows, req = rows[order], req[order]
    start = np.ones(len(rows), bool)
    start[1:] = req[1:] != req[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(len(rows)), 0))
    keep = (np.arange(len(rows)) - first) < per_request
    return np.sort(rows[keep])


def negatives_rows(ctx: Context, drawn: np.ndarray) -> Rows:
    return ctx.rows_of(drawn, np.zeros(len(drawn)), np.ones(len(drawn)), pseudo=False)


def kd_rows(ctx: Context, drawn: np.ndarray, teacher_p: np.ndarray) -> Rows:
    return ctx.rows_of(drawn, teacher_p, np.ones(len(drawn)), pseudo=True)


def ukd_rows(ctx: Context, drawn: np.ndarray, teacher_p: np.ndarray, teacher_sd: np.ndarray) -> Rows:
    sbar = float(teacher_sd.mean()) if len(teacher_sd) else 1.0
    w = np.exp(-teacher_sd / max(sbar, 1e-9))
    return ctx.rows_of(drawn, teacher_p, w, pseudo=True)


__all__ = [
    "Rows",
    "Context",
    "Teacher",
    "StudentNet",
    "TeacherNet",
    "fit",
    "predict",
    "uniform_unexposed",
    "negatives_rows",
    "kd_rows",
    "ukd_rows",
    "history_profiles",
    "MC_PASSES",
]
