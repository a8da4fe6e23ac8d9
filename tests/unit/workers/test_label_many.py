"""The labeler's stage-by-stage path (label_many) against one-by-one labeling and a plain reference.

``label_many`` reorders the work of consecutive requests (every stage over all of them before the
next) for speed; these tests pin that it changes nothing: the same bytes as ``label_decoded`` request
by request, and, for the policy that scores every candidate (a top part), the same chosen items,
labels, weights and similarities as a straightforward per-candidate reference written from the
definitions (dict lookups, a row sort for the top two, ``1 / (1 + exp(-z))``, a stable argsort).
"""
from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from gpl.bench.labeler import synthetic
from schemas.fast_codec import decode_unexposed, encode_unexposed
from workers.labeler.assemble import Abstained, Labeling, NoAnchors, label_decoded, label_many
from workers.labeler.calibrator import Calibrator
from workers.labeler.sampling import RequestRng


def _requests(ctx: Labeling, n: int, seed: int) -> list[bytes]:
    """Requests of known users with some unknown ids and repeated candidates, and one of a user
    without anchors."""
    rng = np.random.default_rng(seed)
    ids = ctx.items.ids
    out = []
    for r in range(n):
        cand = ids[rng.choice(len(ids), 250, replace=False)]
        if r % 3 == 0:  # a repeated candidate and two items without a vector
            cand = np.concatenate([cand, cand[:5], np.array([2**61 + r, 2**61 + r + 7], np.int64)])
            rng.shuffle(cand)
        user = "nobody" if r == 5 else f"user-{r % 4}"
        out.append(encode_unexposed(f"req-{seed}-{r}", user, 10_000 + r, cand, None))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("source", ["calibrator", "map"])
@pytest.mark.parametrize("top_n", [0, 10, 40])
def test_stage_by_stage_gives_the_bytes_of_one_by_one(dtype: str, source: str, top_n: int) -> None:
    one, _ = synthetic(candidates=250, batches=0, items=3000, users=4, label_source=source, dtype=dtype,  # type: ignore[arg-type]
                       top_n=top_n)
    many, _ = synthetic(candidates=250, batches=0, items=3000, users=4, label_source=source, dtype=dtype,  # type: ignore[arg-type]
                        top_n=top_n)
    raws = _requests(one, 23, seed=top_n)
    expected: list[bytes | type[Exception]] = []
    for raw in raws:
        try:
            expected.append(label_decoded(decode_unexposed(raw), one)[0])
        except NoAnchors:
            expected.append(NoAnchors)
    got: list[bytes | type[Exception]] = []
    for s in range(0, len(raws), 7):  # micro-batches of 7, 7, 7, 2: counts carry over between them
        for x in label_many([decode_unexposed(r) for r in raws[s : s + 7]], many):
            got.append(type(x) if isinstance(x, Exception) else x[0])
    assert got == expected
    assert NoAnchors in got and sum(isinstance(x, bytes) for x in got) == len(raws) - 1
    assert many.stats.requests == one.stats.requests  # the counts behind the priors too


def test_each_batch_gets_its_own_outcome() -> None:
    ctx, raws = synthetic(candidates=50, batches=3, items=500, users=2)
    ctx.use(None, "no calibrator here")
    got = label_many([decode_unexposed(r) for r in raws], ctx)
    assert all(isinstance(x, Abstained) for x in got)


