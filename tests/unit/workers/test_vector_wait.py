"""The trainer's wait for item vectors (workers/trainer/vector_wait.py), pure logic: bounds, order, checkpoint state."""

from __future__ import annotations

import io

import torch

from workers.trainer.vector_wait import VectorWait, Waiting


def waiting(item: int, since: float, n: int = 0) -> Waiting:
    return Waiting(item, 1000 + n, since, "samples", 1, n, f'{{"n":{n}}}'.encode(), (7, 8))


def test_release_takes_the_samples_whose_vectors_arrived_in_arrival_order() -> None:
    w = VectorWait(10, 60, clock=lambda: 0.0)
    for n, item in enumerate((5, 6, 5, 7)):
        assert w.add(waiting(item, float(n), n)) == []
    assert len(w) == 4 and w.items() == {5, 6, 7}
    out = w.release(lambda i: i in {5, 7})
    assert [(x.item_id, x.offset) for x in out] == [(5, 0), (5, 2), (7, 3)]
    assert len(w) == 1 and w.items() == {6} and w.release(lambda i: False) == []


def test_both_bounds_push_samples_out_oldest_first() -> None:
    w = VectorWait(2, 10.0)
    assert w.add(waiting(1, 0.0, 0)) == [] and w.add(waiting(2, 1.0, 1)) == []
    assert [x.offset for x in w.add(waiting(1, 2.0, 2))] == [0]  # full: the oldest leaves
    assert w.items() == {1, 2} and w.oldest_age(now=5.0) == 4.0
    assert w.expired(now=10.9) == []
    assert [x.offset for x in w.expired(now=11.0)] == [1]  # waited 10 s
    assert [x.offset for x in w.expired(now=100.0)] == [2] and len(w) == 0 and w.items() == set()
    assert [x.offset for x in VectorWait(0, 10).add(waiting(1, 0.0))] == [0]  # no room at all: out at once


def test_the_state_survives_a_weights_only_checkpoint_round_trip() -> None:
    w = VectorWait(10, 60)
    for n, item in enumerate((3, 4, 3)):
        w.add(waiting(item, 100.0 + n, n))
    buf = io.BytesIO()
    torch.save({"vector_wait": w.state()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["vector_wait"]
    back = VectorWait(1, 60)  # a smaller bound than the saved buffer: restoring pushes nothing out
    assert back.restore(state) == 3
    assert [astuple_of(x) for x in back.release(lambda i: True)] == [astuple_of(x) for x in w.release(lambda i: True)]
    assert back.restore(None) == 0


def astuple_of(x: Waiting) -> tuple[object, ...]:
    return (x.item_id, x.key, x.since, x.topic, x.partition, x.offset, x.value, x.history)
