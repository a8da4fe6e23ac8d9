"""The trainer's buffered rows and the mini-batch they become (workers/trainer.py's step input)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from workers.model import Batch


class Pending(NamedTuple):
    """A sample buffered for the next optimizer step."""

    user_id: str
    item_id: int
    vector: np.ndarray
    label: float
    weight: float
    pseudo: bool
    history: np.ndarray | None  # the request's history profile (model with history_items), else None
    group: int  # the SampleBatch (request) it came in: the rank term compares a request's rows
    prior_logit: float  # the label's prior part (its whole logit when the labeler sent none): residual rank term


def make_batch(rows: list[Pending], vectors: np.ndarray, history_dim: int | None) -> Batch:
    """The step's :class:`~workers.model.Batch` of ``rows`` (``vectors`` stacked already); ``history_dim``:
    the model's content size when it reads history (a row buffered before the size was known gets zeros)."""
    history = None
    if history_dim:
        zero = np.zeros(history_dim, np.float32)
        history = np.stack([r.history if r.history is not None and len(r.history) == history_dim else zero
                            for r in rows])
    return Batch(
        user_ids=[r.user_id for r in rows],
        item_ids=np.asarray([r.item_id for r in rows], np.int64),
        vectors=vectors,
        labels=np.asarray([r.label for r in rows], np.float32),
        weight=np.asarray([r.weight for r in rows], np.float32),
        is_pseudo=np.asarray([r.pseudo for r in rows], bool),
        history=history,
        group=np.asarray([r.group for r in rows], np.int64),
        offset=np.asarray([r.prior_logit for r in rows], np.float32),
    )
