"""The distillation baselines, made as strong as GPL is allowed to be.

A baseline is only worth beating when it gets what the method under test gets. GPL's labels go through a
calibrator cross-fitted on training exposures, with the labeler's priors, its per-request draw, its λ and
its margin weight; a KD row whose teacher probability goes straight into the loss is uncalibrated (the
teacher learns from exposures, whose click rate is several times that of the unexposed candidates it
labels: measured mean soft label 0.17 against a truth rate of 0.042) and would lose for that reason alone.

``kd`` (fair KD)
    The teacher (:class:`~gpl.eval.teacher.Teacher`: a bigger ranker that also sees the user's click
    history) is cross-fitted like GPL's anchors: for each fold of the training exposures
    (:func:`~workers.labeler.training_log.row_folds`, the same folds as GPL's calibrator), a teacher trained on the
    OTHER folds scores the fold's exposures; the calibrator of GPL (:func:`~workers.labeler.calibrator.fit_calibrator`)
    is fitted on (teacher logit, the same leave-one-out prior features) with the teacher logit monotone.
    Per seed, a teacher trained on all training exposures scores the unexposed candidates drawn by the
    labeler's own sampling (:func:`~workers.labeler.sampling.sample`, same ``top_n``/``random_n``/``cap``
    and request seed), the calibrator maps them to p, and the weight is the labeler's margin term.
``ukd`` (UKD, Xu et al. 2022, adapted)
    A click-adaptive teacher (:class:`AdaptiveTeacher`): the teacher's representation is trained with a
    gradient-reversal domain classifier, exposed vs unexposed candidates, so what it learned on exposures
    transfers to the unexposed; two prediction heads on that representation. Its soft label is the mean of
    the heads' probabilities and the uncertainty their logit gap u; the distillation weight is
    λ·exp(−u/ū) (uncertainty-regularised distillation). What differs from the paper: the paper's student
    carries the uncertainty heads; here every method trains the same pre-ranker, so the teacher carries them;
    and the candidates are the same uniform draw as ``kd-raw``.
``kd-raw`` / ``ukd-mcdropout`` (the old rows, kept for comparison)
    The teacher's raw probability on a uniform draw (weight 1), and the same with weights exp(−σ/σ̄) from 8
    MC-dropout passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gpl.eval.context import Context, Rows
from gpl.eval.methods import fit, kd_rows, predict, ukd_rows
from gpl.eval.teacher import MC_PASSES, Teacher, TeacherNet
from runtime.settings import Settings
from workers.labeler.calibrator import CalibrationFit, Calibrator, fit_calibrator
from workers.labeler.calibrator_fit import L2
from workers.labeler.features import PRIOR_FEATURES, feature_matrix
from workers.labeler.sampling import RequestRng, reads_scores, sample
from workers.labeler.training_log import FOLDS, TrainingPriors, row_folds
from workers.model import ModelConfig, make_optimizer

TEACHER_FEATURE = "teacher_logit"
KD_FEATURES: tuple[str, ...] = (TEACHER_FEATURE, *PRIOR_FEATURES)
KD_METHODS = ("kd", "ukd", "kd-raw", "ukd-mcdropout")
LABELS = {
    "kd": "KD, fair: teacher logit + priors, GPL's calibrator and sampling",
    "ukd": "UKD: click-adaptive teacher, two-head uncertainty",
    "kd-raw": "KD, raw teacher probability (old row)",
    "ukd-mcdropout": "KD + MC-dropout weights (old 'ukd' row)",
}
# the weight of the domain (exposed vs unexposed) loss, chosen on the validation view of the semisynth world
# (seed 0, es_gauc / es_hr@10 on all pairs): 0.01 -> 0.548 / 0.119, 0.03 -> 0.535 / 0.105, 0.1 -> 0.502 / 0.100,
# 0.3 -> 0.493 / 0.098, 1.0 -> 0.453 / 0.097. Without adaptation (0) the two-head teacher reaches 0.615 / 0.282:
# making exposed and unexposed candidates indistinguishable erases popularity, which the truth depends on.
DOMAIN_WEIGHT = 0.01


@torch.no_grad()
def teacher_logits(net: TeacherNet, ctx: Context, rows: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """The teacher's logits for flat dataset rows (dropout off)."""
    net.module.eval()
    out = np.empty(len(rows), np.float64)
    for s in range(0, len(rows), chunk):
        r = rows[s:s + chunk]
        out[s:s + chunk] = net.logits(ctx, ctx.row_user[r], ctx.ds.item[r], ctx.row_request[r]).numpy()
    return out


