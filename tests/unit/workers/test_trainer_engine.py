"""The trainer's rules on the pure engine alone (workers/trainer/engine.py): no broker, no index, no model.

What a polled record does to the seen-set, the vector wait and the train buffer, when a step and a checkpoint
are due, and where a commit may go: milliseconds each. The loop over the in-memory twin
(tests/unit/workers/test_trainer_loop_memory.py) and the broker tests
(tests/integration/test_trainer.py) check the same rules end to end.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.kafka import Accounting
from runtime.settings import TrainerSettings
from schemas.events import Sample, SampleBatch
from schemas.ids import sample_id
from workers.trainer.engine import Take, TrainEngine
from workers.trainer.vector_wait import VectorWait

TP0 = ("samples", 0)


class Clock:
    """A hand-moved clock: the time bounds tested without sleeping."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def engine(*, clock: Clock | None = None, wait_max: int = 100, wait_s: float = 60.0, **cfg: object
           ) -> TrainEngine[Take]:
    settings = TrainerSettings(**{"batch_size": 4, "checkpoint_every": 10, "holdout_fraction": 0.0, **cfg})
    c = clock or Clock()
    return TrainEngine(settings, Accounting("trainer-engine-test"), VectorWait(wait_max, wait_s, clock=c), clock=c)


def batch(request_id: str, items: list[int], source: str = "exposed-negative", ts: int = 1) -> SampleBatch:
    return SampleBatch(request_id=request_id, user_id="u1", ts=ts, samples=[
        Sample(sample_id=sample_id(request_id, i), item_id=i, label=1.0 if source == "click" else 0.0, weight=1.0,
               source=source) for i in items])  # type: ignore[arg-type]


def vectors(*items: int) -> dict[int, np.ndarray]:
    return {i: np.full(4, float(i), np.float32) for i in items}


def feed(e: TrainEngine[Take], b: SampleBatch, known: dict[int, np.ndarray], offset: int) -> list[Take]:
    """What the loop does with one decoded message: count it, admit it, buffer what is trained, advance."""
    e.message()
    takes, dead = e.admit(b, (*TP0, offset), known)
    assert not dead
    for t in takes:
        if not t.holdout:
            e.buffer(t)
    e.consumed(TP0, offset + 1)
    return takes


def test_a_sample_id_seen_twice_is_trained_once() -> None:
    e = engine()
    known = vectors(1, 2, 3)
    assert [t.sample.item_id for t in feed(e, batch("r1", [1, 2]), known, 0)] == [1, 2]
    # the same request again (a re-sent message, a relabel after a restart): both are duplicates
    assert feed(e, batch("r1", [2, 1]), known, 1) == []
    # another request for the same items is another example
    assert [t.sample.item_id for t in feed(e, batch("r2", [1]), known, 2)] == [1]
    assert (e.counts["duplicates"], e.counts["samples"], len(e.pending), len(e.seen)) == (2, 3, 3, 3)
    assert e.balance() == 0


def test_a_real_label_waits_for_its_vector_then_is_trained_once() -> None:
    e = engine()
    known = vectors(1)
    takes = feed(e, batch("r1", [1, 7], source="click"), known, 0)
    assert [t.sample.item_id for t in takes] == [1]
    assert (len(e.waiting), e.counts["vector_waits"], e.counts["samples"]) == (1, 1, 1)
    assert feed(e, batch("r1", [7], source="click"), known, 1) == []  # re-sent while it waits: a duplicate
    assert len(e.waiting) == 1 and e.counts["duplicates"] == 1
    assert e.release(known) == ([], [])  # not indexed yet: it keeps waiting
    known |= vectors(7)
    assert 7 in e.wanted([])  # the waiting item is asked for again
    released, dead = e.release(known)
    assert [(t.sample.item_id, t.sample.source, t.holdout) for t in released] == [(7, "click", False)] and not dead
    assert np.array_equal(released[0].vector, known[7])
    assert e.release(known) == ([], [])  # released once, never twice
    assert (len(e.waiting), e.counts["samples"], e.counts["real"], e.counts["clicks"]) == (0, 2, 2, 2)
    assert e.balance() == 0