def _reference(ctx: Labeling, raws: list[bytes]) -> list[list[dict[str, object]] | None]:
    """Per-candidate labels from the definitions, request by request (float32 item vectors)."""
    cal, cfg = ctx.label, ctx.cfg
    assert isinstance(cal, Calibrator) and ctx.items.dtype == "float32"
    row_of = {int(i): r for r, i in enumerate(ctx.items.ids.tolist())}
    mat = ctx.items.matrix
    recalled: dict[int, int] = {}
    requests = 0
    out: list[list[dict[str, object]] | None] = []
    for raw in raws:
        b = decode_unexposed(raw)
        entry = ctx.cache.get(b.user_id)
        if entry is None:
            out.append(None)
            continue
        found = [int(i) for i in b.item_ids.tolist() if int(i) in row_of]
        for i in found:
            recalled[i] = recalled.get(i, 0) + 1
        requests += 1
        v = mat[[row_of[i] for i in found]]
        s_k = v @ entry.vectors.T  # (m, K) float32, the straightforward way
        centroid = ctx.cache.centroid(entry)
        w_a = np.exp(entry.logprobs.astype(np.float64) - entry.logprobs.max())
        w_a /= w_a.sum()
        rate = (0 + 10.0 * 0.1) / (0 + 10.0)  # no exposure counted yet: the global prior 0.1
        feats = []
        for j, i in enumerate(found):
            srt = sorted(float(x) for x in s_k[j])
            f = {"s1": srt[-1], "s2": srt[-2], "s_mean": float(s_k[j].astype(np.float64) @ w_a),
                 "s_cent": float(v[j] @ centroid), "log_recall": math.log((1 + recalled[i]) / (1 + requests)),
                 "log_exposed": math.log(1 / (1 + requests)), "user_ctr": math.log(rate / (1 - rate))}
            feats.append(f)
        p = np.array([1 / (1 + math.exp(-(cal.intercept + sum(
            c * (f[n] - mu) / sc for n, c, mu, sc in zip(cal.features, cal.coef, cal.mean, cal.scale, strict=True)))))
            for f in feats])
        order = np.argsort(-p, kind="stable")
        top = order[: cfg.top_n].tolist()
        pool = [j for j in range(len(found)) if j not in set(top)]
        rng = RequestRng(cfg.seed)(b.request_id)
        picks = top + [pool[x] for x in rng.choice(len(pool), min(cfg.random_n, cfg.cap - len(top)),
                                                      replace=False).tolist()]
        seen: set[int] = set()
        samples = []
        for j in picks:
            if found[j] in seen:
                continue
            seen.add(found[j])
            k = int(np.argmax(s_k[j]))
            terms = {"coherence": entry.coherence, "consistency": ctx.cache.consistency(entry),
                     "generation": min(math.exp(float(entry.logprobs[k])), 1.0), "margin": abs(2 * p[j] - 1)}
            terms = {t: x if getattr(cfg, f"use_{t}") else 1.0 for t, x in terms.items()}
            prior = sum(c / sc * feats[j][n] for n, c, sc in zip(cal.features, cal.coef, cal.scale, strict=True)
                        if n in ("log_recall", "log_exposed", "user_ctr"))  # the residual rank term's offset
            samples.append({"item_id": found[j], "label": p[j], "similarity": feats[j]["s1"], "matched_anchor": k,
                            "weight": math.prod(terms.values()), "prior_logit": prior,
                            "anchor_cross": [feats[j]["s1"], (feats[j]["s1"] + feats[j]["s2"]) / 2]})
        out.append(samples)
    return out


@pytest.mark.parametrize("micro", [1, 16])
def test_scoring_every_candidate_matches_a_plain_reference(micro: int) -> None:
    """top_n 10 + 30 drawn: every candidate is matched and gets features; the optimised path chooses the
    reference's items and gives its labels, weights and similarities (to the 6 decimals written)."""
    ctx, _ = synthetic(candidates=250, batches=0, items=3000, users=4, dtype="float32", top_n=10, seed=5)
    ctx.cfg = ctx.cfg.model_copy(update={"send_anchor_cross": True})  # the student's input rides along
    ref_ctx, _ = synthetic(candidates=250, batches=0, items=3000, users=4, dtype="float32", top_n=10, seed=5)
    raws = _requests(ctx, 20, seed=11)
    want = _reference(ref_ctx, raws)
    got = []
    for s in range(0, len(raws), micro):
        got += label_many([decode_unexposed(r) for r in raws[s : s + micro]], ctx)
    for w, g in zip(want, got, strict=True):
        if w is None:
            assert isinstance(g, NoAnchors)
            continue
        assert not isinstance(g, Exception)
        samples = orjson.loads(g[0])["samples"]
        assert [x["item_id"] for x in samples] == [x["item_id"] for x in w]
        assert [x["matched_anchor"] for x in samples] == [x["matched_anchor"] for x in w]
        for key in ("label", "weight", "similarity", "prior_logit"):
            np.testing.assert_allclose([x[key] for x in samples], [float(x[key]) for x in w],  # type: ignore[arg-type]
                                       atol=1.5e-6, err_msg=key)
        np.testing.assert_allclose([x["anchor_cross"] for x in samples], [x["anchor_cross"] for x in w],
                                   atol=1.5e-6, err_msg="anchor_cross")  # the student's input, as the stream sends it
