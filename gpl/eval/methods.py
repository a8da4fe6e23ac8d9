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
    (:class:`gpl.eval.teacher.Teacher`) is a bigger ranker with more features than the pre-ranker — a
    2-hidden-layer MLP that also sees the user's click history (the mean content vector of the user's
    earlier training clicks, causal) — trained on the exposed rows only, for the same epochs.
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

This module holds the methods' added rows (the baselines' here, the KD ones in gpl/eval/kd.py, GPL's in
gpl/eval/gpl_rows.py), the student and the shared loop (:func:`fit`, :func:`predict`); the per-dataset
state they share is gpl/eval/context.py, the KD teacher gpl/eval/teacher.py.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gpl.eval.context import Context, Rows
from gpl.eval.teacher import TeacherNet
from workers.model import ModelConfig, PreRanker, make_optimizer, objective_step


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
    model.train()
    bar = tqdm(total=steps * ctx.epochs, desc=desc, unit="step", disable=not progress, leave=False)
    last: dict[str, float] = {}
    # dropout (the teachers') draws from torch's global generator: seeded here, a rerun gives the same numbers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7_001)
        last = _epochs(net, ctx, ex, extra, rng, steps, bar)
    bar.close()
    model.eval()
    return last


def _epochs(net: StudentNet | TeacherNet, ctx: Context, ex: Rows, extra: Rows, rng: np.random.Generator, steps: int,
            bar: tqdm) -> dict[str, float]:
    """The epochs of :func:`fit`; returns the last one's mean loss."""
    n, bs = len(ex), ctx.batch_size
    opt = make_optimizer(net.module.parameters(), ctx.lr)
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
    "StudentNet",
    "fit",
    "predict",
    "uniform_unexposed",
    "negatives_rows",
    "kd_rows",
    "ukd_rows",
]