def test_a_wait_in_vain_is_dead_lettered_and_leaves_the_seen_set() -> None:
    clock = Clock()
    e = engine(clock=clock, wait_s=30.0)
    feed(e, batch("r1", [9]), {}, 0)
    clock.t += 29.0
    assert e.release({}) == ([], [])
    clock.t += 1.0
    _, dead = e.release({})
    assert [d.waiting.item_id for d in dead] == [9] and e.counts["no_vector"] == 1
    assert (dead[0].waiting.topic, dead[0].waiting.partition, dead[0].waiting.offset) == (*TP0, 0)
    assert feed(e, batch("r1", [9]), vectors(9), 1) != []  # its replay, once indexed, is trained


def test_the_wait_bound_pushes_the_oldest_out() -> None:
    e = engine(wait_max=2)
    e.message()
    takes, dead = e.admit(batch("r1", [5, 6, 7]), (*TP0, 0), {})
    assert not takes and [d.waiting.item_id for d in dead] == [5] and "2 samples" in dead[0].why
    assert sorted(e.waiting.items()) == [6, 7]


def test_pseudo_labels_are_skipped_when_the_settings_say_so() -> None:
    e = engine(pseudo_labels=False)
    assert feed(e, batch("r1", [1, 2], source="pseudo"), vectors(1, 2), 0) == []
    assert e.counts["pseudo_skipped"] == 2 and not e.seen and e.balance() == 0


def test_real_labels_in_the_holdout_are_never_buffered_pseudo_labels_never_held_out() -> None:
    e = engine(holdout_fraction=0.5)
    items = list(range(1, 41))
    real = feed(e, batch("r1", items, source="click"), vectors(*items), 0)
    held = [t for t in real if t.holdout]
    assert 0 < len(held) < len(items) and e.counts["holdout"] == len(held)
    assert len(e.pending) == len(items) - len(held)
    pseudo = feed(e, batch("r2", items, source="pseudo"), vectors(*items), 1)
    assert not any(t.holdout for t in pseudo)


def test_a_step_is_due_at_a_full_batch_and_takes_rows_in_order() -> None:
    e = engine(batch_size=4)
    feed(e, batch("r1", [1, 2, 3]), vectors(1, 2, 3, 4, 5), 0)
    assert not e.step_due()
    feed(e, batch("r2", [4, 5]), vectors(1, 2, 3, 4, 5), 1)
    assert e.step_due()
    assert [t.sample.item_id for t in e.rows(4)] == [1, 2, 3, 4]
    assert [t.group for t in e.pending] == [1] and not e.step_due()  # r2 is the second request group


def test_the_commit_never_passes_an_untrained_record() -> None:
    e = engine()
    known = vectors(1, 2, 3)
    feed(e, batch("r1", [1, 2]), known, 0)
    assert e.offsets == {TP0: 1} and e.durable_offsets == {}  # consumed, not yet durable
    with pytest.raises(RuntimeError, match="untrained"):
        e.durable()
    assert e.durable_offsets == {}
    e.rows(len(e.pending))  # trained, and then checkpointed
    assert e.durable() == {TP0: 1}
    feed(e, batch("r2", [3]), known, 1)
    assert e.offsets == {TP0: 2} and e.durable_offsets == {TP0: 1}  # r2 is buffered: the commit stays before it


def test_a_waiting_sample_does_not_hold_the_commit_back() -> None:
    e = engine()
    feed(e, batch("r1", [8]), {}, 0)  # waits: the checkpoint saves it, so its offset may be passed
    assert e.durable() == {TP0: 1} and len(e.waiting) == 1


def test_a_checkpoint_is_due_on_the_count_bound_and_on_the_time_bound_when_changed() -> None:
    clock = Clock()
    e = engine(clock=clock, checkpoint_every=10, checkpoint_every_s=5.0)
    known = vectors(*range(1, 11))
    feed(e, batch("r1", list(range(1, 10))), known, 0)
    assert not e.checkpoint_due() and not e.checkpoint_due(timed=True)
    e.message(bad=True)  # a bad message counts as an input too
    assert e.checkpoint_due()
    e.rows(len(e.pending))
    e.durable()
    assert not e.checkpoint_due() and not e.changed()
    clock.t += 6.0
    assert not e.checkpoint_due(timed=True)  # nothing changed: no empty version
    feed(e, batch("r2", [10]), known, 2)
    assert not e.checkpoint_due() and e.checkpoint_due(timed=True)
    e.rows(len(e.pending))
    e.durable()  # the time bound counts from the last checkpoint
    feed(e, batch("r3", [10]), known, 3)
    clock.t += 4.9
    assert not e.checkpoint_due(timed=True)
    clock.t += 0.1
    assert e.checkpoint_due(timed=True)
