"""Pure labeler logic (workers/labeler/): no broker, numpy twins of the stores.

What is pinned here: scores equal a brute-force double loop, the label map is monotone and can be
calibrated, every confidence term can be switched off, sampling is exact and reproducible, and the
fast encoder writes SampleBatches that the pydantic contract accepts, with their lineage and counts.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import orjson
import pytest

from runtime.encoder import HashEncoder
from runtime.settings import LabelerSettings
from runtime.vectors.index import Points
from runtime.vectors.memory import MemoryIndex
from schemas.codec import DecodeError
from schemas.events import Anchor, AnchorSet, Sample, SampleBatch, UnexposedBatch
from schemas.fast_codec import decode_unexposed
from schemas.ids import sample_id
from workers.labeler.anchor_book import AnchorBook
from workers.labeler.assemble import NoAnchors, label_batch
from workers.labeler.confidence import TERMS, coherence_of, confidence, consistency_of
from workers.labeler.item_matrix import ItemMatrix
from workers.labeler.label_map import LabelMap, fit_label_map, label_map, score_exposed
from workers.labeler.matching import score
from workers.labeler.sampling import RequestRng, sample

# the fixed map with every confidence term on: what these tests pin down (the shipped defaults differ)
MAP: dict[str, object] = {"label_source": "map", "use_coherence": True, "use_consistency": True,
                          "use_generation": True, "use_margin": True}
ENC = "hash-bow-64"
DIM = 16


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _aset(user: str, vectors: np.ndarray, *, version: int = 1, encoder: str = ENC,
          logprobs: list[float] | None = None, history: list[int] | None = None,
          generated_at: int = 1_000) -> AnchorSet:
    lps = logprobs or [-0.5] * len(vectors)
    return AnchorSet(user_id=user, version=version, model="m", prompt_hash="ph", encoder=encoder,
                     generated_at=generated_at, history=history or [], fallback=False,
                     anchors=[Anchor(text=f"a{k}", vector=v.tolist(), logprob=lp)
                              for k, (v, lp) in enumerate(zip(vectors, lps, strict=True))])


def _batch(user: str, ids: list[int], request: str = "req-1", ts: int = 5_000) -> bytes:
    return orjson.dumps({"schema_version": 1, "request_id": request, "user_id": user, "ts": ts,
                         "item_ids": ids, "recall_scores": [0.5] * len(ids)})


@pytest.fixture
def world() -> tuple[ItemMatrix, AnchorBook, np.ndarray]:
    """200 items with ids 1000.., one user u with 4 anchors; returns (items, cache, item ids)."""
    rng = np.random.default_rng(7)
    ids = np.arange(1000, 1200, dtype=np.int64)
    items = ItemMatrix(collection="items__hash", encoder=ENC)
    items.add(ids, _unit(rng, ids.size))
    cache = AnchorBook(ENC, items)
    assert cache.put(_aset("u", _unit(rng, 4), history=[1000, 1001, 1002])) == "accepted"
    return items, cache, ids


# ------------------------------------------------------------------------------------------ items

def test_item_matrix_lookup_add_replace_and_rehash() -> None:
    rng = np.random.default_rng(0)
    m = ItemMatrix()
    rows, missing = m.lookup(np.array([1, 2], np.int64))
    assert missing.all()
    ids = np.concatenate([np.arange(0, 3000), rng.integers(0, 2**63 - 1, 3000)]).astype(np.int64)
    vecs = rng.standard_normal((ids.size, DIM)).astype(np.float32)
    for s in range(0, ids.size, 700):  # several adds, the table grows (rehash) on the way
        assert m.add(ids[s : s + 700], vecs[s : s + 700]) == min(700, ids.size - s)
    assert len(m) == ids.size and m.dim == DIM
    q = np.concatenate([ids[rng.permutation(ids.size)], np.array([2**62 + 12345, 3001, 9999], np.int64)])
    rows, missing = m.lookup(q)
    assert missing.tolist() == [False] * ids.size + [True] * 3
    got = m.gather(rows[~missing])
    want = vecs[np.argsort(ids)][np.searchsorted(np.sort(ids), q[~missing])]
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(m.ids[rows[~missing]], q[~missing])
    # re-adding replaces in place (no new row); the last duplicate in one call wins; NaN rows are skipped
    new = np.ones((3, DIM), np.float32)
    new[1] *= 2
    new[2, 0] = np.nan
    assert m.add(np.array([5, 5, 777_777], np.int64), new) == 0
    (r5,), _ = m.lookup(np.array([5], np.int64))
    np.testing.assert_allclose(m.matrix[r5], np.full(DIM, 1 / math.sqrt(DIM)), atol=1e-6)
    assert m.lookup(np.array([777_777], np.int64))[1].all()
    with pytest.raises(ValueError):
        m.add(np.array([1], np.int64), np.ones((1, DIM + 1), np.float32))


def test_item_matrix_loads_and_fetches_misses_with_a_negative_cache() -> None:
    rng = np.random.default_rng(1)
    idx = MemoryIndex()
    idx.ensure_collection("items__x", DIM)
    idx.upsert("items__x", Points(np.arange(10, dtype=np.int64), _unit(rng, 10)))
    m = ItemMatrix(idx, "items__x", ENC, retry_s=3600)
    assert m.load(batch=3) == 10
    idx.upsert("items__x", Points(np.array([50], np.int64), _unit(rng, 1)))
    assert m.fetch(np.array([50, 60], np.int64)) == 1  # 50 found, 60 remembered as absent
    assert not m.lookup(np.array([50], np.int64))[1].any()
    idx.upsert("items__x", Points(np.array([60], np.int64), _unit(rng, 1)))
    assert m.fetch(np.array([60], np.int64)) == 0  # not asked again within retry_s
    m.retry_s = 0
    assert m.fetch(np.array([60], np.int64)) == 1
    assert ItemMatrix(idx, "no-such-collection").load() == 0  # missing collection: empty, not an error


# ---------------------------------------------------------------------------------------- scoring

def test_scores_equal_a_brute_force_loop() -> None:
    rng = np.random.default_rng(2)
    anchors, vectors = _unit(rng, 5), _unit(rng, 300)
    sim, matched = score(anchors, vectors)
    for i, v in enumerate(vectors):
        cos = [float(np.dot(a, v)) for a in anchors]
        assert sim[i] == pytest.approx(max(cos), abs=1e-6)
        assert matched[i] == cos.index(max(cos))


def test_label_map_is_monotone_and_documented() -> None:
    cfg = LabelerSettings(**MAP, label_center=0.4, label_temperature=0.1)
    s = np.linspace(-1, 1, 201)
    p = label_map(s, cfg)
    assert np.all(np.diff(p) > 0) and p.min() > 0 and p.max() < 1
    assert label_map(np.array([0.4]), cfg)[0] == pytest.approx(0.5)
    assert label_map(np.array([0.5]), cfg)[0] == pytest.approx(1 / (1 + math.exp(-1)))
    assert LabelMap(0.4, 0.1).describe() == "sigmoid((s-0.4)/0.1)"
    assert np.isfinite(LabelMap(0.0, 1e-6)(np.array([-1.0, 1.0]))).all()  # no overflow


def test_fit_label_map_recovers_a_known_logistic() -> None:
    rng = np.random.default_rng(3)
    s = rng.uniform(-0.2, 0.9, 40_000)
    y = (rng.random(s.size) < 1 / (1 + np.exp(-(s - 0.35) / 0.07))).astype(float)
    fitted = fit_label_map(s, y)
    assert fitted.center == pytest.approx(0.35, abs=0.01)
    assert fitted.temperature == pytest.approx(0.07, rel=0.08)
    with pytest.raises(ValueError):  # similarity ranks clicks *below* non-clicks: no monotone map
        fit_label_map(s, 1 - y)


def test_score_exposed_feeds_the_fit(world: tuple[ItemMatrix, AnchorBook, np.ndarray]) -> None:
    items, cache, ids = world
    real = SampleBatch(request_id="r", user_id="u", ts=1, samples=[
        Sample(sample_id="a", item_id=int(ids[0]), label=1.0, weight=1.0, source="click"),
        Sample(sample_id="b", item_id=int(ids[1]), label=0.0, weight=1.0, source="exposed-negative"),
        Sample(sample_id="c", item_id=999_999, label=0.0, weight=1.0, source="exposed-negative"),  # no vector
    ])
    sims, labels = score_exposed(real, cache, items)
    entry = cache.get("u")
    assert entry is not None
    want, _ = score(entry.vectors, items.gather(items.lookup(ids[:2])[0]))
    np.testing.assert_allclose(sims, want, atol=1e-6)
    assert labels.tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------- confidence

def test_confidence_terms_and_switches() -> None:
    rng = np.random.default_rng(4)
    anchors = _unit(rng, 3)
    assert coherence_of(np.repeat(anchors[:1], 3, axis=0)) == pytest.approx(1.0)
    assert coherence_of(np.eye(4, dtype=np.float32)) == pytest.approx(0.5)  # orthogonal interests
    assert coherence_of(anchors[:1]) == 1.0
    assert consistency_of(anchors, anchors) == pytest.approx(1.0)
    assert consistency_of(anchors, -anchors) == pytest.approx(0.0, abs=1e-6)
    assert consistency_of(anchors, np.zeros((0, DIM), np.float32)) == 1.0

    logprobs = np.array([-0.1, -2.0, 0.0], np.float32)
    matched = np.array([0, 1, 2, 1])
    p = np.array([0.9, 0.5, 0.2, 0.0])
    kw = {"coherence": 0.8, "consistency": 0.6, "logprobs": logprobs, "matched": matched, "p": p}
    w, terms = confidence(cfg=LabelerSettings(**MAP), **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(terms["coherence"], 0.8)
    np.testing.assert_allclose(terms["consistency"], 0.6)
    np.testing.assert_allclose(terms["generation"], np.exp([-0.1, -2.0, 0.0, -2.0]), rtol=1e-6)
    np.testing.assert_allclose(terms["margin"], [0.8, 0.0, 0.6, 1.0])
    np.testing.assert_allclose(w, np.prod([terms[t] for t in TERMS], axis=0))
    for term in TERMS:  # each switch alone turns its term into 1 and leaves the others
        w_off, off = confidence(cfg=LabelerSettings(**{**MAP, f"use_{term}": False}), **kw)  # type: ignore[arg-type]
        np.testing.assert_array_equal(off[term], 1.0)
        for other in set(TERMS) - {term}:
            np.testing.assert_allclose(off[other], terms[other])
        np.testing.assert_allclose(w_off, np.prod([off[t] for t in TERMS], axis=0))
    none = LabelerSettings(label_source="map", use_margin=False)  # the others are off by default
    w_none, _ = confidence(cfg=none, **kw)  # type: ignore[arg-type]
    np.testing.assert_array_equal(w_none, 1.0)


# --------------------------------------------------------------------------------------- sampling

def test_sampling_top_n_random_cap_and_determinism() -> None:
    rng0 = np.random.default_rng(5)
    sim = rng0.random(500)
    a = sample(sim, 10, 15, 20, RequestRng(0)("req-9"))
    b = sample(sim, 10, 15, 20, RequestRng(0)("req-9"))
    np.testing.assert_array_equal(a, b)  # same (seed, request) -> same sample: replay is reproducible
    assert a.size == 20 and len(set(a.tolist())) == 20  # the cap cuts the random part
    np.testing.assert_array_equal(a[:10], np.argsort(-sim)[:10])  # exactly the top 10, best first
    assert not set(a[10:].tolist()) & set(a[:10].tolist())
    rng = RequestRng(0)
    other = sample(sim, 10, 15, 20, rng("req-10"))
    assert set(other[10:].tolist()) != set(a[10:].tolist())
    np.testing.assert_array_equal(sample(sim, 10, 15, 20, rng("req-9")), a)  # the reused generator resets
    assert RequestRng(0)("r").integers(2**62) != RequestRng(1)("r").integers(2**62)
    # the random part is uniform over the rest: every non-top candidate gets picked about equally
    counts = np.zeros(500)
    for r in range(600):
        counts[sample(sim, 10, 10, 20, np.random.default_rng(r))[10:]] += 1
    assert counts[np.argsort(-sim)[:10]].sum() == 0
    rest = counts[np.argsort(-sim)[10:]]
    assert rest.mean() == pytest.approx(600 * 10 / 490) and rest.std() < 0.5 * rest.mean()
    # fewer candidates than asked for; top only; random only
    assert sorted(sample(sim[:5], 10, 10, 40, np.random.default_rng(0)).tolist()) == [0, 1, 2, 3, 4]
    assert sample(sim, 3, 0, 40, np.random.default_rng(0)).tolist() == np.argsort(-sim)[:3].tolist()
    assert sample(sim, 0, 7, 40, np.random.default_rng(0)).size == 7
    assert sample(sim, 50, 50, 8, np.random.default_rng(0)).tolist() == np.argsort(-sim)[:8].tolist()


# ------------------------------------------------------------------------------------- the fast path

def test_label_batch_output_validates_with_lineage(world: tuple[ItemMatrix, AnchorBook, np.ndarray]) -> None:
    items, cache, ids = world
    cfg = LabelerSettings(**MAP, top_n=5, random_n=5, cap=8, label_center=0.2, label_temperature=0.1,
                          send_anchor_cross=True)
    cand = ids[20:120].tolist()
    out, st = label_batch(_batch("u", cand, ts=4_000), cache, items, cfg)
    sb = SampleBatch.model_validate_json(out)  # the contract accepts what the fast encoder wrote
    entry = cache.get("u")
    assert entry is not None
    assert sb.request_id == "req-1" and sb.user_id == "u" and sb.ts == 4_000
    assert len(sb.samples) == 8 and st.labeled == 8 and st.sampled_out == 92 and st.no_vector == 0
    assert sb.candidates_total == 100 and sb.sampled_out == 92
    assert sb.lineage is not None
    assert sb.lineage.model_dump() == {
        "anchor_version": 1, "anchor_model": "m", "prompt_hash": "ph", "encoder": ENC,
        "collection": "items__hash", "anchor_age_ms": 3_000,
        "label_map": "p=sigmoid((s-0.2)/0.1); w=coherence*consistency*generation*margin", "fallback": False,
        "calibrator": ""}
    sims, matched = score(entry.vectors, items.gather(items.lookup(np.asarray(cand, np.int64))[0]))
    top5 = [cand[i] for i in np.argsort(-sims)[:5]]
    assert [s.item_id for s in sb.samples[:5]] == top5
    for s in sb.samples:
        j = cand.index(s.item_id)
        assert s.source == "pseudo"
        assert s.sample_id == sample_id("req-1", s.item_id, 1)
        assert s.similarity == pytest.approx(float(sims[j]), abs=1e-6)
        assert s.matched_anchor == int(matched[j])
        best_two = np.sort(entry.vectors @ items.gather(items.lookup(np.asarray([s.item_id]))[0])[0])[::-1][:2]
        assert s.anchor_cross == pytest.approx([best_two[0], best_two.mean()], abs=1e-6)  # the student's input
        assert s.label == pytest.approx(float(label_map(np.array([sims[j]]), cfg)[0]), abs=1e-6)
        assert s.confidence is not None and set(s.confidence) == set(TERMS)
        assert s.weight == pytest.approx(math.prod(s.confidence.values()), abs=2e-6)
        assert all(0.0 <= v <= 1.0 for v in s.confidence.values())
    plain = LabelerSettings(**{**cfg.model_dump(), "send_anchor_cross": False})  # the default: not sent
    assert all(x.anchor_cross is None for x in SampleBatch.model_validate_json(
        label_batch(_batch("u", cand, ts=4_000), cache, items, plain)[0]).samples)
    # a replay labels the same items with the same ids and values
    again, _ = label_batch(_batch("u", cand, ts=4_000), cache, items, cfg)
    assert again == out
    # the ablation switches reach the output
    off = LabelerSettings(**{**MAP, "top_n": 5, "random_n": 5, "cap": 8, "use_generation": False, "use_margin": False})
    sb_off = SampleBatch.model_validate_json(label_batch(_batch("u", cand), cache, items, off)[0])
    assert all(s.confidence and s.confidence["generation"] == 1.0 and s.confidence["margin"] == 1.0
               for s in sb_off.samples)
    assert sb_off.lineage is not None and sb_off.lineage.label_map.endswith("w=coherence*consistency")


def test_no_vector_and_duplicates_are_counted(world: tuple[ItemMatrix, AnchorBook, np.ndarray]) -> None:
    items, cache, ids = world
    cfg = LabelerSettings(**MAP, top_n=50, random_n=0, cap=50)
    cand = [*ids[:10].tolist(), 5, 6, int(ids[0]), int(ids[1])]  # 2 without a vector, 2 repeats
    out, st = label_batch(_batch("u", cand), cache, items, cfg)
    sb = SampleBatch.model_validate_json(out)
    assert (st.candidates, st.labeled, st.no_vector, st.duplicate, st.sampled_out) == (14, 10, 2, 2, 0)
    assert sorted(s.item_id for s in sb.samples) == sorted(ids[:10].tolist())
    assert sb.candidates_total == len(sb.samples) + sb.sampled_out + st.no_vector
    # nothing has a vector: a valid, empty batch, everything counted as no_vector
    out, st = label_batch(_batch("u", [1, 2, 3]), cache, items, cfg)
    assert SampleBatch.model_validate_json(out).samples == [] and st.no_vector == 3


def test_anchor_cache_refuses_other_spaces_and_keeps_the_newest(
        world: tuple[ItemMatrix, AnchorBook, np.ndarray]) -> None:
    items, cache, ids = world
    rng = np.random.default_rng(6)
    assert cache.put(_aset("v", _unit(rng, 2), encoder="all-MiniLM-L6-v2")) == "encoder_mismatch"
    assert "v" not in cache
    with pytest.raises(NoAnchors):
        label_batch(_batch("v", ids[:5].tolist()), cache, items, LabelerSettings(**MAP))
    assert cache.put(_aset("v", _unit(rng, 2, DIM + 2))) == "dim_mismatch"
    assert cache.put(_aset("v", np.zeros((2, DIM), np.float32))) == "bad_vectors"
    # versions name content (any order); generated_at orders a user's sets
    assert cache.put(_aset("v", _unit(rng, 2), version=5, generated_at=2_000)) == "accepted"
    assert cache.put(_aset("v", _unit(rng, 3), version=9, generated_at=1_999)) == "stale"
    assert cache.put(_aset("v", _unit(rng, 3), version=5, generated_at=2_000)) == "stale"
    assert cache.put(_aset("v", _unit(rng, 3), version=4, generated_at=2_001)) == "accepted"
    entry = cache.get("v")
    assert entry is not None and entry.version == 4 and entry.vectors.shape == (3, DIM)
    assert cache.counts == {"accepted": 3, "encoder_mismatch": 1, "dim_mismatch": 1, "bad_vectors": 1,
                            "stale": 2}
    # consistency comes from the history items' vectors
    u = cache.get("u")
    assert u is not None
    hist = items.gather(items.lookup(np.array([1000, 1001, 1002], np.int64))[0])
    assert cache.consistency(u) == pytest.approx(consistency_of(u.vectors, hist))
    assert cache.drop("v") and "v" not in cache


def test_anchor_vectors_from_the_encoder_score_their_own_text() -> None:
    """End to end in one space: an anchor embedded from an item's text matches that item best."""
    enc = HashEncoder(dim=64, id=ENC)
    texts = ["trail running shoes", "fantasy dragon novel", "cast iron skillet", "gps running watch"]
    items = ItemMatrix(collection="items__hash", encoder=ENC)
    items.add(np.arange(len(texts), dtype=np.int64), enc.encode(texts))
    cache = AnchorBook(ENC, items)
    cache.put(_aset("cook", enc.encode(["iron skillet cooking"])))
    sb = SampleBatch.model_validate_json(
        label_batch(_batch("cook", [0, 1, 2, 3]), cache, items,
                    LabelerSettings(**MAP, top_n=1, random_n=0))[0])
    assert [s.item_id for s in sb.samples] == [2]


