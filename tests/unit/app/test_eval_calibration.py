"""The semi-synthetic writer, cross-fitting without leakage, GPL rows through the labeler's own step,
and abstention reported (never a fallback map)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpl.eval.anchor_sources import content_anchors, training_histories
from gpl.eval.dataset import load_dataset, validation_view
from gpl.eval.movielens import build_movielens
from gpl.eval.pseudo import gpl_labels
from gpl.eval.run import EvalConfig, run_eval
from gpl.simulate import SimConfig, load_movielens, simulate
from gpl.simulate.semisynth import OracleConfig, build_semisynth
from runtime.encoder import HashEncoder
from runtime.settings import Settings, load
from schemas.events import ExposureEvent
from workers.labeler import pseudo_labels
from workers.labeler.calibrator import CalibrationFit, Calibrator
from workers.labeler.calibrator_fit import FEATURE_SETS, cross_fit_rows, fit_dataset_calibrator, unit_centroid
from workers.labeler.features import FEATURES
from workers.labeler.sampling import RequestRng
from workers.labeler.training_log import TrainingPriors, request_folds

TINY_TRAINER = {"hash_buckets": 1024, "id_dim": 8, "hidden": 16, "batch_size": 64}


def tiny_settings(tmp_path: Path) -> Settings:
    return load(env={}, data_dir=str(tmp_path / "data"), encoder={"model": "hash-bow-64"}, trainer=TINY_TRAINER,
                anchors={"backend": "memory", "k": 3, "history_items": 20},
                labeler={"top_n": 0, "random_n": 20, "cap": 20})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_movielens(tmp_path_factory.mktemp("ds") / "ml-tiny", users=20, max_requests_per_user=12,
                           candidates=60)


def test_semisynth_writer_on_a_tiny_subset(tmp_path: Path) -> None:
    out = build_semisynth(tmp_path / "ss", users=4, oracle=OracleConfig(steps=2), cache_dir=tmp_path / "cache")
    ds = load_dataset(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "gpl-eval-dataset/1" and "oracle" in meta and (out / "oracle.npz").is_file()
    assert len(ds.users) == 4 and ds.is_test.any() and not ds.is_test.all()
    assert (ds.label >= 0).all()  # truth for every candidate, exposed or not
    assert abs(meta["stats"]["mean_p_candidates"] - 0.05) < 1e-3
    # test requests: random exposure of 10 recalled candidates, not the funnel's biased top 10
    biased = {ev.request_id: {it.item_id for it in ev.items}
              for t, ev in simulate(load_movielens(), SimConfig(seed=0, users=4)).events
              if t == "exposure" and isinstance(ev, ExposureEvent)}
    same = []
    for r in range(ds.n_requests):
        rows = slice(ds.ptr[r], ds.ptr[r + 1])
        shown = set(ds.item_ids[ds.item[rows]][ds.exposed[rows]].tolist())
        assert len(shown) == 10
        (same if ds.is_test[r] else []).append(shown == biased[ds.request_ids[r]])
        if not ds.is_test[r]:
            assert shown == biased[ds.request_ids[r]]  # training exposure is the funnel's
    assert same and not any(same)
    assert build_semisynth(tmp_path / "ss", users=4, oracle=OracleConfig(steps=2)) == out  # idempotent


def test_cross_fitting_never_scores_a_row_against_its_own_fold(tiny: Path, tmp_path: Path) -> None:
    ds = load_dataset(tiny)
    settings = tiny_settings(tmp_path)
    vecs = HashEncoder().encode(ds.item_text)
    seen: list[dict[int, np.ndarray]] = []

    def anchor_fn(hists: dict[int, np.ndarray]) -> dict:
        seen.append(hists)
        return content_anchors(ds, hists, list(hists), vecs, k=3).users

    cf = cross_fit_rows(ds, vecs, settings, features=FEATURES, anchor_fn=anchor_fn)
    fold = request_folds(ds, ~ds.is_test)
    assert len(seen) == 3 and len(cf.y) > 0
    assert (fold[ds.row_request[cf.rows]] == cf.fold).all()
    click = ds.exposed & (ds.label == 1) & ~ds.row_test
    for f, hists in enumerate(seen):
        for u, items in hists.items():
            other = click & (ds.row_user == u) & (fold[ds.row_request] != f)
            own_only = set(ds.item[click & (ds.row_user == u) & (fold[ds.row_request] == f)].tolist())
            assert set(items.tolist()) <= set(ds.item[other].tolist())
            assert not (set(items.tolist()) & (own_only - set(ds.item[other].tolist())))
        mine = cf.fold == f
        assert not ds.is_test[ds.row_request[cf.rows[mine]]].any() and ds.exposed[cf.rows[mine]].all()


def test_eval_gpl_rows_go_through_label_candidates(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    ds = load_dataset(tiny)
    settings = tiny_settings(tmp_path)
    vecs = HashEncoder().encode(ds.item_text)
    fit = fit_dataset_calibrator(ds, vecs, settings, features=FEATURE_SETS["priors"])
    cal = fit.calibrator or Calibrator(features=FEATURE_SETS["priors"], mean=(0.0,) * 3, scale=(1.0,) * 3,
                                       coef=(1.0, 0.0, 0.5), intercept=-2.0, monotone="", encoder="hash-bow-64",
                                       catalogue="")
    book = content_anchors(ds, training_histories(ds, 20), list(range(len(ds.users))), vecs, k=3)
    calls: list[int] = []
    real = pseudo_labels.label_candidates

    def spy(*a: object, **k: object) -> pseudo_labels.Labeled:
        calls.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr("gpl.eval.pseudo.label_candidates", spy)
    got = gpl_labels(ds, vecs, book, settings.labeler, cal, seed=0)
    assert calls and len(got.rows) > 0
    # the first labeled request, labeled directly by the labeler's step: the same rows, labels, weights
    r = int(ds.row_request[got.rows[0]])
    u = int(ds.req_user[r])
    rows = np.arange(ds.ptr[r], ds.ptr[r + 1])
    rows = rows[~ds.exposed[rows]]
    items = ds.item[rows]
    a = book.users[u]
    from workers.labeler.confidence import consistency_of

    direct = real(items, vecs[items], a, consistency=consistency_of(a.vectors, vecs[a.history]), label=cal,
                  cfg=settings.labeler, rng=RequestRng(settings.labeler.seed)(ds.request_ids[r]),
                  centroid=unit_centroid(a, vecs), priors=TrainingPriors.of(ds, ~ds.is_test).features(items, u))
    mine = ds.row_request[got.rows] == r
    order = np.argsort(rows[direct.pos])
    assert np.array_equal(got.rows[mine], rows[direct.pos][order])
    assert np.allclose(got.p[mine], direct.label[order]) and np.allclose(got.w[mine], direct.weight[order])


def test_abstention_is_reported_never_a_fallback(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    reason = "does not beat the base rate on held-out users (test)"
    monkeypatch.setattr("gpl.eval.gpl_rows.fit_dataset_calibrator",
                        lambda *a, **k: CalibrationFit(None, True, reason, {"rows": 10.0}))
    cfg = EvalConfig(methods=["exposed", "gpl-anchors", "gpl-map"], seeds=1, epochs=1, anchors="memory",
                     out=tmp_path / "o", progress=False, plots=False)
    res = run_eval(tiny, tiny_settings(tmp_path), cfg, encoder=HashEncoder())
    assert res["calibration"]["gpl-anchors"]["abstain"] is True
    assert res["unavailable"]["gpl-anchors"].startswith("calibrator abstained") and "gpl-anchors" not in res["summary"]
    assert "gpl-map" in res["summary"]  # the explicit map ablation still runs
    md = (tmp_path / "o" / "results.md").read_text()
    assert "abstained" in md and reason in md


def test_validation_view_holds_out_the_end_of_training(tiny: Path) -> None:
    ds = load_dataset(tiny)
    val = validation_view(ds)
    assert val.n_requests == int((~ds.is_test).sum()) and val.is_test.any()
    kept = set(val.request_ids)
    assert not kept & {ds.request_ids[r] for r in np.flatnonzero(ds.is_test)}
    for u in range(len(val.users)):
        req = np.flatnonzero(val.req_user == u)
        if val.is_test[req].any() and (~val.is_test[req]).any():
            assert val.req_ts[req[~val.is_test[req]]].max() <= val.req_ts[req[val.is_test[req]]].min()


def test_calibrate_command_writes_what_the_labeler_loads(tiny: Path, tmp_path: Path) -> None:
    """``gpl calibrate`` on a training event set (no split.json): an artifact load_calibrator accepts, or exit 3."""
    import argparse
    import shutil

    from gpl.commands import calibrate
    from workers.labeler.calibrator import load_calibrator

    events = tmp_path / "events-only"
    events.mkdir()
    shutil.copy(tiny / "events.jsonl", events / "events.jsonl")
    settings = tiny_settings(tmp_path)
    parser = argparse.ArgumentParser()
    calibrate.register(parser.add_subparsers())
    out = tmp_path / "cal.json"
    args = parser.parse_args(["calibrate", str(events), "--features", "priors", "--out", str(out)])
    rc = args.run(args, settings)
    assert rc in (0, 3)
    if rc == 0:
        cal = load_calibrator(out, encoder="hash-bow-64", catalogue=settings.labeler.catalogue)
        assert cal.features == FEATURE_SETS["priors"] and cal.monotone == ""
    else:
        assert not out.exists()
