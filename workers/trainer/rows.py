"""The trainer's buffered rows, the mini-batch they become and the optimizer step on it (workers/trainer/stage.py
calls :func:`step`), and the anchor cross feature of each row (:class:`AnchorInput`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from runtime.settings import Settings
from runtime.vectors.index import VectorIndex
from schemas.events import Sample
from workers.anchor_cross import ANCHOR_CROSS_DIM, AnchorLookup
from workers.model import Batch, ModelConfig, PreRanker, RankTerm, train_step, whole_logit


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
    anchor: np.ndarray | None = None  # (2,) the anchor cross feature (a model with anchor_cross), else None


def pending(user_id: str, s: Sample, vector: np.ndarray, pseudo: bool, history: np.ndarray | None, group: int,
            anchor: np.ndarray | None) -> Pending:
    """The buffered row of a sample the trainer takes."""
    # no prior part sent (priors-only labels, a label map): the whole label is prior, no residual to rank
    prior = s.prior_logit if s.prior_logit is not None else float(whole_logit(s.label))
    return Pending(user_id, s.item_id, vector, s.label, s.weight, pseudo, history, group, prior, anchor)


def make_batch(rows: list[Pending], vectors: np.ndarray, cfg: ModelConfig) -> Batch:
    """The step's :class:`~workers.model.Batch` of ``rows`` (``vectors`` stacked already) for a model of ``cfg``:
    history profiles when it reads history (a row buffered before the size was known gets zeros), the anchor
    cross feature when it reads that."""
    history_dim = cfg.content_dim if cfg.history_items else None
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
        anchor=np.stack([r.anchor if r.anchor is not None else np.zeros(ANCHOR_CROSS_DIM, np.float32) for r in rows])
        if cfg.anchor_cross else None,
    )



def step(model: PreRanker, opt: torch.optim.Optimizer, rows: list[Pending], vectors: np.ndarray,
         pseudo_lambda: float, rank: RankTerm) -> dict[str, float]:
    """One optimizer step on ``rows`` (``vectors`` stacked already); returns the loss parts (NaN: absent).

    Refuses vectors of another size than the model's: the collection changed under the model.
    """
    if vectors.shape[1] != model.cfg.content_dim:
        raise ValueError(f"content vectors have dim {vectors.shape[1]}, the model expects "
                         f"{model.cfg.content_dim}: the collection changed under the model")
    return train_step(model, opt, make_batch(rows, vectors, model.cfg), pseudo_lambda, rank)

class AnchorInput:
    """Each buffered row's anchor cross feature, for a model that reads it (``trainer.anchor_cross``).

    A pseudo sample carries it (``Sample.anchor_cross``: the labeler scored the candidate against the anchor
    set that labeled it). A sample without it — the real labels, which the streams stage writes without any
    anchors, or a pseudo sample of an older labeler — gets it from the user's anchor set in the anchors
    collection (:class:`~workers.anchor_cross.AnchorLookup`), the very source a serving team reads (the
    export's feature spec): one definition, one source, in training and serving. A user without anchors
    gets zeros in both.
    """

    def __init__(self, settings: Settings, index: VectorIndex) -> None:
        self.on = settings.trainer.anchor_cross
        self.lookup = AnchorLookup(index, settings.qdrant.anchors_collection, settings.anchors.k)

    def of(self, model: ModelConfig | None, user_id: str, s: Sample, vector: np.ndarray) -> np.ndarray | None:
        """(2,) float32 feature of the row, None when the model (or, before one exists, the settings) does not
        read it."""
        if not (model.anchor_cross if model is not None else self.on):
            return None
        if s.anchor_cross is not None:
            return np.asarray(s.anchor_cross, np.float32)
        return self.lookup.cross(user_id, np.asarray(vector, np.float32)[None, :])[0]