def test_decoder_matches_the_contract() -> None:
    good = _batch("u", [1, 2, 3])
    b = decode_unexposed(good)
    assert (b.request_id, b.user_id, b.ts, b.item_ids.tolist()) == ("req-1", "u", 5_000, [1, 2, 3])
    assert b.item_ids.dtype == np.int64
    # what pydantic's lax mode accepts, the fast decoder accepts with the same values
    for ids in ([True, 2], [1.0, 2], ["5", 6], []):
        raw = orjson.dumps({"request_id": "r", "user_id": "u", "ts": 1, "item_ids": ids})
        assert decode_unexposed(raw).item_ids.tolist() == UnexposedBatch.model_validate_json(raw).item_ids

    def msg(**fields: object) -> bytes:
        return orjson.dumps({"request_id": "r", "user_id": "u", "ts": 1, "item_ids": [1], **fields})

    bad = {
        b"{nope": "malformed_json",
        msg(item_ids=[-1]): "schema",
        msg(item_ids=[2**63]): "schema",
        msg(item_ids=[1.5]): "schema",
        msg(schema_version=9): "schema",
        msg(user_id=""): "schema",
        msg(recall_scores=["x"]): "schema",
        orjson.dumps([1, 2]): "schema",
    }
    for message, reason in bad.items():
        with pytest.raises(DecodeError) as e:
            decode_unexposed(message)
        assert e.value.reason == reason, message
    with pytest.raises(DecodeError):
        decode_unexposed(None)


