"""The MovieLens funnel simulator: deterministic, biased as documented, and truthful about its labels."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from gpl.simulate import (
    MovieLens,
    SimConfig,
    Simulation,
    load_movielens,
    popularity_bias,
    simulate,
    write_jsonl,
)
from schemas.events import ExposureEvent, ItemEvent, RecallEvent
from schemas.jsonl import read_events


@pytest.fixture(scope="module")
def ml() -> MovieLens:
    return load_movielens()


@pytest.fixture(scope="module")
def sim(ml: MovieLens) -> Simulation:
    return simulate(ml, SimConfig(users=40, seed=7, exposure_first_fraction=0.2))


def _by_request(sim: Simulation) -> tuple[dict[str, RecallEvent], dict[str, ExposureEvent]]:
    recalls = {e.request_id: e for t, e in sim.events if t == "recall" and isinstance(e, RecallEvent)}
    exposures = {e.request_id: e for t, e in sim.events if t == "exposure" and isinstance(e, ExposureEvent)}
    return recalls, exposures


def _ratings(ml: MovieLens) -> dict[tuple[str, int], float]:
    users = [str(u) for u in ml.user_ids.tolist()]
    movies = ml.item_ids.tolist()
    return {(users[u], movies[i]): r for u, i, r in
            zip(ml.r_user.tolist(), ml.r_item.tolist(), ml.r_rating.tolist(), strict=True)}


def test_loads_movielens(ml: MovieLens) -> None:
    assert (ml.n_users, ml.n_items, len(ml.r_item)) == (610, 9742, 100_836)
    assert int(ml.popularity.sum()) == 100_836
    toy = int((ml.item_ids == 1).nonzero()[0][0])
    genres = "genres: Adventure, Animation, Children, Comedy, Fantasy"
    assert ml.item_text(toy).startswith(f"Toy Story (1995) | {genres} | tags: ")
    # each user's ratings are sorted by time
    for u in range(ml.n_users):
        ts = ml.r_ts[ml.user_start[u]:ml.user_start[u + 1]]
        assert (ts[1:] >= ts[:-1]).all()


def test_same_seed_same_stream_other_seed_other_stream(ml: MovieLens, tmp_path: Path) -> None:
    cfg = SimConfig(users=15, seed=11)
    a, b = simulate(ml, cfg), simulate(ml, cfg)
    write_jsonl(a, tmp_path / "a.jsonl")
    write_jsonl(b, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a.truth == b.truth and a.exposure_first == b.exposure_first
    c = simulate(ml, SimConfig(users=15, seed=12))
    assert [e for _, e in c.events] != [e for _, e in a.events]


def test_every_request_has_one_recall_and_one_exposure_within_it(sim: Simulation) -> None:
    recalls, exposures = _by_request(sim)
    assert len(recalls) == len(exposures) == sim.stats["requests"] > 0
    assert recalls.keys() == exposures.keys()
    cfg = sim.config
    for rid, rec in recalls.items():
        ex = exposures[rid]
        ids = [c.item_id for c in rec.candidates]
        assert len(ids) == len(set(ids)) == cfg.candidates
        assert ex.user_id == rec.user_id
        assert [it.position for it in ex.items] == list(range(cfg.exposed))
        # no documented exception: what was shown was recalled
        assert {it.item_id for it in ex.items} <= set(ids)
        assert {c.source for c in rec.candidates} <= {"popular", "genre", "random"}
        scores = [c.score for c in rec.candidates]
        assert scores == sorted(scores, reverse=True)
        lo, hi = cfg.exposure_delay_ms
        assert lo <= ex.ts - rec.ts <= hi


def test_targets_are_injected_and_history_is_filtered(ml: MovieLens, sim: Simulation) -> None:
    recalls, _ = _by_request(sim)
    k = sim.config.ratings_per_request
    users = {str(u): i for i, u in enumerate(ml.user_ids.tolist())}
    for rid, rec in recalls.items():
        _, user, chunk = rid.split("-")
        u = users[user]
        a, b = int(ml.user_start[u]), int(ml.user_start[u + 1])
        s = a + int(chunk) * k
        targets = set(ml.item_ids[ml.r_item[s:min(s + k, b)]].tolist())
        past = set(ml.item_ids[ml.r_item[a:s]].tolist())
        ids = {c.item_id for c in rec.candidates}
        assert targets <= ids, rid
        assert not ids & past, f"{rid} recalls items rated before the request"
        assert rec.ts == int(ml.r_ts[s]) * 1000


def test_truth_and_clicks_come_from_real_ratings(ml: MovieLens, sim: Simulation) -> None:
    ratings = _ratings(ml)
    recalls, exposures = _by_request(sim)
    for (user, item), label in sim.truth.items():
        assert label == int(ratings[(user, item)] >= 4.0)
    # every rated candidate has a label; unrated ones have none (unknown)
    unexposed_known = unexposed = 0
    for rid, rec in recalls.items():
        shown = {it.item_id for it in exposures[rid].items}
        for c in rec.candidates:
            key = (rec.user_id, c.item_id)
            assert (key in sim.truth) == (key in ratings)
            if c.item_id not in shown:
                unexposed += 1
                unexposed_known += key in sim.truth
    for ex in exposures.values():
        for it in ex.items:
            assert it.clicked == (sim.truth.get((ex.user_id, it.item_id)) == 1)
    assert sum(it.clicked for ex in exposures.values() for it in ex.items) == sim.stats["clicks"] > 0
    assert unexposed_known / unexposed == pytest.approx(sim.stats["unexposed_known_fraction"])
    assert 0 < unexposed_known < unexposed


def test_exposure_is_biased_towards_popular_items(ml: MovieLens, sim: Simulation) -> None:
    bias = popularity_bias(ml, sim)
    # head items (top 10% by ratings) are a minority of the recall but take most exposure slots
    assert bias["head_candidate_share"] < 0.5
    assert bias["head_exposure_rate"] > 20 * bias["tail_exposure_rate"]
    # and the bias is a knob: with no popularity weight it mostly goes away
    fair_cfg = SimConfig(users=40, seed=7, exposure_popularity_weight=0.0, exposure_relevance_weight=0.0)
    fair = simulate(ml, fair_cfg)
    assert popularity_bias(ml, fair)["ratio"] < bias["ratio"] / 10


def test_emission_order_and_out_of_order_exposures(sim: Simulation) -> None:
    position: dict[tuple[str, str], int] = {}
    for n, (topic, ev) in enumerate(sim.events):
        assert isinstance(ev, RecallEvent | ExposureEvent)
        position[(topic, ev.request_id)] = n
    early = {rid for (topic, rid), n in position.items()
             if topic == "exposure" and n < position[("recall", rid)]}
    assert early == sim.exposure_first
    assert 0.1 < len(early) / sim.stats["requests"] < 0.3  # configured 0.2
    # apart from the early exposures, events leave in event-time order
    in_order = [ev.ts for t, ev in sim.events  # type: ignore[attr-defined]
                if not (t == "exposure" and ev.request_id in early)]  # type: ignore[attr-defined]
    assert in_order == sorted(in_order)
    assert all(it.ts == min(in_order) for it in sim.items)


def test_jsonl_round_trip(sim: Simulation, tmp_path: Path) -> None:
    path = tmp_path / "sim.jsonl"
    n = write_jsonl(sim, path)
    assert n == len(sim.items) + len(sim.events)
    events = list(read_events(path))
    assert len(events) == n
    expected = [("items", it) for it in sim.items] + sim.events
    per_user_order: dict[bytes, list[str]] = defaultdict(list)
    for got, (topic, model) in zip(events, expected, strict=True):
        assert got.topic == topic
        assert type(model).model_validate(orjson.loads(got.value)) == model
        if isinstance(model, ItemEvent):
            assert got.key == str(model.item_id).encode()
        else:
            assert isinstance(model, RecallEvent | ExposureEvent)
            assert got.key == model.user_id.encode() and got.ts == model.ts
            per_user_order[got.key].append(model.request_id)
    assert per_user_order  # keys are user ids, so a user's events share a partition


def test_small_subset_is_fast(ml: MovieLens) -> None:
    t = time.perf_counter()
    s = simulate(ml, SimConfig(users=50))
    assert time.perf_counter() - t < 2.0
    assert s.stats["users"] == 50


def test_larger_recall_and_request_cap(ml: MovieLens) -> None:
    cfg = SimConfig(users=5, candidates=600, exposed=20, max_requests_per_user=3, ratings_per_request=2)
    s = simulate(ml, cfg)
    recalls, exposures = _by_request(s)
    assert all(len(r.candidates) == 600 for r in recalls.values())
    assert all(len(e.items) == 20 for e in exposures.values())
    assert len(recalls) == 5 * 3  # every one of the first 5 users has >= 20 ratings, so 10 chunks >= 3


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        SimConfig(exposed=0)
    with pytest.raises(ValueError):
        SimConfig(candidates=5, exposed=10)
    with pytest.raises(ValueError):
        SimConfig(mix_popular=0, mix_genre=0, mix_random=0)
    with pytest.raises(ValueError):
        SimConfig(exposure_first_fraction=1.5)
