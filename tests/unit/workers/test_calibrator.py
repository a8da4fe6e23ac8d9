"""The calibrator: fit or abstain, monotone in s1, a versioned artifact that refuses foreign spaces, and
the labeler's calibrated path (priors, lineage, abstention) and closed-loop refit — pure logic, no broker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pytest

from runtime.settings import LabelerSettings
from schemas.events import Anchor, AnchorSet, SampleBatch
from schemas.fast_codec import decode_unexposed
from workers.labeler.anchor_book import AnchorBook
from workers.labeler.assemble import Abstained, Labeling, label_decoded
from workers.labeler.calibrator import (
    Calibrator,
    CalibratorError,
    binary_auc,
    calibration_error,
    fit_calibrator,
    load_calibrator,
    sigmoid,
)
from workers.labeler.features import FEATURES, anchor_weights, prior_features, similarity_features
from workers.labeler.item_matrix import ItemMatrix
from workers.labeler.recalibration import Recalibrator, intercept_offset

ENC = "enc-test"


def synthetic_rows(n: int = 4000, seed: int = 0, signal: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES)))
    logit = -2.0 + signal * x[:, 0] + 0.5 * signal * x[:, 4]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    return x, y, rng.integers(0, 200, n)


def test_fits_a_calibrated_model_on_signal() -> None:
    x, y, g = synthetic_rows()
    fit = fit_calibrator(x, y, g, FEATURES, encoder=ENC, catalogue="c1")
    assert not fit.abstain and fit.calibrator is not None
    assert fit.cv["cv_auc"] > 0.8 and fit.cv["gain"] > 0.1
    p = fit.calibrator(x)
    assert abs(p.mean() - y.mean()) < 0.02 and calibration_error(p, y) < 0.03
    assert binary_auc(p, y) > 0.8


def test_abstains_on_noise_and_on_too_little_data() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, len(FEATURES)))
    y = (rng.random(3000) < 0.1).astype(float)
    fit = fit_calibrator(x, y, rng.integers(0, 100, 3000), FEATURES, encoder=ENC, catalogue="c1")
    assert fit.abstain and fit.calibrator is None and "base rate" in fit.reason
    tiny = fit_calibrator(x[:10], y[:10], np.arange(10), FEATURES, encoder=ENC, catalogue="c1")
    assert tiny.abstain and "too little data" in tiny.reason


def test_monotone_in_best_similarity_even_when_the_data_say_otherwise() -> None:
    x, y, g = synthetic_rows(signal=-2.0)  # s1 anti-correlated with clicks
    fit = fit_calibrator(x, y, g, FEATURES, encoder=ENC, catalogue="c1", min_auc=0.0, min_gain=-1.0)
    assert fit.calibrator is not None and fit.calibrator.coef[FEATURES.index("s1")] == 0.0
    base = np.zeros((2, len(FEATURES)))
    base[1, 0] = 3.0
    p = fit.calibrator(base)
    assert p[1] >= p[0]


def test_artifact_round_trip_and_refusals(tmp_path: Path) -> None:
    x, y, g = synthetic_rows()
    cal = fit_calibrator(x, y, g, FEATURES, encoder=ENC, catalogue="c1").calibrator
    assert cal is not None
    path = cal.save(tmp_path / "cal.json")
    back = load_calibrator(path, encoder=ENC, catalogue="c1", features=FEATURES)
    assert back.version == cal.version and np.allclose(back(x[:50]), cal(x[:50]))
    with pytest.raises(CalibratorError, match="does not exist"):
        load_calibrator(tmp_path / "nope.json", encoder=ENC, catalogue="c1")
    with pytest.raises(CalibratorError, match="encoder"):
        load_calibrator(path, encoder="other-encoder", catalogue="c1")
    with pytest.raises(CalibratorError, match="catalogue"):
        load_calibrator(path, encoder=ENC, catalogue="c2")
    doc = json.loads(path.read_text())
    doc["coef"][0] += 1.0  # tampered parameters no longer hash to the stored version
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(CalibratorError, match="corrupt"):
        load_calibrator(tmp_path / "bad.json", encoder=ENC, catalogue="c1")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(CalibratorError, match="unreadable"):
        load_calibrator(tmp_path / "garbage.json", encoder=ENC, catalogue="c1")


def test_features_definitions() -> None:
    sims = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    f = similarity_features(sims, np.array([0.4, 0.0]))
    assert np.allclose(f["s1"], [0.9, 0.3]) and np.allclose(f["s2"], [0.5, 0.2])
    assert np.allclose(f["s_mean"], [0.5, 0.2]) and np.allclose(f["s_cent"], [0.4, 0.0])
    one = similarity_features(sims[:, :1], np.zeros(2))
    assert np.allclose(one["s1"], one["s2"])
    pr = prior_features(np.array([0, 9]), np.array([0, 3]), 19.0, 10.0, 5.0, 0.2)
    assert np.allclose(pr["log_recall"], [np.log(1 / 20), np.log(10 / 20)])
    assert np.allclose(pr["log_exposed"], [np.log(1 / 20), np.log(4 / 20)])
    rate = (5 + 10 * 0.2) / (10 + 10)
    assert np.allclose(pr["user_ctr"], np.log(rate / (1 - rate)))


def _world(cal: Calibrator | None, label_source: str = "calibrator") -> tuple[Labeling, list[int]]:
    rng = np.random.default_rng(3)
    ids = list(range(100, 160))
    vecs = rng.normal(size=(60, 8)).astype(np.float32)
    items = ItemMatrix(collection=f"items__{ENC}", encoder=ENC)
    items.add(np.asarray(ids, np.int64), vecs)
    book = AnchorBook(ENC, items)
    book.put(AnchorSet(user_id="u", version=7, model="content", prompt_hash="kmeans", encoder=ENC, generated_at=1,
                       history=ids[:5], anchors=[Anchor(text="a", vector=vecs[0].tolist(), logprob=0.0),
                                                 Anchor(text="b", vector=vecs[1].tolist(), logprob=0.0)]))
    cfg = LabelerSettings(label_source=label_source, top_n=0, random_n=10, cap=10)  # type: ignore[arg-type]
    return Labeling(book, items, cfg, calibrator=cal, abstain_reason="" if cal else "no calibrator here"), ids


def _raw(ids: list[int]) -> bytes:
    return orjson.dumps({"request_id": "r1", "user_id": "u", "ts": 5, "item_ids": ids})


def test_labeler_path_abstains_without_a_calibrator_and_labels_with_one() -> None:
    ctx, ids = _world(None)
    with pytest.raises(Abstained, match="no calibrator here"):
        label_decoded(decode_unexposed(_raw(ids[10:40])), ctx)
    x, y, g = synthetic_rows()
    cal = fit_calibrator(x, y, g, FEATURES, encoder=ENC, catalogue="").calibrator
    ctx, ids = _world(cal)
    ctx.stats.add_exposed("u", np.arange(5), np.array([1, 0, 0, 1, 0]))
    out, st = label_decoded(decode_unexposed(_raw(ids[10:40])), ctx)
    sb = SampleBatch.model_validate_json(out)
    assert sb.lineage is not None and cal is not None and sb.lineage.calibrator == cal.version
    assert cal.version in sb.lineage.label_map and len(sb.samples) == 10 and st.labeled == 10
    assert all(0 < s.label < 1 for s in sb.samples) and list(st.item_ids) == [s.item_id for s in sb.samples]
    # the same request through the fixed map is an explicit choice, never the calibrator's stand-in
    mctx, _ = _world(None, "map")
    mout, _ = label_decoded(decode_unexposed(_raw(ids[10:40])), mctx)
    assert SampleBatch.model_validate_json(mout).lineage.calibrator == ""  # type: ignore[union-attr]


def test_closed_loop_refit_moves_the_level_and_flags_drift() -> None:
    assert intercept_offset(np.zeros(1000), np.r_[np.ones(500), np.zeros(500)]) == pytest.approx(0.0, abs=1e-6)
    d = intercept_offset(np.zeros(1000), np.r_[np.ones(100), np.zeros(900)])
    assert d == pytest.approx(np.log(0.1 / 0.9), abs=1e-4)
    # far from the outcomes (0.4 % claimed, 2 in 3 clicked): up to the bound, never the wrong way (Newton overshot)
    far = np.r_[np.full(9, -5.6), -0.64, -1.56, 1.43]
    assert intercept_offset(far, np.r_[np.ones(8), np.zeros(4)]) == pytest.approx(5.0)
    d_far = intercept_offset(far, np.r_[np.ones(2), np.zeros(10)])  # inside the bound: the maximum likelihood
    assert 0 < d_far < 5 and float(sigmoid(far + d_far).sum()) == pytest.approx(2.0, abs=1e-6)
    x, y, g = synthetic_rows()
    cal = fit_calibrator(x, y, g, FEATURES, encoder=ENC, catalogue="").calibrator
    assert cal is not None
    rec = Recalibrator(every=200, alert=0.05)
    items = list(range(400))
    rec.remember("u", items, np.full(400, 0.5))  # labels said 50%, users click 10%
    assert rec.observe("u", items[:300], [1.0 if i % 10 == 0 else 0.0 for i in range(300)]) == 300
    assert rec.observe("u", [999], [1.0]) == 0 and rec.due()
    fresh = rec.refit(cal)
    assert rec.drifting and rec.last_ece is not None and rec.last_ece > 0.3
    assert fresh.version != cal.version and fresh.intercept < cal.intercept
    assert fresh.info["refit_from"] == cal.version and fresh.coef == cal.coef


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_best_and_second_best_anchor_cosine_match_a_sort(k: int) -> None:
    """s1 and s2 (the column-wise top two) are a row sort's last two values, ties included."""
    rng = np.random.default_rng(k)
    sims = np.round(rng.uniform(-1, 1, (500, k)), 1)  # rounded: many ties
    f = similarity_features(sims, np.zeros(500))
    ordered = np.sort(sims, axis=1)
    assert np.array_equal(f["s1"], ordered[:, -1])
    assert np.array_equal(f["s2"], ordered[:, -2] if k > 1 else ordered[:, -1])


