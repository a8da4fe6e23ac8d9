"""The exploration slice: requests the producer marks as randomly exposed (ExposureEvent.exploration) are
what the calibrator learns from when there are enough of them (workers/labeler/calibrator_fit.py exploration_slice)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpl.eval.dataset import load_dataset
from gpl.simulate.semisynth import OracleConfig, build_semisynth, world_name
from runtime.encoder import HashEncoder
from runtime.settings import load
from schemas.events import ExposureEvent
from workers.labeler import calibrator_fit as C


def test_the_contract_field_defaults_off_and_old_producers_still_validate() -> None:
    old = {"request_id": "r", "user_id": "u", "ts": 1_700_000_000_000,
           "items": [{"item_id": 1, "position": 0, "clicked": False}]}
    assert ExposureEvent.model_validate(old).exploration is False
    assert ExposureEvent.model_validate({**old, "exploration": True}).exploration is True
    assert "exploration" in ExposureEvent.model_json_schema()["properties"]


@pytest.fixture(scope="module")
def explored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("explore")
    return build_semisynth(tmp / "ss", users=30, oracle=OracleConfig(steps=2), cache_dir=tmp / "cache",
                           explore_share=0.3)


def test_semisynth_flags_a_share_of_training_requests_and_exposes_them_at_random(explored: Path) -> None:
    ds = load_dataset(explored)
    flag = ds.explored
    assert flag.any() and not flag[ds.is_test].any()  # training requests only
    share = flag[~ds.is_test].mean()
    assert 0.2 < share < 0.4
    # a ranker's exposure puts the recall's best-scored candidates first; a random one does not
    def top_share(reqs: np.ndarray) -> float:
        got = []
        for r in reqs.tolist():
            rows = slice(ds.ptr[r], ds.ptr[r + 1])
            score = np.nan_to_num(ds.recall_score[rows], nan=-np.inf)
            top = np.argsort(-score, kind="stable")[:20]
            got.append(ds.exposed[rows][top].mean() / max(ds.exposed[rows].mean() * 20 / len(score), 1e-9))
        return float(np.mean(got))
    assert world_name(0, explore_share=0.3) == "semisynth-explore30-seed0"
    assert top_share(np.flatnonzero(flag)) < top_share(np.flatnonzero(~flag & ~ds.is_test))


def test_the_calibrator_learns_from_the_slice_when_it_is_large_enough(explored: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_dataset(explored)
    train = ~ds.is_test
    rows, info = C.exploration_slice(ds, train)
    assert info["exploration_rows"] == (ds.exposed & ds.explored[ds.row_request]).sum()
    settings = load(env={}, data_dir=str(tmp_path / "d"), encoder={"model": "hash-bow-64"})
    vecs = HashEncoder(64).encode(ds.item_text)
    monkeypatch.setattr(C, "EXPLORATION_MIN_ROWS", 10)
    monkeypatch.setattr(C, "EXPLORATION_MIN_CLICKS", 1)
    rows, info = C.exploration_slice(ds, train)
    assert rows is not None and info["exploration_used"] == 1.0
    cf = C.cross_fit_rows(ds, vecs, settings, features=C.PRIOR_FEATURES, anchor_fn=None, targets=rows)
    assert len(cf.rows) and ds.explored[ds.row_request[cf.rows]].all()  # calibration rows: the slice only
    fit = C.fit_dataset_calibrator(ds, vecs, settings, features=C.PRIOR_FEATURES)
    assert fit.cv["exploration_used"] == 1.0
    monkeypatch.setattr(C, "EXPLORATION_MIN_ROWS", 10**9)  # too small a slice: every exposure, and it says so
    assert C.exploration_slice(ds, train)[0] is None
    assert C.fit_dataset_calibrator(ds, vecs, settings, features=C.PRIOR_FEATURES).cv["exploration_used"] == 0.0


def test_the_preference_can_be_turned_off(explored: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_dataset(explored)
    monkeypatch.setattr(C, "EXPLORATION_MIN_ROWS", 10)
    monkeypatch.setattr(C, "EXPLORATION_MIN_CLICKS", 1)
    off = load(env={}, data_dir=str(tmp_path / "d"), encoder={"model": "hash-bow-64"},
               labeler={"prefer_exploration": False})
    fit = C.fit_dataset_calibrator(ds, HashEncoder(64).encode(ds.item_text), off, features=C.PRIOR_FEATURES)
    assert fit.cv["exploration_used"] == 0.0 and fit.cv["exploration_rows"] > 0
