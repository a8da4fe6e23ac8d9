"""The KD teacher: a bigger ranker than the pre-ranker, with one more feature (the user's click history).

Why a module of its own: the teacher is the one network of the comparison that is not the pre-ranker
under test; the KD baselines (gpl/eval/kd.py: ``kd``, ``ukd``, ``kd-raw``, ``ukd-mcdropout``) train and
query it, and ``ukd-mcdropout`` reads its MC-dropout spread. It trains through the same loop as the
student (:func:`gpl.eval.methods.fit`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gpl.eval.context import Context
from workers.model import ModelConfig

MC_PASSES = 8
TEACHER_HIDDEN = 128
TEACHER_DROPOUT = 0.2


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


class TeacherNet:
    """The teacher fed from dense indices, as :class:`gpl.eval.methods.StudentNet` feeds the pre-ranker."""

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