@pytest.mark.parametrize("source", ["calibrator", "map"])
def test_drawing_before_scoring_gives_the_labels_of_scoring_everything(source: str) -> None:
    """With no top part the labeler matches only the drawn candidates; their labels must equal those of
    scoring every candidate and then drawing (every feature is per candidate)."""
    from gpl.bench.labeler import synthetic
    from workers.labeler.features import feature_matrix
    from workers.labeler.sampling import sample

    ctx, raws = synthetic(candidates=300, batches=6, items=3000, users=3, label_source=source)
    assert ctx.cfg.top_n == 0
    for raw in raws:
        b = decode_unexposed(raw)
        got = orjson.loads(label_decoded(b, ctx)[0])["samples"]
        entry = ctx.cache.get(b.user_id)
        assert entry is not None
        rows, _ = ctx.items.lookup(b.item_ids)
        v = ctx.items.gather(rows)
        s_k = v @ entry.vectors.T
        if isinstance(ctx.label, Calibrator):
            centroid = ctx.cache.centroid(entry)
            parts = {**similarity_features(s_k, v @ centroid, anchor_weights(entry.logprobs)),
                     **prior_features(*ctx.stats.items(rows), ctx.stats.requests, *ctx.stats.user(b.user_id),
                                      ctx.stats.ctr)}
            p_all = ctx.label(feature_matrix(ctx.label.features, parts))
        else:
            assert ctx.label is not None
            p_all = ctx.label(s_k.max(axis=1).astype(np.float64))
        sel = sample(s_k.max(axis=1), 0, ctx.cfg.random_n, ctx.cfg.cap, ctx.rng(b.request_id))
        assert [x["item_id"] for x in got] == b.item_ids[sel].tolist()
        np.testing.assert_allclose([x["label"] for x in got], p_all[sel], atol=2e-6)