def exposed_subset(ctx: Context, flat: np.ndarray) -> Rows:
    """Exposed training rows given by flat index, as the training loop takes them."""
    return ctx.rows_of(flat, ctx.ds.label[flat].astype(np.float32), np.ones(len(flat)), pseudo=False)


@dataclass
class SoftRows:
    """What a baseline adds: rows, soft labels, weights (λ is applied by the loss), and what it reports."""

    rows: np.ndarray
    p: np.ndarray
    w: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class FairKD:
    """The ``kd`` row: a calibrator of (cross-fitted teacher logit, priors), fitted once per dataset."""

    def __init__(self, ctx: Context, settings: Settings, *, folds: int = FOLDS, progress: bool = True) -> None:
        ds = ctx.ds
        self.ctx, self.settings = ctx, settings
        train = ~ds.is_test
        self.priors = TrainingPriors.of(ds, train)
        fold = row_folds(ds, train, folds)
        xs, ys, us = [], [], []
        for f in range(folds):
            own, rest = np.flatnonzero(fold == f), np.flatnonzero((fold >= 0) & (fold != f))
            if not len(own) or not len(rest):
                continue
            teacher = TeacherNet(ctx, 1_000 + f)
            fit(teacher, ctx, Rows.empty(), 1_000 + f, desc=f"kd cross-fit teacher {f}", progress=progress,
                exposed=exposed_subset(ctx, rest))
            y = (ds.label[own] == 1).astype(np.float64)
            parts = self.priors.features(ds.item[own], ds.row_user[own], y)
            parts[TEACHER_FEATURE] = teacher_logits(teacher, ctx, own)
            xs.append(feature_matrix(KD_FEATURES, parts))
            ys.append(y)
            us.append(ds.row_user[own])
        x = np.concatenate(xs) if xs else np.zeros((0, len(KD_FEATURES)))
        cat = (lambda a: np.concatenate(a) if a else np.zeros(0))  # noqa: E731
        self.fit: CalibrationFit = fit_calibrator(x, cat(ys), cat(us), KD_FEATURES, encoder=settings.encoder.model,
                                                  catalogue=settings.labeler.catalogue, monotone=TEACHER_FEATURE,
                                                  l2=L2)
        self.info: dict[str, Any] = {"label": "calibrator", "source": "teacher", "features": ", ".join(KD_FEATURES),
                                     "abstain": self.fit.abstain,
                                     "reason": self.fit.reason, "cv": self.fit.cv}
        if self.fit.calibrator is not None:
            self.info["describe"] = self.fit.calibrator.describe()

    @property
    def calibrator(self) -> Calibrator | None:
        return self.fit.calibrator

    def labels(self, teacher: TeacherNet, seed: int) -> SoftRows:
        """The labeler's draw of unexposed training candidates, labeled by the calibrated teacher."""
        cal = self.calibrator
        if cal is None:
            raise ValueError(f"fair KD abstained: {self.fit.reason}")
        ctx, ds, lab = self.ctx, self.ctx.ds, self.settings.labeler
        rows = ctx.train_unexposed
        req = ctx.row_request[rows]
        order = np.argsort(req, kind="stable")
        rows, req = rows[order], req[order]

        def calibrated(r: np.ndarray) -> np.ndarray:
            parts = self.priors.features(ds.item[r], ds.row_user[r])
            parts[TEACHER_FEATURE] = teacher_logits(teacher, ctx, r)
            return np.asarray(cal(feature_matrix(KD_FEATURES, parts)), np.float64)

        scored = reads_scores(lab.top_n, lab.cap)
        p_all = calibrated(rows) if scored else None
        rng = RequestRng(lab.seed + seed)
        keep: list[np.ndarray] = []
        bounds = np.flatnonzero(np.diff(req)) + 1
        for part in np.split(np.arange(len(rows)), bounds):
            if not len(part):
                continue
            g = rng(ds.request_ids[int(req[part[0]])])
            pos = sample(p_all[part] if p_all is not None else len(part), lab.top_n, lab.random_n, lab.cap, g)
            keep.append(part[pos])
        sel = np.concatenate(keep) if keep else np.zeros(0, np.int64)
        p = p_all[sel] if p_all is not None else calibrated(rows[sel])
        w = np.abs(2.0 * p - 1.0) if lab.use_margin else np.ones(len(p))
        out = rows[sel]
        o = np.argsort(out, kind="stable")
        return SoftRows(out[o], p[o], w[o], {"rows": int(len(out)), "mean_p": float(p.mean()) if len(p) else 0.0,
                                             "mean_w": float(w.mean()) if len(w) else 0.0})


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return -ctx.scale * grad, None


