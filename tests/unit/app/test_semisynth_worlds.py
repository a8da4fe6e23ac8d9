"""The semi-synthetic worlds: independent draws per request, the old per-pair draw, the positive control."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpl.eval.dataset import load_dataset
from gpl.simulate.semisynth import OracleConfig, build_semisynth, read_world, world_name
from gpl.simulate.taste import explained_share, taste_weight, within_request_moments
from runtime.encoder import HashEncoder

FAST = OracleConfig(steps=2)


def _pair_labels(out: Path) -> dict[tuple[int, int], set[int]]:
    """(dense user, dense item) -> the set of labels it got over every request that recalled it."""
    ds = load_dataset(out)
    seen: dict[tuple[int, int], set[int]] = {}
    for u, i, y in zip(ds.row_user.tolist(), ds.item.tolist(), ds.label.tolist(), strict=True):
        seen.setdefault((u, i), set()).add(y)
    return seen


def test_request_draws_are_independent_and_pair_draws_are_shared(tmp_path: Path) -> None:
    req = build_semisynth(tmp_path / "req", users=12, oracle=FAST, cache_dir=tmp_path / "c")
    pair = build_semisynth(tmp_path / "pair", users=12, oracle=FAST, cache_dir=tmp_path / "c", draws="pair")
    first = json.loads((req / "truth.jsonl").read_text().splitlines()[0])
    assert set(first) == {"request_id", "user_id", "positive_item_ids"}
    assert (load_dataset(req).label >= 0).all()  # every candidate has a truth
    # the same pair recalled by several requests: disagreements exist only with independent draws
    assert any(len(v) > 1 for v in _pair_labels(req).values())
    assert not any(len(v) > 1 for v in _pair_labels(pair).values())
    for out in (req, pair):
        meta = json.loads((out / "meta.json").read_text())
        assert abs(meta["stats"]["mean_p_candidates"] - 0.05) < 1e-3
    assert json.loads((pair / "meta.json").read_text())["name"] == world_name(0, "pair") == "semisynth-pairdraw-seed0"


def test_read_world_keys_truth_by_request(tmp_path: Path) -> None:
    out = build_semisynth(tmp_path / "w", users=6, oracle=FAST, cache_dir=tmp_path / "c")
    items, train, test, truth = read_world(out)
    ds = load_dataset(out)
    test_ids = {ds.request_ids[r] for r in np.flatnonzero(ds.is_test).tolist()}
    assert items and train and test
    assert {rid for rid, _ in truth} == test_ids
    for r in np.flatnonzero(ds.is_test).tolist():
        rows = range(ds.ptr[r], ds.ptr[r + 1])
        for k in rows:
            if not ds.exposed[k]:
                assert truth[(ds.request_ids[r], int(ds.item_ids[ds.item[k]]))] == ds.label[k]


def test_taste_weight_gives_the_stated_share() -> None:
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(200), 50)
    a = rng.normal(size=len(group)) + rng.normal(size=200)[group]
    c = 0.3 * a + rng.normal(scale=0.2, size=len(group))  # correlated with the oracle, as real taste is
    for share in (0.05, 0.2, 0.5):
        beta = taste_weight(*within_request_moments(a, c, group), share)
        assert beta > 0 and explained_share(a, c, group, beta) == pytest.approx(share, abs=1e-9)
    with pytest.raises(ValueError):
        taste_weight(1.0, 0.0, 0.0, 0.2)


def test_positive_control_world_adds_the_taste_term(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="encoder"):
        build_semisynth(tmp_path / "x", users=4, oracle=FAST, content_share=0.2)
    out = build_semisynth(tmp_path / "t", users=12, oracle=FAST, cache_dir=tmp_path / "c", content_share=0.2,
                          encoder=HashEncoder())
    meta = json.loads((out / "meta.json").read_text())
    assert meta["name"] == "semisynth-taste20-seed0" and meta["config"]["encoder"] == "hash-bow-64"
    assert meta["oracle"]["taste_share_measured"] == pytest.approx(0.2, abs=1e-6)
    assert meta["oracle"]["taste_beta"] > 0
    assert abs(meta["stats"]["mean_p_candidates"] - 0.05) < 1e-3  # the offset is re-solved after the term
