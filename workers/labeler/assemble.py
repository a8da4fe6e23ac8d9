"""Batch assembly: decoded unexposed batches → SampleBatch bytes (lookup → gather → match → sample → label).

The stream's side of labeling: the lookup of each batch's candidates in the item matrix, the counts of
the prior features, the micro-batch run stage by stage (:func:`label_many`) and the encoding of the
samples without a pydantic object per sample. The steps that turn one request's scored candidates into
pseudo-labels are shared with ``gpl eval`` and live in ``workers/labeler/pseudo_labels.py``, so the
offline comparison measures what the stream does.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from runtime.settings import LabelerSettings
from schemas.events import SCHEMA_VERSION
from schemas.fast_codec import Unexposed, decode_unexposed
from schemas.ids import sample_id_affixes
from workers.labeler.anchor_book import AnchorBook, UserAnchors, no_anchors
from workers.labeler.calibrator import Calibrator
from workers.labeler.confidence import TERMS, describe_weight
from workers.labeler.features import needs_anchors, prior_features
from workers.labeler.interaction_stats import InteractionStats
from workers.labeler.item_matrix import ItemMatrix
from workers.labeler.label_map import LabelMap
from workers.labeler.pseudo_labels import Labeled, choose, draw, probabilities
from workers.labeler.sampling import RequestRng, reads_scores

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