def test_misses_are_fetched_from_the_index_and_consistency_waits_for_history() -> None:
    rng = np.random.default_rng(8)
    idx = MemoryIndex()
    idx.ensure_collection("items__x", DIM)
    idx.upsert("items__x", Points(np.arange(20, dtype=np.int64), _unit(rng, 20)))
    items = ItemMatrix(idx, "items__x", ENC, retry_s=0)
    items.load()
    cache = AnchorBook(ENC, items)
    cache.put(_aset("u", _unit(rng, 2), history=[1, 2, 99]))  # 99 is not indexed yet
    entry = cache.get("u")
    assert entry is not None
    cache.consistency(entry)
    assert entry.consistency is None  # not cached while a history item has no vector
    idx.upsert("items__x", Points(np.array([99, 500], np.int64), _unit(rng, 2)))  # indexed after start
    _, st = label_batch(_batch("u", [1, 2, 500, 501]), cache, items, LabelerSettings(**MAP))
    assert (st.labeled, st.no_vector) == (3, 1)  # 500 fetched on the miss, 501 still unknown
    assert entry.consistency is not None


def test_sample_id_affixes_format_the_same_ids() -> None:
    """The labeler formats a batch's sample ids from per-request affixes: the same ids as sample_id."""
    from schemas.ids import sample_id, sample_id_affixes

    for rid, item, ver in (("r", 0, 0), ("req:ü", 2**63 - 1, 12345678901), ("x", 42, 7)):
        head, tail = sample_id_affixes(rid, ver)
        assert f"{head}{item}{tail}" == sample_id(rid, item, ver)


def test_eval_and_the_bench_import_the_domain_without_the_kafka_loop() -> None:
    """``workers/labeler/__init__.py`` exports ``Labeler`` lazily: eval and the bench read the labeling
    modules without loading the loop (and confluent_kafka with it)."""
    code = ("import sys, gpl.eval.pseudo, gpl.bench.labeler, workers.labeler; "
            "print('workers.labeler.loop' in sys.modules, 'confluent_kafka' in sys.modules); "
            "workers.labeler.Labeler; print('workers.labeler.loop' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]
