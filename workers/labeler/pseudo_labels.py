"""One request's candidates → pseudo-labels, as arrays: match → sample → label → weight.

Why a module of its own: these are the steps the stream and ``gpl eval`` share (the eval passes arrays,
the labeler its item matrix's similarities), so the offline comparison labels exactly as the stream
does. The stream's side, which decodes batches, runs these steps over a micro-batch stage by stage and
encodes the SampleBatch bytes, is ``workers/labeler/assemble.py``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from runtime.settings import LabelerSettings
from workers.anchor_cross import anchor_cross
from workers.labeler.anchor_book import UserAnchors
from workers.labeler.calibrator import Calibrator
from workers.labeler.confidence import confidence
from workers.labeler.features import calibrator_inputs
from workers.labeler.label_map import LabelMap
from workers.labeler.matching import _row_max
from workers.labeler.sampling import reads_scores, sample


@dataclass(frozen=True, slots=True)
class Labeled:
    """One request's pseudo-labels as arrays; ``pos`` indexes the candidates given to :func:`label_candidates`."""

    pos: np.ndarray  # int64, positions of the labeled candidates, in the policy's order
    sim: np.ndarray  # float64, max cosine to the anchors
    label: np.ndarray  # float64, the pseudo-label
    weight: np.ndarray  # float64, the confidence weight w
    matched: np.ndarray  # int64, index of the anchor that matched
    terms: dict[str, np.ndarray]  # the confidence terms actually used (1 for a disabled term)
    kept: int  # chosen by the sampling policy, before repeats of an item were dropped
    duplicate: int  # repeats of an item already labeled in this request
    prior: np.ndarray | None = None  # float64: the prior features' part of each logit (a calibrator only)
    cross: np.ndarray | None = None  # float32 (n, 2): the student's anchor cross feature (workers/anchor_cross.py)


Score = Callable[[np.ndarray | None], tuple[np.ndarray, np.ndarray | None]]
"""positions (None: all) → ((k, K) anchor cosines, (k,) centroid cosines or None) of those candidates."""
Priors = Callable[[np.ndarray | None], dict[str, np.ndarray]]
"""positions (None: all) → the prior features of those candidates."""


