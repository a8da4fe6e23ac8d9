"""The history input of the demo's held-out scoring, for a pre-ranker that reads one (trainer.history_items).

At the cut between the streamed period and the held-out requests, what serving knows of a user is every
click of the streamed period: the profile of their last N distinct clicks (the trainer's rule).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.vectors.index import VectorIndex
from workers.history import profile_of, recent_distinct
from workers.model import ModelConfig


def held_out_histories(collection: str, index: VectorIndex, train: list[tuple[str, Any]], users: list[str],
                       cfg: ModelConfig) -> np.ndarray | None:
    """The history input of a model that reads one: each user's last N distinct training clicks."""
    if not cfg.history_items:
        return None
    clicks: dict[str, list[int]] = {}
    for t, e in train:
        if t == "exposure":
            clicks.setdefault(e.user_id, []).extend(it.item_id for it in e.items if it.clicked)
    per_user = {u: recent_distinct(c, cfg.history_items) for u, c in clicks.items()}
    need = np.asarray(sorted({i for h in per_user.values() for i in h}), np.int64)
    pts = index.retrieve(collection, need)
    vec = dict(zip(pts.ids.tolist(), pts.vectors, strict=True))
    prof = {u: profile_of(h, vec, cfg.content_dim) for u, h in per_user.items()}
    zero = np.zeros(cfg.content_dim, np.float32)
    return np.stack([prof.get(u, zero) for u in users]) if users else np.zeros((0, cfg.content_dim), np.float32)


__all__ = ["held_out_histories"]
