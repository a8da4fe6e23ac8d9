"""The trainer's click memory and the history input it feeds: causal, bounded, restored after a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.preranker_world import DIM, feed, requests, world_index, world_settings
from workers.click_memory import ClickMemory
from workers.history import history_profile
from workers.trainer import Trainer
from workers.trainer.checkpoints import load_checkpoint


def test_history_is_the_clicks_strictly_before_the_request() -> None:
    m = ClickMemory(2)
    m.add("u", 10, [1, 2])
    m.add("u", 30, [3])
    m.add("u", 20, [2])  # arrives late: kept in time order, the item's latest click counts
    assert m.before("u", 10) == []
    assert m.before("u", 21) == [1, 2]
    assert m.before("u", 31) == [2, 3]  # the last 2 distinct
    assert m.before("other", 99) == []
    again = ClickMemory(2)
    again.restore(m.state())
    assert again.before("u", 31) == [2, 3]


def test_memory_is_bounded_by_users() -> None:
    m = ClickMemory(3, max_users=2)
    for u in ("a", "b", "c"):
        m.add(u, 1, [1])
    assert len(m) == 2 and m.before("a", 5) == []


def test_history_profile_is_unit_or_zero() -> None:
    assert not history_profile(np.zeros((0, 4), np.float32)).any()
    v = history_profile(np.eye(4, dtype=np.float32)[:2])
    assert np.isclose(np.linalg.norm(v), 1.0)


def test_trainer_trains_and_checkpoints_a_history_model(tmp_path: Path) -> None:
    s = world_settings(tmp_path, history_items=8)
    t = Trainer(s, world_index(s), dim=DIM, progress=False)
    ckpt = feed(t, requests(0, 80))
    assert ckpt is not None and t.memory is not None and len(t.memory) > 0
    model, meta = load_checkpoint(ckpt)
    assert model.cfg.history_items == 8
    # a held-out row carries the history its request had (clicks before it), so the gate can score it
    assert any(r[3] for r in t.holdout.rows)
    again = Trainer(s, world_index(s), dim=DIM, progress=False)
    assert again.memory is not None and again.memory.state() == t.memory.state()


def test_demo_scores_held_out_users_with_their_streamed_clicks(tmp_path: Path) -> None:
    from gpl.demo_history import held_out_histories
    from schemas.events import ExposedItem, ExposureEvent
    from workers.model import ModelConfig

    s = world_settings(tmp_path)
    idx = world_index(s)
    train = [("exposure", ExposureEvent(request_id="r", user_id="u1", ts=1, items=[
        ExposedItem(item_id=3, position=0, clicked=True), ExposedItem(item_id=4, position=1, clicked=False)]))]
    cfg = ModelConfig(hash_buckets=64, id_dim=4, hidden=8, content_dim=DIM, history_items=5)
    h = held_out_histories(s.encoder.collection, idx, train, ["u1", "new"], cfg)
    assert h is not None and h.shape == (2, DIM)
    want = history_profile(idx.retrieve(s.encoder.collection, np.asarray([3])).vectors)
    assert np.allclose(h[0], want) and not h[1].any()
    assert held_out_histories(s.encoder.collection, idx, train, ["u1"], ModelConfig(64, 4, 8, DIM)) is None
