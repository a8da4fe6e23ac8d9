"""Batch assembly: one request's candidates → labeled samples (lookup → gather → match → sample → label).

The same functions label the stream and ``gpl eval`` (which passes arrays), so the offline comparison
measures what the stream does.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from runtime.settings import LabelerSettings
from schemas.events import SCHEMA_VERSION
from schemas.fast_codec import Unexposed, decode_unexposed
from schemas.ids import sample_id_affixes
from workers.anchor_cross import anchor_cross
from workers.labeler.anchor_book import AnchorBook, UserAnchors
from workers.labeler.calibrator import Calibrator
from workers.labeler.confidence import TERMS, confidence, describe_weight
from workers.labeler.features import calibrator_inputs, needs_anchors, prior_features
from workers.labeler.interaction_stats import InteractionStats
from workers.labeler.item_matrix import ItemMatrix
from workers.labeler.label_map import LabelMap
from workers.labeler.matching import _row_max
from workers.labeler.sampling import RequestRng, reads_scores, sample

log = logging.getLogger(__name__)

MICRO_BATCH = 64
"""Consecutive batches the labeler labels together (:func:`label_many`). 8, 16 and 32 measured ~1.4, 1.5
and 1.55x one by one; against 16, in paired runs on a loaded 2-core VM (1,000 candidates, bfloat16),
32 and 64 took 0.98 and 0.93-0.95x the time a request when every candidate is scored (top part), 0.98
and 0.95x on the shipped drawn-first path: each stage's code and kernels stay warm over more requests,
which outweighs the scores (~36 KB a request) no longer fitting the core's L2 between two stages. A
flush waits for at most 64 requests or the end of a poll, ~30 ms of labeling."""


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

    Raises :class:`NoAnchors` when the user has no anchors, :class:`Abstained` without a calibrator.
    No pydantic object is built per sample; the output validates as :class:`schemas.events.SampleBatch`
    (tested). :func:`label_many` labels several consecutive batches the same way, stage by stage.
    """
    got = label_many([b], ctx)[0]
    if isinstance(got, Exception):
        raise got
    return got


@dataclass(slots=True)
class _Request:
    """One batch between the stages of :func:`label_many`."""

    b: Unexposed
    entry: UserAnchors
    found_ids: np.ndarray  # the candidates with a vector
    rows: np.ndarray  # their matrix rows
    consistency: float = 1.0
    centroid: np.ndarray | None = None
    counts: tuple[np.ndarray, np.ndarray, float, float, float, float] | None = None  # prior inputs, at arrival
    drawn: tuple[np.ndarray, int, int] | None = None
    scores: tuple[np.ndarray, np.ndarray | None] | None = None
    probs: tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None = None  # (best cosine, p, prior part)
    labeled: Labeled | None = None


def label_many(bs: Sequence[Unexposed], ctx: Labeling, times: dict[str, float] | None = None
               ) -> list[tuple[bytes, LabelStats] | Exception]:
    """Label consecutive batches stage by stage: what :func:`label_decoded` gives each, in order.

    Each batch's outcome is its (SampleBatch bytes, stats), or the exception :func:`label_decoded`
    would raise (:class:`NoAnchors`, :class:`Abstained`, or a bug's), returned in its place so the
    others still get theirs. Why stages: one request's path calls ~60 numpy and torch functions, and
    request by request each runs with caches that the previous stage (the gather, oneDNN's GEMM) has
    just filled with its own code and data (~2x its time in a tight loop). Here every stage runs over
    all the batches before the next: lookup and counts (in arrival order, so each batch's prior
    features count exactly the candidates that arrived before and with it, as one by one), the draw of
    a policy without a top part, the matching, then features, labels, sampling and weights, then the
    encoding. Every function gets the inputs it would get one by one: the bytes are the same (tested).
    ``times``, when given, accumulates each stage's CPU seconds (``arrive``, ``score``, ``label``,
    ``choose``, ``encode``; the benchmark's breakdown).
    """
    out: list[tuple[bytes, LabelStats] | Exception | None] = [None] * len(bs)
    todo: list[tuple[int, _Request]] = []
    t0 = time.thread_time() if times is not None else 0.0
    for i, b in enumerate(bs):  # arrival order: fetches and counts change what later batches see
        try:
            todo.append((i, _arrive(b, ctx)))
        except Exception as e:  # noqa: BLE001 - the batch's outcome, as label_decoded would raise it
            out[i] = e
    for name, stage in (("arrive", None), ("score", _score), ("label", _label), ("choose", _choose),
                        ("encode", _encode)):
        if stage is not None:
            keep: list[tuple[int, _Request]] = []
            for i, r in todo:
                try:
                    got = stage(r, ctx)
                except Exception as e:  # noqa: BLE001 - as above
                    out[i] = e
                    continue
                if got is not None:
                    out[i] = got
                keep.append((i, r))
            todo = keep
        if times is not None:
            t1 = time.thread_time()
            times[name] = times.get(name, 0.0) + t1 - t0
            t0 = t1
    return [x if x is not None else RuntimeError("not labeled") for x in out]


