"""``gpl eval`` end to end on a tiny MovieLens dataset (MemoryGenerator, HashEncoder); the format rules."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from pydantic import BaseModel

from gpl.commands import eval as eval_cmd
from gpl.eval.anchor_sources import training_histories
from gpl.eval.dataset import UNKNOWN, fresh_pairs, load_dataset
from gpl.eval.movielens import build_movielens
from gpl.eval.report import BAR_METRICS
from gpl.eval.run import DEFAULT_METHODS, EvalConfig, run_eval
from runtime.settings import Settings, load
from schemas.events import Candidate, ExposedItem, ExposureEvent, ItemEvent, RecallEvent
from schemas.jsonl import write_events

TINY_TRAINER = {"hash_buckets": 1024, "id_dim": 8, "hidden": 16, "batch_size": 64}


def tiny_settings(tmp_path: Path) -> Settings:
    return load(
        env={},
        data_dir=str(tmp_path / "data"),
        encoder={"model": "hash-bow-64"},
        trainer=TINY_TRAINER,
        anchors={"backend": "memory"},
    )


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "ml-tiny"
    return build_movielens(out, users=15, max_requests_per_user=8, candidates=60)


def _write(
    tmp_path: Path,
    events: list[tuple[str, BaseModel]],
    split: dict[str, object],
    truth: list[dict[str, object]],
) -> Path:
    d = tmp_path / "hand"
    d.mkdir()
    with open(d / "events.jsonl", "wb") as f:
        write_events(f, events)
    (d / "split.json").write_text(json.dumps(split))
    (d / "truth.jsonl").write_text("\n".join(json.dumps(t) for t in truth) + "\n")
    return d


def test_dataset_rules(tmp_path: Path) -> None:
    """Join in any order, exposed-but-not-recalled items, labels from clicks then truth, per-user split."""
    items = [ItemEvent(item_id=i, text=f"movie {i}", category="A" if i % 2 else "B") for i in range(1, 7)]

    def rec(rid: str, u: str, ts: int, ids: list[int]) -> RecallEvent:
        return RecallEvent(
            request_id=rid, user_id=u, ts=ts, candidates=[Candidate(item_id=i, score=1 / i) for i in ids]
        )

    def exp(rid: str, u: str, ts: int, shown: list[tuple[int, bool]]) -> ExposureEvent:
        return ExposureEvent(
            request_id=rid,
            user_id=u,
            ts=ts,
            items=[ExposedItem(item_id=i, position=p, clicked=c) for p, (i, c) in enumerate(shown)],
        )

    events: list[tuple[str, BaseModel]] = [("items", it) for it in items]
    events += [
        ("exposure", exp("r1", "a", 1005, [(1, True), (6, False)])),  # before its recall; 6 not recalled
        ("recall", rec("r1", "a", 1000, [1, 2, 3])),
        ("recall", rec("r2", "a", 2000, [2, 4, 5])),  # no exposure: all unexposed
        ("exposure", exp("r3", "b", 1500, [(3, False)])),  # exposure only
        ("recall", rec("r4", "b", 3000, [1, 2])),
    ]
    truth = [
        {"user_id": "a", "item_id": 2, "label": 1},
        {"user_id": "a", "item_id": 1, "label": 0},
        {"user_id": "b", "item_id": 2, "label": 0},
    ]
    ds = load_dataset(_write(tmp_path, events, {"test_start_ms": 2500, "user_test_start_ms": {"a": 2000}}, truth))
    assert ds.request_ids == ["r1", "r3", "r2", "r4"]  # by time
    r1 = slice(ds.ptr[0], ds.ptr[1])
    assert ds.item_ids[ds.item[r1]].tolist() == [1, 2, 3, 6]
    assert ds.exposed[r1].tolist() == [True, False, False, True]
    assert ds.label[r1].tolist() == [1, 1, UNKNOWN, 0]  # click wins over truth for item 1; truth for 2
    assert np.isnan(ds.recall_score[r1][3]) and ds.position[r1].tolist() == [0, -1, -1, 1]
    r3 = slice(ds.ptr[1], ds.ptr[2])
    assert ds.item_ids[ds.item[r3]].tolist() == [3] and ds.exposed[r3].all()
    assert ds.is_test.tolist() == [False, False, True, True]  # a: own cut 2000; b: global 2500
    r4 = slice(ds.ptr[3], ds.ptr[4])
    assert ds.label[r4].tolist() == [UNKNOWN, 0]
    assert [ds.categories[c] for c in ds.item_category[ds.item[r1]]] == ["A", "B", "A", "B"]


def test_movielens_split_and_histories_use_training_only(tiny_dataset: Path) -> None:
    ds = load_dataset(tiny_dataset)
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    assert "simulated" in meta and ds.stats()["test_requests"] > 0
    for u in range(len(ds.users)):  # per-user split: every multi-request user has >= 1 test request
        req = np.flatnonzero(ds.req_user == u)
        if len(req) >= 2:
            assert ds.is_test[req].any() and not ds.is_test[req].all()
            assert ds.req_ts[req[~ds.is_test[req]]].max() <= ds.req_ts[req[ds.is_test[req]]].min()
    hist = training_histories(ds, 8)
    test_clicks = ds.exposed & (ds.label == 1) & ds.row_test
    train_clicks = ds.exposed & (ds.label == 1) & ~ds.row_test
    for u, items in hist.items():
        mine = ds.row_user == u
        assert set(items.tolist()) <= set(ds.item[mine & train_clicks].tolist())
        only_test = set(ds.item[mine & test_clicks].tolist()) - set(ds.item[mine & train_clicks].tolist())
        assert not only_test & set(items.tolist())


def test_eval_end_to_end_through_the_command(tiny_dataset: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path)
    parser = argparse.ArgumentParser()
    eval_cmd.register(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "eval",
            str(tiny_dataset),
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--anchors",
            "memory",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert args.run(args, settings) == 0
    res = json.loads((out / "results.json").read_text())
    for f in ("results.md", "metrics.png", "hr_curves.png", "reliability.png"):
        assert (out / f).stat().st_size > 0
    ran = set(res["summary"])
    assert ran | set(res["unavailable"]) == {*DEFAULT_METHODS, "teacher"}
    for m in ran:
        s = res["summary"][m]["all"]
        for k in BAR_METRICS:
            assert s[k]["n"] == 2 and 0.0 <= s[k]["mean"] <= (10.0 if k == "coverage@10" else 1.0), (m, k)
    assert res["summary"]["negatives"]["all"]["pl_auc"]["mean"] == pytest.approx(0.5)
    for m, c in res["calibration"].items():  # each GPL row ran, or says that its calibrator abstained
        assert (m in ran) != bool(c.get("abstain")), m
        assert c["label"] == "map" or "cv" in c
    if "gpl-sid" in res["unavailable"]:
        assert res["unavailable"]["gpl-sid"].startswith("not available")
        assert "not available" in (out / "results.md").read_text()
    assert res["anchors"]["mode"] == "memory" and res["anchors"]["books"]["content"]["users"] > 0
    assert res["calibration"]["gpl-map"]["label"] == "map" and "gpl-map" in ran
    if "gpl" in ran:  # the closed loop replays the shipped default's labels
        loop = res["closed_loop_calibration"]["gpl"]
        assert loop["counts"]["remembered"] == res["method_info"]["gpl"]["rows"]
        assert loop["counts"]["joined"] == sum(g["joined"] for g in loop["groups"])
    # the fresh-pair scope is reported beside "all", over the same requests, and its table is in results.md
    assert res["scopes"]["fresh"] == res["scopes"]["all"]
    for m in ran:
        assert res["summary"][m]["fresh"]["es_hr@10"]["n"] == 2, m
    assert "Fresh pairs" in (out / "results.md").read_text()
    # seeds differ, results are not all identical
    runs = res["runs"]["exposed"]
    assert runs["0"]["all"]["es_auc"] != runs["1"]["all"]["es_auc"]


def test_fresh_pairs_leave_out_pairs_exposed_in_training(tiny_dataset: Path) -> None:
    ds = load_dataset(tiny_dataset)
    row_test = ds.is_test[ds.row_request]
    fresh = fresh_pairs(ds, row_test)
    key = ds.row_user.astype(np.int64) * ds.n_items + ds.item
    seen = set(key[ds.exposed & ~row_test].tolist())
    assert not fresh[~row_test].any()  # training rows are never in the scope
    test_rows = np.flatnonzero(row_test)
    expected = np.array([int(key[r]) not in seen for r in test_rows])
    assert (fresh[test_rows] == expected).all()
    assert expected.any() and not expected.all()  # the tiny funnel repeats some pairs and not others


def test_rerun_is_deterministic_and_uses_the_anchor_cache(tiny_dataset: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path)
    from runtime.encoder import HashEncoder

    cfg = EvalConfig(
        methods=["exposed", "gpl-text"],
        seeds=1,
        epochs=1,
        anchors="memory",
        out=tmp_path / "a",
        progress=False,
        plots=False,
    )
    first = run_eval(tiny_dataset, settings, cfg, encoder=HashEncoder())
    cfg.out = tmp_path / "b"
    second = run_eval(tiny_dataset, settings, cfg, encoder=HashEncoder())
    assert second["anchors"]["books"]["text"]["generated_now"] == 0
    assert second["anchors"]["books"]["text"]["cache_hits"] == first["anchors"]["books"]["text"]["users"]
    assert first["runs"] == second["runs"]


def test_unknown_method_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown methods"):
        run_eval(tiny_dataset, tiny_settings(tmp_path), EvalConfig(methods=["magic"], out=tmp_path))


def test_sid_anchors_row_with_a_tiny_tokenizer(tiny_dataset: Path, tmp_path: Path) -> None:
    """With a SID tokenizer, gpl-sid runs; its generator is retrained on training clicks and cached."""
    from gpl.commands.sid import sid_dir
    from runtime.encoder import HashEncoder
    from workers.anchors.sid.rqvae import RQVAEConfig, train_rqvae
    from workers.anchors.sid.tokenizer import build_tokenizer

    settings = tiny_settings(tmp_path)
    ds = load_dataset(tiny_dataset)
    enc = HashEncoder()
    vecs = enc.encode(ds.item_text)
    model, _ = train_rqvae(
        vecs,
        RQVAEConfig(in_dim=enc.dim, hidden=(32,), latent_dim=8, levels=2, codebook_size=8, kmeans_iters=3),
        epochs=3,
        batch_size=256,
    )
    build_tokenizer(model, ds.item_ids, vecs, enc.id).save(sid_dir(settings))
    cfg = EvalConfig(
        methods=["exposed", "gpl-sid"],
        seeds=1,
        epochs=1,
        anchors="memory",
        out=tmp_path / "o",
        progress=False,
        plots=False,
        sid_epochs=1,
    )
    res = run_eval(tiny_dataset, settings, cfg, encoder=enc)
    assert "gpl-sid" not in res["unavailable"], res["unavailable"]
    assert res["anchors"]["books"]["sid"]["users"] > 0
    assert res["summary"]["gpl-sid"]["all"]["es_auc"]["n"] == 1
    again = run_eval(tiny_dataset, settings, cfg, encoder=enc)
    assert "cached" in again["anchors"]["books"]["sid"]["generator"]
    assert again["runs"] == res["runs"]


def test_teacher_history_profile_is_causal(tiny_dataset: Path) -> None:
    """The teacher's history feature of a request uses only the user's clicks in earlier training requests."""
    from gpl.eval.context import history_profiles

    ds = load_dataset(tiny_dataset)
    vecs = np.random.default_rng(0).normal(size=(ds.n_items, 8)).astype(np.float32)
    prof = history_profiles(ds, vecs)
    click = ds.exposed & (ds.label == 1)
    for r in range(0, ds.n_requests, 7):
        u = ds.req_user[r]
        earlier = [
            q for q in np.flatnonzero(ds.req_user == u) if not ds.is_test[q] and (q < r if not ds.is_test[r] else True)
        ]
        rows = [i for q in earlier for i in range(ds.ptr[q], ds.ptr[q + 1]) if click[i]]
        want = vecs[ds.item[rows]].sum(0) if rows else np.zeros(8)
        n = np.linalg.norm(want)
        assert np.allclose(prof[r], want / n if n else want, atol=1e-5), r


def test_dataset_reads_recall_v1_and_v2_alike(tmp_path: Path) -> None:
    """Event files written before the columnar recall (version 1 candidate objects) still load, and give
    the same dataset as the version 2 columns the simulators write now."""
    items = [ItemEvent(item_id=i, text=f"movie {i}") for i in (1, 2, 3)]
    v2 = RecallEvent(request_id="r1", user_id="a", ts=1000, item_ids=[3, 1, 2], scores=[0.5, 0.25, 0.125])
    assert b'"item_ids"' in orjson.dumps(v2.model_dump(mode="json"))  # written as version 2
    (tmp_path / "v2").mkdir()
    (tmp_path / "v1").mkdir()
    new = load_dataset(_write(tmp_path / "v2", [("items", it) for it in items] + [("recall", v2)],
                              {"test_start_ms": 5000}, []))
    old_dir = _write(tmp_path / "v1", [("items", it) for it in items], {"test_start_ms": 5000}, [])
    with open(old_dir / "events.jsonl", "ab") as f:
        f.write(orjson.dumps({"topic": "recall", "value": {
            "request_id": "r1", "user_id": "a", "ts": 1000,
            "candidates": [{"item_id": 3, "score": 0.5}, {"item_id": 1, "score": 0.25}, {"item_id": 2, "score": 0.125}],
        }}) + b"\n")
    old = load_dataset(old_dir)
    for ds in (new, old):
        assert ds.item_ids[ds.item].tolist() == [3, 1, 2]
        assert ds.recall_score.tolist() == [0.5, 0.25, 0.125]