def label_candidates(item_ids: np.ndarray, vectors: np.ndarray | None, anchors: UserAnchors, *, consistency: float,
                     label: LabelMap | Calibrator, cfg: LabelerSettings, rng: np.random.Generator,
                     centroid: np.ndarray | None = None, priors: dict[str, np.ndarray] | Priors | None = None,
                     score: Score | None = None) -> Labeled:
    """Match → sample → label → weight one request's candidates (all with vectors; unit rows).

    The labeler's hot path and ``gpl eval`` both call this, so the offline comparison labels exactly as
    the stream does. ``item_ids`` only serve to label a repeated item once; ``consistency`` is the
    anchor set's consistency term (computed by the caller, who knows where history vectors live).

    With a :class:`Calibrator` the label is the calibrated click probability of the candidate's
    features (:mod:`workers.labeler.features`; ``centroid`` is the unit history centroid, ``priors``
    the candidates' prior features), and the ``top_n`` part of the sample takes the most *probable*
    candidates; with a :class:`LabelMap` it is the map of the best similarity, and ``top_n`` the most
    similar.

    Scored lazily: without a top part (``top_n = 0``, the shipped policy) the draw reads no score, so
    only the drawn candidates are matched and get features (``cap`` of them, not all ``m``); the labels
    are those of scoring everything, since every feature is per candidate. ``score`` gives the
    similarities of some positions when the caller has them cheaper than from ``vectors`` (the labeler,
    from its item matrix in either dtype: :meth:`ItemMatrix.similarities`); then ``vectors`` is not
    read. ``priors`` is a dict over all candidates or a function of positions, like ``score``.
    """
    if score is None:
        assert vectors is not None

        def score(pos: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
            v = vectors if pos is None else vectors[pos]
            return v @ anchors.vectors.T, (v @ centroid if centroid is not None else None)  # (m, K): see _row_max

    def prior(pos: np.ndarray | None) -> dict[str, np.ndarray]:
        if priors is None or callable(priors):
            return priors(pos) if priors is not None else {}
        return priors if pos is None else {k: v[pos] for k, v in priors.items()}

    drawn = draw(item_ids, cfg, rng)  # draw first (no top part), then score only what was drawn
    pos = None if drawn is None else drawn[0]
    s_k, cos_centroid = score(pos)
    return finish(item_ids, s_k, cos_centroid, prior(pos) if isinstance(label, Calibrator) else {}, drawn, anchors,
                  consistency=consistency, label=label, cfg=cfg, rng=rng)


def draw(item_ids: np.ndarray, cfg: LabelerSettings, rng: np.random.Generator) -> tuple[np.ndarray, int, int] | None:
    """The policy's (positions, kept, duplicate) when it reads no score (no top part: the draw is the same
    whatever the scores, so only the drawn are scored); None when every candidate must be scored first."""
    if reads_scores(cfg.top_n, cfg.cap):
        return None
    return _once_per_item(sample(int(item_ids.shape[0]), 0, cfg.random_n, cfg.cap, rng), item_ids)


def finish(item_ids: np.ndarray, s_k: np.ndarray, cos_centroid: np.ndarray | None, priors: dict[str, np.ndarray],
           drawn: tuple[np.ndarray, int, int] | None, anchors: UserAnchors, *, consistency: float,
           label: LabelMap | Calibrator, cfg: LabelerSettings, rng: np.random.Generator | None) -> Labeled:
    """Label → sample → weight, from the scores of the candidates :func:`draw` chose (all of them when it
    returned None: the top part then ranks every candidate by its probability, or similarity for a map)
    and, for a calibrator, their prior features. ``rng`` is the request's (:class:`RequestRng`), used
    only when ``drawn`` is None."""
    sim, p_all, prior = probabilities(s_k, cos_centroid, priors, anchors, label)
    return choose(item_ids, s_k, sim, p_all, drawn, anchors, consistency=consistency, label=label, cfg=cfg, rng=rng,
                  prior=prior)


def probabilities(s_k: np.ndarray, cos_centroid: np.ndarray | None, priors: dict[str, np.ndarray],
                  anchors: UserAnchors, label: LabelMap | Calibrator
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(best cosine, calibrated probability or None for a map, the prior features' part of the logit or None)
    of scored candidates (the part only for a calibrator that reads more than the priors: else it is the
    whole label and the trainer's residual rank term has nothing to rank)."""
    if isinstance(label, Calibrator):
        cos_c = cos_centroid if cos_centroid is not None else np.zeros(s_k.shape[0])
        x, sim = calibrator_inputs(label.features, s_k, cos_c, anchors.anchor_weights(), priors)
        return sim, label(x), (label.prior_part(x) if label.reads_beyond_priors else None)  # sim: s1
    return _row_max(s_k), None, None


def choose(item_ids: np.ndarray, s_k: np.ndarray, sim: np.ndarray, p_all: np.ndarray | None,
           drawn: tuple[np.ndarray, int, int] | None, anchors: UserAnchors, *, consistency: float,
           label: LabelMap | Calibrator, cfg: LabelerSettings, rng: np.random.Generator | None,
           prior: np.ndarray | None = None) -> Labeled:
    """Sample (unless :func:`draw` did), label and weigh, from :func:`probabilities`."""
    if drawn is None:  # the top part ranks every candidate by its score
        assert rng is not None
        sel, kept, duplicate = _once_per_item(
            sample(sim if p_all is None else p_all, cfg.top_n, cfg.random_n, cfg.cap, rng), item_ids)
        s_sel, sim_sel, p_sel = s_k[sel], sim[sel], (None if p_all is None else p_all[sel])
        prior = None if prior is None else prior[sel]
    else:
        (sel, kept, duplicate), s_sel, sim_sel, p_sel = drawn, s_k, sim, p_all
    matched = s_sel.argmax(axis=1)
    s = np.asarray(sim_sel, np.float64)  # the calibrated path's s1 already is: no copy
    p = label(s) if p_sel is None else p_sel
    w, terms = confidence(coherence=anchors.coherence, consistency=consistency, logprobs=anchors.logprobs,
                          matched=matched, p=p, cfg=cfg)
    # the student's input, from the same cosines (a stand-in set of a user without anchors gives zeros)
    cross = anchor_cross(s_sel) if cfg.send_anchor_cross else None
    return Labeled(sel, s, p, w, matched, terms, kept, duplicate, prior, cross)


def _once_per_item(sel: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(positions, kept, duplicate): an item recalled twice is labeled once, at its first pick."""
    kept = int(sel.shape[0])
    if kept > 1:
        picked = item_ids[sel]
        if len(set(picked.tolist())) != kept:  # rare: a set of a few dozen ints is cheaper than np.unique
            _, first = np.unique(picked, return_index=True)
            sel = sel[np.sort(first)]
    return sel, kept, kept - int(sel.shape[0])