def _arrive(b: Unexposed, ctx: Labeling) -> _Request:
    """Anchors, lookup (fetching misses), the anchor set's terms and, for a calibrator, the counts."""
    if ctx.label is None:
        raise Abstained(ctx.abstain_reason or "no calibrator")
    entry = ctx.cache.get(b.user_id)
    if entry is None:
        if not isinstance(ctx.label, Calibrator) or needs_anchors(ctx.label.features) or ctx.items.dim is None:
            raise NoAnchors(b.user_id)
        entry = no_anchors(b.user_id, ctx.items.dim, ctx.cache.encoder)  # a prior-only calibrator needs none
    items, ids = ctx.items, b.item_ids
    n = int(ids.shape[0])
    rows, missing = items.lookup(ids)
    # count_nonzero, not .any(): the method goes through a Python wrapper (~1 µs, twice per request)
    if n and np.count_nonzero(missing) and items.index is not None:
        items.fetch(ids[missing])
        rows, missing = items.lookup(ids)
    if n and np.count_nonzero(missing):
        found = np.flatnonzero(~missing)
        rows, ids = rows[found], ids[found]
    r = _Request(b, entry, ids, rows)
    if int(ids.shape[0]):
        r.consistency = ctx.cache.consistency(entry) if ctx.cfg.use_consistency else 1.0
        if not reads_scores(ctx.cfg.top_n, ctx.cfg.cap):  # seeding costs ~5 µs: only for a draw
            r.drawn = draw(ids, ctx.cfg, ctx.rng(b.request_id))
        if isinstance(ctx.label, Calibrator):
            st = ctx.stats
            st.add_recalled(rows)  # every candidate counts, labeled or not
            r.centroid = ctx.cache.centroid(entry)
            counted = rows if r.drawn is None else rows[r.drawn[0]]  # the counts as of now: later batches add
            r.counts = (*st.items(counted), st.requests, *st.user(b.user_id), st.ctr)
    return r


def _score(r: _Request, ctx: Labeling) -> None:
    """The matching: (K cosines, centroid cosines) of the drawn candidates, or of all of them."""
    if int(r.found_ids.shape[0]):
        rows = r.rows if r.drawn is None else r.rows[r.drawn[0]]
        r.scores = ctx.items.similarities(rows, r.entry.vectors, r.centroid)


def _label(r: _Request, ctx: Labeling) -> None:
    """Features and probabilities (:func:`probabilities`)."""
    if r.scores is not None:
        assert ctx.label is not None
        priors = prior_features(*r.counts) if r.counts is not None else {}
        r.probs = probabilities(*r.scores, priors, r.entry, ctx.label)


def _choose(r: _Request, ctx: Labeling) -> None:
    """Sampling (a top part; the request's generator is seeded only then), labels and weights."""
    if r.scores is not None and r.probs is not None:
        assert ctx.label is not None
        rng = ctx.rng(r.b.request_id) if r.drawn is None else None
        sim, p, prior = r.probs
        r.labeled = choose(r.found_ids, r.scores[0], sim, p, r.drawn, r.entry, consistency=r.consistency, prior=prior,
                           label=ctx.label, cfg=ctx.cfg, rng=rng)


def _encode(r: _Request, ctx: Labeling) -> tuple[bytes, LabelStats]:
    """The SampleBatch bytes (orjson, no pydantic object per sample) and the stats."""
    b, entry, found_ids, lab = r.b, r.entry, r.found_ids, r.labeled
    n, m = int(b.item_ids.shape[0]), int(found_ids.shape[0])
    samples: list[dict[str, object]] = []
    duplicate = 0
    kept = 0
    if lab is not None:
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
        if lab.prior is not None:  # the calibrator reads anchors: the trainer's residual rank term needs it
            for smp, pr in zip(samples, lab.prior.round(6).tolist(), strict=True):
                smp["prior_logit"] = pr
        if lab.cross is not None:  # the pre-ranker's anchor cross feature, as scored here (Sample.anchor_cross)
            for smp, ac in zip(samples, lab.cross.astype(np.float64).round(6).tolist(), strict=True):
                smp["anchor_cross"] = ac
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
