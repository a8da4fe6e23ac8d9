"""The labeler's engine alone (workers/labeler/engine.py): no broker, no index, no labeling, milliseconds.

A batch's end is performed by the caller (samples produced, dead-lettered, timed out), which then marks its
offset done in the offset ledger; these tests play that caller with the real :class:`OffsetLedger`, so the
commit rule is checked as the loop applies it: the commit never passes a batch still deferred or held.
"""

from __future__ import annotations

import numpy as np

from runtime.kafka import Accounting
from runtime.offsets import OffsetLedger
from runtime.settings import LabelerSettings
from schemas.fast_codec import Unexposed
from workers.labeler.assemble import MICRO_BATCH
from workers.labeler.engine import Batch, LabelerEngine

TP0 = ("unexposed", 0)


class Clock:
    """A hand-moved monotonic clock (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _engine(anchored: set[str], clock: Clock | None = None, **cfg: float) -> LabelerEngine:
    settings = LabelerSettings(**{"wait_for_anchors_s": 5.0, "max_deferred": 10, "keep_abstained": 10, **cfg})
    return LabelerEngine(settings, Accounting("labeler-engine-test"), anchored.__contains__,
                         clock=clock or Clock())


def _batch(user: str, offset: int, partition: int = 0, n: int = 3) -> Batch:
    ids = np.arange(offset * 10, offset * 10 + n, dtype=np.int64)
    return Batch(Unexposed(f"r{offset}", user, 1_700_000_000_000, ids), user.encode(), b"raw", partition, offset)


def _ids(batches: list[Batch]) -> list[str]:
    return [b.batch.request_id for b in batches]


def test_a_batch_without_anchors_waits_and_is_labeled_in_order_when_they_arrive() -> None:
    anchored = {"u1"}
    e = _engine(anchored)
    assert e.take(_batch("u2", 0)) and e.take(_batch("u1", 1)) and e.take(_batch("u2", 2))
    assert _ids(e.drain()) == ["r1"]  # u1 has anchors: labeled now; u2's two batches wait
    assert (e.deferred, e.deferred_candidates, e.drain()) == (2, 6, [])
    assert e.release("u3") == []  # anchors of another user release nothing
    anchored.add("u2")
    assert _ids(e.release("u2")) == ["r0", "r2"]  # in arrival order
    assert e.release("u2") == [] and e.deferred == 0 and e.waiting_candidates == 0
    acc = e.accounting.snapshot()
    assert (acc["in"], acc["candidates"], acc["deferred"]) == (3, 9, 2)


def test_a_deferred_batch_times_out_past_its_wait_and_is_never_labeled_after() -> None:
    clock = Clock()
    e = _engine(set(), clock, wait_for_anchors_s=5.0)
    e.take(_batch("u1", 0))
    clock.now += 2
    e.take(_batch("u1", 1))
    clock.now += 2.9
    assert e.expire() == []  # 4.9 s: still within the wait
    clock.now += 0.1
    assert _ids(e.expire()) == ["r0"]  # 5 s for the first, 3 s for the second
    clock.now += 2
    assert _ids(e.expire()) == ["r1"] and e.deferred == 0
    assert e.release("u1") == []  # anchors arriving too late do not label a timed-out batch again
    acc = e.accounting.snapshot()
    assert (acc["timed_out"], acc["candidates_timed_out"]) == (2, 6)


def test_a_released_batch_leaves_the_deadline_queue_too() -> None:
    clock = Clock()
    anchored: set[str] = set()
    e = _engine(anchored, clock)
    e.take(_batch("u1", 0))
    e.take(_batch("u2", 1))
    anchored.add("u1")
    assert _ids(e.release("u1")) == ["r0"]
    clock.now += 10
    assert _ids(e.expire()) == ["r1"]  # r0 released before its deadline: not counted timed out as well
    assert e.accounting["timed_out"] == 1
    for i in (2, 3):
        e.take(_batch("u3", i))
    e.take(_batch("u4", 4))
    anchored.add("u3")
    assert _ids(e.release("u3")) == ["r2", "r3"]
    assert e.stop() == 1 and e.accounting["deferred_at_stop"] == 1  # released batches are not given up again


def test_the_commit_never_passes_a_waiting_or_held_batch() -> None:
    ledger = OffsetLedger()
    anchored = {"u1"}
    e = _engine(anchored)
    batches = [_batch("u2", 0), _batch("u1", 1), _batch("u1", 2), _batch("u1", 3)]
    for b in batches:
        ledger.read(TP0, b.offset)
        assert e.take(b)
    labeled = e.drain()
    assert _ids(labeled) == ["r1", "r2", "r3"]
    assert e.abstain(labeled[1]) == []  # no calibrator for r2: held, its offset stays open
    for b in (labeled[0], labeled[2]):
        ledger.done(TP0, b.offset)  # samples produced
    assert ledger.position(TP0) == 0  # r0 waits for anchors: nothing past it is committed
    anchored.add("u2")
    for b in e.release("u2"):
        ledger.done(TP0, b.offset)
    assert ledger.position(TP0) == 2  # r2 is held
    assert _ids(e.relabel()) == ["r2"] and e.waiting == 0  # a calibrator loaded
    ledger.done(TP0, 2)
    assert ledger.position(TP0) == 4
    assert e.accounting["relabelled"] == 1 and e.accounting["abstained"] == 1


def test_the_hold_dead_letters_the_oldest_past_keep_abstained() -> None:
    e = _engine({"u1"}, keep_abstained=2)
    for i in range(4):
        e.take(_batch("u1", i))
    held = e.drain()
    assert e.abstain(held[0]) == [] and e.abstain(held[1]) == []
    assert _ids(e.abstain(held[2])) == ["r0"]  # past the bound: the oldest goes to the DLQ
    assert _ids(e.abstain(held[3])) == ["r1"]
    assert (len(e.held), e.waiting_candidates) == (2, 6)
    assert _ids(e.relabel()) == ["r2", "r3"]


def test_a_full_deferred_queue_refuses_the_next_waiting_batch_until_there_is_room() -> None:
    clock = Clock()
    e = _engine({"u9"}, clock, max_deferred=2)
    assert e.take(_batch("u1", 0)) and e.take(_batch("u1", 1)) and not e.has_room()
    refused = _batch("u2", 2)
    assert not e.take(refused)  # the loop rewinds the partition to it and pauses it
    assert e.take(_batch("u9", 3))  # a batch that need not wait still flows
    acc = e.accounting.snapshot()
    assert (acc["in"], acc["deferred"], acc["paused"], e.deferred) == (3, 2, 1, 2)  # the refused one not counted
    clock.now += 5
    assert len(e.expire()) == 2 and e.has_room()  # the wait drained the queue: resume
    assert e.take(refused) and e.deferred == 1 and e.accounting["in"] == 4


def test_micro_batches_are_handed_over_at_micro_batch() -> None:
    e = _engine({"u1"})
    for i in range(MICRO_BATCH - 1):
        e.take(_batch("u1", i))
        assert e.full_batch() == []
    e.take(_batch("u1", MICRO_BATCH - 1))
    got = e.full_batch()
    assert [b.offset for b in got] == list(range(MICRO_BATCH)) and e.drain() == []


def test_revoked_partitions_give_back_their_waiting_batches_and_a_stop_the_rest() -> None:
    e = _engine({"u1"})
    for b in (_batch("u2", 0, partition=0), _batch("u2", 1, partition=1), _batch("u1", 2, partition=1),
              _batch("u1", 3, partition=0)):
        e.take(b)
    for b in e.drain():
        e.abstain(b)
    assert e.let_go({1}) == 2 and (e.deferred, len(e.held)) == (1, 1)  # r1 deferred, r2 held: partition 1
    assert e.stop() == 2 and e.waiting == 0
    acc = e.accounting.snapshot()
    assert (acc["released"], acc["candidates_released"]) == (2, 6)
    assert (acc["deferred_at_stop"], acc["abstained_at_stop"]) == (1, 1)
    assert acc["in"] == acc["released"] + acc["deferred_at_stop"] + acc["abstained_at_stop"]
