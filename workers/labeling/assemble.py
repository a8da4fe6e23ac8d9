"""Batch assembly: one request's candidates → labeled samples (lookup → gather → match → sample → label).

The same functions label the stream and ``gpl eval`` (which passes arrays), so the offline comparison
measures what the stream does.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import orjson

from gpl.runtime.settings import LabelerSettings
from schemas.events import SCHEMA_VERSION
from schemas.ids import sample_id_affixes
from workers.labeling.anchor_book import AnchorBook, UserAnchors
from workers.labeling.calibrator import Calibrator
from workers.labeling.confidence import TERMS, confidence, describe_weight
from workers.labeling.features import (
    feature_matrix,
    needs_anchors,
    prior_features,
    similarity_features,
)
from workers.labeling.interaction_stats import InteractionStats
from workers.labeling.item_matrix import ItemMatrix
from workers.labeling.label_map import LabelMap
from workers.labeling.matching import _row_max
from workers.labeling.sampling import RequestRng, reads_scores, sample
from workers.labeling.unexposed_codec import Unexposed, decode_unexposed

log = logging.getLogger(__name__)


class NoAnchors(LookupError):
    """The batch's user has no anchors in the cache (the worker defers such batches)."""


@dataclass(frozen=True, slots=True)
class LabelStats:
    """Where a batch's candidates went, and the anchor set that labeled them."""

    request_id: str
    user_id: str
    ts: int
    candidates: int
    labeled: int
    sampled_out: int  # not kept by the policy
    duplicate: int  # repeats of an item already kept for this request
    no_vector: int
    anchor_version: int
    anchor_age_ms: int
    item_ids: tuple[int, ...] = ()  # the labeled items and their labels (the closed loop remembers them)
    labels: tuple[float, ...] = ()


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
    features (:mod:`workers.labeling.features`; ``centroid`` is the unit history centroid, ``priors``
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

    def probabilities(pos: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(K cosines, best cosine, calibrated probability or None for a map) of the candidates ``pos``."""
        s_k, cos_centroid = score(pos)
        if not isinstance(label, Calibrator):
            return s_k, _row_max(s_k), None
        cos_c = cos_centroid if cos_centroid is not None else np.zeros(s_k.shape[0])
        parts = {**similarity_features(s_k, cos_c, anchors.anchor_weights()), **prior(pos)}
        return s_k, parts["s1"], label(feature_matrix(label.features, parts))  # s1: the best cosine

    if not reads_scores(cfg.top_n, cfg.cap):  # draw first, then score only what was drawn
        sel, kept, duplicate = _once_per_item(sample(int(item_ids.shape[0]), 0, cfg.random_n, cfg.cap, rng), item_ids)
        s_sel, sim_sel, p_sel = probabilities(sel)
    else:  # the top part ranks every candidate by its score
        s_all, sim, p_all = probabilities(None)
        sel, kept, duplicate = _once_per_item(
            sample(sim if p_all is None else p_all, cfg.top_n, cfg.random_n, cfg.cap, rng), item_ids)
        s_sel, sim_sel, p_sel = s_all[sel], sim[sel], (None if p_all is None else p_all[sel])
    matched = s_sel.argmax(axis=1)
    s = np.asarray(sim_sel, np.float64)  # the calibrated path's s1 already is: no copy
    p = label(s) if p_sel is None else p_sel
    w, terms = confidence(coherence=anchors.coherence, consistency=consistency, logprobs=anchors.logprobs,
                          matched=matched, p=p, cfg=cfg)
    return Labeled(sel, s, p, w, matched, terms, kept, duplicate)


def _once_per_item(sel: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(positions, kept, duplicate): an item recalled twice is labeled once, at its first pick."""
    kept = int(sel.shape[0])
    if kept > 1:
        picked = item_ids[sel]
        if len(set(picked.tolist())) != kept:  # rare: a set of a few dozen ints is cheaper than np.unique
            _, first = np.unique(picked, return_index=True)
            sel = sel[np.sort(first)]
    return sel, kept, kept - int(sel.shape[0])


@dataclass
class Labeling:
    """Everything :func:`label_decoded` needs besides the batch: caches and settings, built once."""

    cache: AnchorBook
    items: ItemMatrix
    cfg: LabelerSettings
    collection: str = ""
    calibrator: Calibrator | None = None  # label_source = calibrator: None means abstain
    abstain_reason: str = ""  # why there is no calibrator (named in the labeler's log)
    stats: InteractionStats = field(default_factory=InteractionStats)
    label: LabelMap | Calibrator | None = field(init=False)
    map_text: str = field(init=False)
    rng: RequestRng = field(init=False)

    def __post_init__(self) -> None:
        self.rng = RequestRng(self.cfg.seed)
        if not self.collection:
            self.collection = self.items.collection
        self.use(self.calibrator)

    def use(self, calibrator: Calibrator | None, reason: str = "") -> None:
        """Switch to a (new) calibrator, e.g. after an online refit; ``None`` makes the labeler abstain."""
        self.calibrator = calibrator
        if reason:
            self.abstain_reason = reason
        self.label = LabelMap.from_settings(self.cfg) if self.cfg.label_source == "map" else calibrator
        what = self.label.describe() if self.label is not None else "abstain"
        self.map_text = f"p={what}; w={describe_weight(self.cfg)}"

    @property
    def calibrator_version(self) -> str:
        return self.calibrator.version if isinstance(self.label, Calibrator) and self.calibrator else ""


def no_anchors(user_id: str, dim: int, encoder: str) -> UserAnchors:
    """The stand-in anchor set of a user without anchors, for calibrators that read no similarity: one zero
    vector (version 0, model ``none``), so lineage and sample ids stay well defined."""
    return UserAnchors.of(np.zeros((1, dim), np.float32), np.zeros(1, np.float32), history=np.zeros(0, np.int64),
                          user_id=user_id, model="none", prompt_hash="-", encoder=encoder)


class Abstained(LookupError):
    """No usable calibrator: the batch gets no pseudo-labels (counted), never a default map."""


def label_decoded(b: Unexposed, ctx: Labeling) -> tuple[bytes, LabelStats]:
    """Label one decoded batch: lookup → gather → matmul → sample → SampleBatch bytes (orjson).

    Raises :class:`NoAnchors` when the user has no anchors. No pydantic object is built per sample;
    the output validates as :class:`schemas.events.SampleBatch` (tested).
    """
    if ctx.label is None:
        raise Abstained(ctx.abstain_reason or "no calibrator")
    entry = ctx.cache.get(b.user_id)
    if entry is None:
        if not isinstance(ctx.label, Calibrator) or needs_anchors(ctx.label.features) or ctx.items.dim is None:
            raise NoAnchors(b.user_id)
        entry = no_anchors(b.user_id, ctx.items.dim, ctx.cache.encoder)  # a prior-only calibrator needs none
    cfg, items, ids = ctx.cfg, ctx.items, b.item_ids
    n = int(ids.shape[0])
    rows, missing = items.lookup(ids)
    # count_nonzero, not .any(): the method goes through a Python wrapper (~1 µs, twice per request)
    if n and np.count_nonzero(missing) and items.index is not None:
        items.fetch(ids[missing])
        rows, missing = items.lookup(ids)
    if n and np.count_nonzero(missing):
        found = np.flatnonzero(~missing)
        rows, found_ids = rows[found], ids[found]
    else:
        found_ids = ids
    m = int(found_ids.shape[0])
    samples: list[dict[str, object]] = []
    duplicate = 0
    kept = 0
    if m:
        consistency = ctx.cache.consistency(entry) if cfg.use_consistency else 1.0
        centroid = None
        priors: Priors | None = None
        if isinstance(ctx.label, Calibrator):
            ctx.stats.add_recalled(rows)  # every candidate counts, labeled or not
            centroid = ctx.cache.centroid(entry)
            counts, user = ctx.stats, ctx.stats.user(b.user_id)

            def priors(pos: np.ndarray | None) -> dict[str, np.ndarray]:
                return prior_features(*counts.items(rows if pos is None else rows[pos]), counts.requests, *user,
                                      counts.ctr)

        def score(pos: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
            return items.similarities(rows if pos is None else rows[pos], entry.vectors, centroid)

        lab = label_candidates(found_ids, None, entry, consistency=consistency, label=ctx.label, cfg=cfg,
                               rng=ctx.rng(b.request_id), centroid=centroid, priors=priors, score=score)
        kept, duplicate = lab.kept, lab.duplicate
        rid, ver = b.request_id, entry.version
        # one rounding pass for every float column (6 decimals: well below any effect, shorter JSON)
        cols_f = np.empty((3 + len(TERMS), lab.pos.shape[0]))
        for j, col in enumerate((lab.label, lab.weight, lab.sim, *(lab.terms[t] for t in TERMS))):
            cols_f[j] = col
        floats = cols_f.round(6, out=cols_f).tolist()
        labeled_ids = found_ids[lab.pos].tolist()
        labels = floats[0]
        cols = zip(labeled_ids, *floats[:3], lab.matched.tolist(), *floats[3:], strict=True)
        head, tail = sample_id_affixes(rid, ver)
        samples = [
            {"sample_id": f"{head}{item}{tail}", "item_id": item, "label": lb, "weight": wt,
             "source": "pseudo", "similarity": sm, "matched_anchor": k,
             "confidence": {"coherence": c1, "consistency": c2, "generation": c3, "margin": c4}}
            for item, lb, wt, sm, k, c1, c2, c3, c4 in cols
        ]
    else:
        labeled_ids, labels = [], []
    labeled = len(samples)
    age = b.ts - entry.generated_at
    out = {
        "schema_version": SCHEMA_VERSION, "request_id": b.request_id, "user_id": b.user_id, "ts": b.ts,
        "samples": samples,
        "lineage": {"anchor_version": entry.version, "anchor_model": entry.model,
                    "prompt_hash": entry.prompt_hash, "encoder": entry.encoder, "collection": ctx.collection,
                    "anchor_age_ms": age, "label_map": ctx.map_text, "fallback": entry.fallback,
                    **({"calibrator": ctx.calibrator_version} if ctx.calibrator_version else {})},
        "candidates_total": n,
        "sampled_out": m - labeled,
    }
    stats = LabelStats(b.request_id, b.user_id, b.ts, n, labeled, m - kept, duplicate, n - m, entry.version,
                       age, tuple(labeled_ids), tuple(labels))
    return orjson.dumps(out), stats


def label_batch(batch_raw: bytes, cache: AnchorBook, items: ItemMatrix, settings: LabelerSettings,
                *, collection: str = "") -> tuple[bytes, LabelStats]:
    """Decode, score and sample one UnexposedBatch: (SampleBatch bytes, stats).

    Raises DecodeError (bad input: DLQ) or :class:`NoAnchors` (defer). Building the :class:`Labeling`
    context per call is cheap, but a hot loop should build it once and call :func:`label_decoded`.
    """
    return label_decoded(decode_unexposed(batch_raw), Labeling(cache, items, settings, collection))
