"""The pre-ranker's anchor cross feature (``trainer.anchor_cross``): one definition, read by the model, carried
by the labeler's samples, derived by the trainer for real labels from the anchors collection, and built per row
in ``gpl eval`` without letting a training row see anchors made from its own request's clicks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpl.eval.anchor_feature import RowLookup, cross_rows, row_anchor_cross
from gpl.eval.anchor_sources import content_anchors, training_histories
from gpl.eval.dataset import EvalDataset, load_dataset
from gpl.eval.movielens import build_movielens
from runtime.encoder import HashEncoder
from runtime.vectors.memory import MemoryIndex
from schemas.events import SampleBatch
from tests.preranker_world import DIM, item_vectors, put_anchors, requests, world_index, world_settings
from workers.anchor_cross import AnchorLookup, anchor_cross, cross_of
from workers.anchors.policy import anchor_point_id
from workers.labeler.training_log import request_folds, row_folds
from workers.model import ModelConfig, PreRanker, feature_spec, model_inputs
from workers.trainer import Trainer
from workers.trainer.holdout import Holdout
from workers.trainer.rows import make_batch


def test_best_and_top_two_mean_of_the_anchor_cosines() -> None:
    sims = np.array([[0.1, 0.9, 0.5], [-0.2, -0.1, -0.3]], np.float32)
    assert anchor_cross(sims) == pytest.approx(np.array([[0.9, 0.7], [-0.1, -0.15]]))
    assert anchor_cross(np.array([[0.4], [0.2]], np.float32)) == pytest.approx(np.array([[0.4, 0.4], [0.2, 0.2]]))
    assert not anchor_cross(np.zeros((3, 0), np.float32)).any()  # a user without anchors: zeros
    assert cross_of(None, np.ones((2, 4), np.float32)).shape == (2, 2)


def test_the_model_reads_the_feature_only_when_configured() -> None:
    base = ModelConfig(hash_buckets=64, id_dim=4, hidden=8, content_dim=DIM)
    with_anchor = ModelConfig(**{**base.to_dict(), "anchor_cross": 1})
    plain, anchored = PreRanker(base), PreRanker(with_anchor)
    assert plain.mlp[0].in_features == 5 * 4 and anchored.mlp[0].in_features == 5 * 4 + 2
    # an old checkpoint's config (no key) loads as a model without the input, drawing its usual weights
    old = {k: v for k, v in base.to_dict().items() if k != "anchor_cross"}
    assert ModelConfig.from_dict(old) == base
    assert torch.equal(PreRanker(ModelConfig.from_dict(old)).user_emb.weight, plain.user_emb.weight)
    assert model_inputs(base) == ("user_bucket", "item_bucket", "content")
    assert model_inputs(with_anchor)[-1] == "anchor_cross" and "anchor_cross" in feature_spec(with_anchor)["inputs"]
    assert "anchor_cross" not in feature_spec(base)["inputs"]
    users, items, vecs = ["a", "b", "c"], np.array([1, 2, 3]), item_vectors()[:3]
    with pytest.raises(ValueError, match="anchor cross"):
        anchored.score(users, items, vecs)
    near = anchored.score(users, items, vecs, anchor=np.full((3, 2), 0.9, np.float32))
    far = anchored.score(users, items, vecs, anchor=np.zeros((3, 2), np.float32))
    assert not np.allclose(near, far)  # the input reaches the logit


def test_the_lookup_reads_the_newest_set_and_nothing_without_a_collection(tmp_path: Path) -> None:
    s = world_settings(tmp_path)
    idx = MemoryIndex()
    lookup = AnchorLookup(idx, s.qdrant.anchors_collection, 4)
    assert lookup.anchors("u") is None  # no anchors collection yet: nobody has anchors
    idx.ensure_collection(s.qdrant.anchors_collection, DIM)
    vec = item_vectors()
    from runtime.vectors.index import Points

    # a reader can see a moment of old and new slots: slot 2 still holds the older set
    idx.upsert(s.qdrant.anchors_collection, Points(np.asarray([anchor_point_id("u", j) for j in range(3)]), vec[:3],
                                                   [{"generated_at": 9}, {"generated_at": 9}, {"generated_at": 5}]))
    fresh = AnchorLookup(idx, s.qdrant.anchors_collection, 4)
    assert np.array_equal(fresh.anchors("u"), vec[:2])
    assert fresh.cross("u", vec[5:7]) == pytest.approx(anchor_cross(vec[5:7] @ vec[:2].T), abs=1e-6)


def test_the_trainer_takes_the_labelers_feature_and_derives_it_for_real_labels(tmp_path: Path) -> None:
    s = world_settings(tmp_path, anchor_cross=True, holdout_fraction=0.0)
    idx = world_index(s)
    put_anchors(s, idx, ["u0"])
    t = Trainer(s, idx, dim=DIM, progress=False)
    real_u0, real_u1 = requests(0, 2)  # users u0 (with anchors) and u1 (without)
    first = real_u0.samples[0]
    pseudo = SampleBatch(request_id="p0", user_id="u0", ts=real_u0.ts, samples=[first.model_copy(update={
        "sample_id": "p0-x", "source": "pseudo", "label": 0.2, "anchor_cross": [0.7, 0.5]})])
    t._fetch_vectors({x.item_id for b in (real_u0, real_u1) for x in b.samples})
    for b in (real_u0, real_u1, pseudo):
        t._admit(b)
    rows = t._pending
    anchors = AnchorLookup(idx, s.qdrant.anchors_collection, s.anchors.k).anchors("u0")
    assert anchors is not None and len(anchors) == 3
    n0 = len(real_u0.samples)
    want = cross_of(anchors, np.stack([r.vector for r in rows[:n0]]))
    assert np.stack([r.anchor for r in rows[:n0]]) == pytest.approx(want, abs=1e-6)  # real labels: from the collection
    assert np.abs(want).sum() > 0
    assert not np.stack([r.anchor for r in rows[n0:-1]]).any()  # a user without anchors: zeros
    assert rows[-1].anchor.tolist() == pytest.approx([0.7, 0.5])  # the labeler's value, as sent
    assert t.model is not None
    batch = make_batch(rows, np.stack([r.vector for r in rows]), t.model.cfg)
    assert batch.anchor is not None and batch.anchor.shape == (len(rows), 2)
    t._train(len(rows))
    assert t.counts["steps"] == 1 and t.model.cfg.anchor_cross == 1


def test_a_held_out_row_keeps_its_feature_across_a_checkpoint() -> None:
    h = Holdout(10)
    h.add("u", 1, 1.0, None, np.array([0.5, 0.25], np.float32))
    h.add("v", 2, 0.0)
    again = Holdout(10)
    again.restore(h.state())
    rows = again.with_vectors({1: item_vectors()[0], 2: item_vectors()[1]}, DIM)
    assert rows.anchor is not None and rows.anchor.tolist() == [[0.5, 0.25], [0.0, 0.0]]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> EvalDataset:
    return load_dataset(build_movielens(tmp_path_factory.mktemp("ds") / "ml-anchor", users=30,
                                        max_requests_per_user=10, candidates=40))


def test_eval_rows_see_anchors_without_their_own_requests_clicks(small: EvalDataset) -> None:
    ds = small
    vecs = HashEncoder().encode(ds.item_text)
    hist = training_histories(ds, 20)
    book = content_anchors(ds, hist, list(hist), vecs, k=3)
    x = row_anchor_cross(ds, vecs, book, 20)
    assert x.shape == (len(ds.item), 2) and np.isfinite(x).all()
    row_user = ds.req_user[ds.row_request]
    test = np.flatnonzero(ds.is_test[ds.row_request])
    assert x[test] == pytest.approx(cross_rows(book.users, row_user[test], ds.item[test], vecs), abs=1e-6)
    for u in list(book.users)[:3]:  # the per-row vectorised form is the stream's function
        r = test[row_user[test] == u]
        assert x[r] == pytest.approx(anchor_cross(vecs[ds.item[r]] @ book.users[u].vectors.T), abs=1e-5)
    # a training row of fold f: anchors from the other folds' clicks, never its own request's
    train = ~ds.is_test
    ex_fold = row_folds(ds, train)
    fold = np.where(ds.exposed, ex_fold, request_folds(ds, train)[ds.row_request])
    click = np.flatnonzero(ds.exposed & (ds.label == 1) & train[ds.row_request] & (fold == 0))
    assert len(click)
    other = training_histories(ds, 20, train, rows=(ex_fold >= 0) & (ex_fold != 0))
    own_req = ds.row_request[click[0]]
    mine = ds.item[click[(ds.row_request[click] == own_req)]]
    u = int(row_user[click[0]])
    later = set(ds.item[(row_user == u) & ds.exposed & (ds.label == 1) & (ex_fold > 0)].tolist())
    assert not (set(mine.tolist()) - later) & set(other.get(u, np.zeros(0, np.int64)).tolist())
    fold_books = book.make(other) if book.make is not None else {}
    assert x[click] == pytest.approx(cross_rows(fold_books, row_user[click], ds.item[click], vecs), abs=1e-6)
    # the student's lookup finds each (request, item) row back
    rows = np.arange(0, len(ds.item), 7)
    found = RowLookup(ds)(ds.row_request[rows], ds.item[rows])
    assert (ds.item[found] == ds.item[rows]).all() and (ds.row_request[found] == ds.row_request[rows]).all()


def test_every_method_of_the_eval_trains_the_student_with_the_feature(tmp_path: Path) -> None:
    """``trainer.anchor_cross`` in ``gpl eval``: one feature for every method (content anchors built even when no
    method asked for them), recorded in results.json, and the students differ from those without it."""
    from gpl.eval.run import EvalConfig, run_eval
    from runtime.settings import load

    ds = build_movielens(tmp_path / "ml", users=15, max_requests_per_user=8, candidates=60)
    results = {}
    for on in (False, True):
        s = load(env={}, data_dir=str(tmp_path / "data"), encoder={"model": "hash-bow-64"},
                 trainer={"hash_buckets": 1024, "id_dim": 8, "hidden": 16, "batch_size": 64, "anchor_cross": on},
                 anchors={"backend": "memory", "k": 3})
        cfg = EvalConfig(methods=["exposed", "negatives"], seeds=1, epochs=1, anchors="memory",
                         out=tmp_path / f"out-{on}", progress=False, plots=False)
        results[on] = run_eval(ds, s, cfg, encoder=HashEncoder())
    assert results[False]["anchor_cross"] == {}
    info = results[True]["anchor_cross"]
    assert 0 < info["anchor_cross_rows_with_anchors"] <= 1 and info["anchor_cross_best_mean"] != 0
    for m in ("exposed", "negatives"):
        assert results[True]["runs"][m] != results[False]["runs"][m]
