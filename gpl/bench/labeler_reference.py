"""The labeler benchmark's reference: the obvious way of writing the labeler's stage, and the check that
the fast path gives the same samples.

The benchmark (:mod:`gpl.bench.labeler`) times both side by side; they must agree first, or the speed-up
would be a speed-up of something else. :func:`naive` is pydantic in and out with a per-candidate id → row
loop (the fixed label map only); :func:`same_samples` compares two SampleBatches up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import orjson

from schemas.codec import encode
from schemas.events import Lineage, Sample, SampleBatch, UnexposedBatch
from schemas.ids import sample_id
from workers.labeler.assemble import Labeling
from workers.labeler.confidence import TERMS, confidence
from workers.labeler.label_map import LabelMap
from workers.labeler.sampling import sample


def naive(ctx: Labeling) -> Callable[[bytes], bytes]:
    """The obvious implementation, same output: pydantic in and out, a per-candidate id→row loop."""
    row_of = {i: r for r, i in enumerate(ctx.items.ids.tolist())}
    mat = ctx.items.matrix
    cfg = ctx.cfg
    label = ctx.label
    if not isinstance(label, LabelMap):
        raise ValueError("the naive loop implements the fixed map only (label_source = map)")

    def run(raw: bytes) -> bytes:
        ev = UnexposedBatch.model_validate(orjson.loads(raw))
        entry = ctx.cache.get(ev.user_id)
        assert entry is not None
        rows: list[int] = []
        found: list[int] = []
        for item in ev.item_ids:  # per candidate: look the item up
            r = row_of.get(item)
            if r is not None:
                rows.append(r)
                found.append(item)
        s_all = entry.vectors @ mat[rows].T
        sim = s_all.max(axis=0)
        sel = sample(sim, cfg.top_n, cfg.random_n, cfg.cap, ctx.rng(ev.request_id))
        matched = s_all[:, sel].argmax(axis=0)
        s = sim[sel].astype(np.float64)
        p = label(s)
        w, terms = confidence(coherence=entry.coherence, consistency=ctx.cache.consistency(entry),
                              logprobs=entry.logprobs, matched=matched, p=p, cfg=cfg)
        samples = [
            Sample(sample_id=sample_id(ev.request_id, found[j], entry.version), item_id=found[j],
                   label=round(float(p[x]), 6), weight=round(float(w[x]), 6), source="pseudo",
                   similarity=round(float(s[x]), 6), matched_anchor=int(matched[x]),
                   confidence={t: round(float(terms[t][x]), 6) for t in TERMS})
            for x, j in enumerate(sel.tolist())
        ]
        batch = SampleBatch(
            request_id=ev.request_id, user_id=ev.user_id, ts=ev.ts, samples=samples,
            lineage=Lineage(anchor_version=entry.version, anchor_model=entry.model,
                            prompt_hash=entry.prompt_hash, encoder=entry.encoder, collection=ctx.collection,
                            anchor_age_ms=ev.ts - entry.generated_at, label_map=ctx.map_text,
                            fallback=entry.fallback),
            candidates_total=len(ev.item_ids), sampled_out=len(found) - len(samples),
        )
        return encode(batch)
    return run


def same_samples(a: bytes, b: bytes, tol: float = 2e-6) -> bool:
    """Same samples, lineage and counts; floats equal up to ``tol`` (the two paths sum in other orders)."""
    x, y = SampleBatch.model_validate_json(a), SampleBatch.model_validate_json(b)
    if x.model_copy(update={"samples": []}) != y.model_copy(update={"samples": []}):
        return False
    if [s.sample_id for s in x.samples] != [s.sample_id for s in y.samples]:
        return False
    for s, t in zip(x.samples, y.samples, strict=True):
        fs = [s.label, s.weight, s.similarity or 0.0, *(s.confidence or {}).values()]
        ft = [t.label, t.weight, t.similarity or 0.0, *(t.confidence or {}).values()]
        if s.matched_anchor != t.matched_anchor or any(abs(u - v) > tol for u, v in zip(fs, ft, strict=True)):
            return False
    return True