class AdaptiveTeacher(nn.Module):
    """UKD's click-adaptive teacher: the KD teacher's inputs, a domain-adversarial representation, two heads."""

    def __init__(self, cfg: ModelConfig, hidden: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        self.base = Teacher(cfg, hidden, dropout)  # its embeddings and feature map; its MLP is not used
        d = 7 * cfg.id_dim + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 104_729)
            self.body = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout))
            self.heads = nn.ModuleList(
                nn.Sequential(nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1)) for _ in range(2))
            self.domain = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1))

    def forward(self, x: torch.Tensor, reverse: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(two head logits (n, 2), domain logit (n,)) from the feature map ``x``."""
        h = self.body(x)
        z = torch.cat([head(h) for head in self.heads], dim=1)
        return z, self.domain(_GradReverse.apply(h, reverse)).squeeze(1)


class ClickAdaptiveUKD:
    """Train the adaptive teacher on exposed clicks (+ the domain game against ``unexposed``), then label."""

    def __init__(self, ctx: Context, seed: int, unexposed: np.ndarray, *, progress: bool = True) -> None:
        self.ctx = ctx
        cfg = ModelConfig(**{**ctx.model_config.to_dict(), "seed": seed})
        self.model = AdaptiveTeacher(cfg)
        ex = ctx.train_exposed
        n, bs = len(ex), ctx.batch_size
        steps = max(1, math.ceil(n / bs))
        rng = np.random.default_rng(seed + 31)
        total = steps * ctx.epochs
        bar = tqdm(total=total, desc=f"ukd teacher s{seed}", unit="step", disable=not progress, leave=False)
        self.model.train()
        with torch.random.fork_rng(devices=[]):  # dropout's masks: seeded, so a rerun gives the same teacher
            torch.manual_seed(seed + 7_003)
            self._epochs(rng, unexposed, steps, bar)
        bar.close()
        self.model.eval()

    def _epochs(self, rng: np.random.Generator, unexposed: np.ndarray, steps: int, bar: tqdm) -> None:
        ctx, ex, bs = self.ctx, self.ctx.train_exposed, self.ctx.batch_size
        n, total = len(ex), steps * ctx.epochs
        bce = nn.functional.binary_cross_entropy_with_logits
        opt = make_optimizer(self.model.parameters(), ctx.lr)
        for e in range(ctx.epochs):
            perm = rng.permutation(n)
            for s in range(steps):
                a = perm[s * bs:(s + 1) * bs]
                b = unexposed[rng.integers(0, len(unexposed), len(a))] if len(unexposed) else np.zeros(0, np.int64)
                progress_frac = (e * steps + s) / total  # DANN's schedule: the reversal grows from 0 to 1
                reverse = 2.0 / (1.0 + math.exp(-10.0 * progress_frac)) - 1.0
                xa = self._features(ex.user[a], ex.item[a], ex.req[a])
                za, da = self.model(xa, reverse)
                y = torch.from_numpy(ex.label[a].astype(np.float32))
                loss = bce(za[:, 0], y) + bce(za[:, 1], y) + DOMAIN_WEIGHT * bce(da, torch.ones(len(a)))
                if len(b):
                    _, db = self.model(self._features(ctx.row_user[b], ctx.ds.item[b], ctx.row_request[b]), reverse)
                    loss = loss + DOMAIN_WEIGHT * bce(db, torch.zeros(len(b)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)

    def _features(self, user: np.ndarray, item: np.ndarray, req: np.ndarray) -> torch.Tensor:
        c, it = self.ctx, torch.from_numpy(item)
        return self.model.base.features(c.user_bucket[torch.from_numpy(user)], c.item_bucket[it], c.vectors[it],
                                        c.profiles[torch.from_numpy(req)])

    @torch.no_grad()
    def head_logits(self, rows: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """(n, 2) logits of the two heads for flat rows."""
        c = self.ctx
        out = np.empty((len(rows), 2), np.float64)
        for s in range(0, len(rows), chunk):
            r = rows[s:s + chunk]
            z, _ = self.model(self._features(c.row_user[r], c.ds.item[r], c.row_request[r]))
            out[s:s + chunk] = z.numpy()
        return out

    def labels(self, rows: np.ndarray) -> SoftRows:
        z = self.head_logits(rows)
        p = (1.0 / (1.0 + np.exp(-z))).mean(axis=1)
        u = np.abs(z[:, 0] - z[:, 1])
        ubar = float(u.mean()) if len(u) else 1.0
        w = np.exp(-u / max(ubar, 1e-9))
        return SoftRows(rows, p, w, {"mean_weight": float(w.mean()) if len(w) else 0.0,
                                     "mean_head_gap": ubar, "mean_p": float(p.mean()) if len(p) else 0.0})


class Baselines:
    """Per seed: the teacher(s) the requested KD rows need, and each row's added training data."""

    def __init__(self, ctx: Context, settings: Settings, methods: list[str], *, progress: bool = True) -> None:
        self.ctx, self.settings, self.progress = ctx, settings, progress
        self.methods = [m for m in methods if m in KD_METHODS]
        self.fair = FairKD(ctx, settings, progress=progress) if "kd" in self.methods else None
        self.unavailable: dict[str, str] = {}
        if self.fair is not None and self.fair.calibrator is None:
            self.unavailable["kd"] = f"calibrator abstained, no pseudo-labels: {self.fair.fit.reason}"
        self.info: dict[str, Any] = {"kd": self.fair.info} if self.fair is not None else {}
        self._seed: int | None = None
        self.teacher: TeacherNet | None = None

    @property
    def needs_teacher(self) -> bool:
        return any(m in ("kd", "kd-raw", "ukd-mcdropout") for m in self.methods if m not in self.unavailable)

    def train_teacher(self, seed: int) -> TeacherNet:
        teacher = TeacherNet(self.ctx, seed)
        fit(teacher, self.ctx, Rows.empty(), seed, desc=f"teacher s{seed}", progress=self.progress)
        self.teacher, self._seed = teacher, seed
        return teacher

    def rows(self, method: str, seed: int, drawn: np.ndarray) -> tuple[Rows, SoftRows]:
        """The added rows of ``method`` (uniform ``drawn`` rows for the raw and UKD rows)."""
        ctx = self.ctx
        if method == "ukd":
            soft = ClickAdaptiveUKD(ctx, seed, ctx.train_unexposed, progress=self.progress).labels(drawn)
            return ctx.rows_of(soft.rows, soft.p, soft.w, pseudo=True), soft
        if self.teacher is None or self._seed != seed:
            raise ValueError("train_teacher(seed) first")
        if method == "kd" and self.fair is not None:
            soft = self.fair.labels(self.teacher, seed)
            return ctx.rows_of(soft.rows, soft.p, soft.w, pseudo=True), soft
        user, item, req = ctx.row_user[drawn], ctx.ds.item[drawn], ctx.row_request[drawn]
        if method == "kd-raw":
            p, _ = predict(self.teacher, ctx, user, item, req)
            return kd_rows(ctx, drawn, p), SoftRows(drawn, p, np.ones(len(p)))
        if method == "ukd-mcdropout":
            p, sd = predict(self.teacher, ctx, user, item, req, mc=MC_PASSES)
            assert sd is not None
            extra = ukd_rows(ctx, drawn, p, sd)
            return extra, SoftRows(drawn, p, extra.weight, {"mean_weight": float(extra.weight.mean()) if len(extra)
                                                              else 0.0, "mean_mc_std": float(sd.mean())})
        raise ValueError(f"not a KD method: {method}")


__all__ = ["AdaptiveTeacher", "Baselines", "ClickAdaptiveUKD", "FairKD", "KD_FEATURES", "KD_METHODS", "LABELS",
           "SoftRows", "teacher_logits"]
