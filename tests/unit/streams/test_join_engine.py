"""The join's state machine (streams/join_engine.py) over a dict: no broker, no faust, milliseconds.

The broker tests (tests/integration/test_streams*.py) run the same engine inside the faust agent; these pin its
rules one input at a time: either side first, re-reads and duplicates, expiry by event time and by the
wall-clock guard, late partners, recalls held for unknown items, recovery from the table, and that an
output not taken leaves the rest of the work undone (the app sends each before the engine goes on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.encoder import HashEncoder
from runtime.kafka import Accounting
from runtime.settings import Settings, load
from runtime.vectors.index import Points
from runtime.vectors.memory import MemoryIndex
from schemas.codec import DecodeError
from schemas.events import ExposedItem, ExposureEvent
from schemas.topics import EXPOSURE, RECALL
from streams.catalog import Catalog
from streams.clock import EventClock
from streams.join import DONE, EXPIRED, HELD, Pending, Recall
from streams.join_engine import RESEND_MS, JoinEngine, RealLabels, Unexposed

T0 = 1_700_000_000_000  # event time (ms), in the past: the clock clamps future event times to the wall clock
WAIT_MS, LATE_MS = 30_000, 5_000


class World:
    """An engine over a dict table, a memory index with items 1..9, and a settable wall clock."""

    def __init__(self, tmp_path: Path, **streams: object) -> None:
        self.settings: Settings = load(env={}, data_dir=str(tmp_path), streams={
            "join_wait_s": WAIT_MS / 1000, "allowed_lateness_s": LATE_MS / 1000, "idle_advance_s": 0, **streams})
        self.index = MemoryIndex()
        self.col = self.settings.encoder.collection
        self.index.ensure_collection(self.col, HashEncoder().dim)
        self.add_items(range(1, 10))
        self.table: dict[bytes, bytes] = {}
        self.wall = 2_000_000_000_000
        self.accounting = Accounting("join-test")
        self.engine = self.fresh()

    def fresh(self) -> JoinEngine:
        clock = EventClock(LATE_MS, 0, (RECALL.name, EXPOSURE.name))
        return JoinEngine(self.table, self.settings.streams, self.accounting, Catalog(self.index, self.col), clock,
                          now=lambda: self.wall)

    def add_items(self, ids: range | list[int]) -> None:
        ids = list(ids)
        self.index.upsert(self.col, Points(np.asarray(ids, np.int64), HashEncoder().encode([f"item {i}" for i in ids]),
                                           [{"text": f"item {i}"} for i in ids]))

    def recall(self, rid: str, ids: list[int], ts: int = T0, partition: int = 0, offset: int = 0) -> list[object]:
        rec = Recall(rid, "u1", ts, np.asarray(ids, np.int64), np.linspace(1, 0, len(ids)).astype(np.float32))
        return list(self.engine.on_recall(rec, partition, offset))

    def exposure(self, rid: str, shown: list[int], clicked: set[int], ts: int = T0, partition: int = 0,
                 offset: int = 0) -> list[object]:
        ev = ExposureEvent(request_id=rid, user_id="u1", ts=ts, items=[
            ExposedItem(item_id=i, position=p, clicked=i in clicked) for p, i in enumerate(shown)])
        return list(self.engine.on_exposure(ev, ev.model_dump_json().encode(), partition, offset))

    def kind(self, rid: str) -> bytes:
        return Pending.unpack(self.table[rid.encode()]).kind

    def counts(self) -> dict[str, int]:
        return self.accounting.snapshot()


@pytest.fixture
def w(tmp_path: Path) -> World:
    return World(tmp_path)


def test_a_recall_then_its_exposure_join_into_real_labels_and_the_unexposed_rest(w: World) -> None:
    assert w.recall("r1", [1, 2, 3, 4]) == [] and w.engine.waiting == 1
    out = w.exposure("r1", [2, 4], {4})
    assert [type(o) for o in out] == [RealLabels, Unexposed]
    rest = out[1]
    assert isinstance(rest, Unexposed) and rest.item_ids.tolist() == [1, 3]
    assert rest.scores.dtype == np.float32 and len(rest.scores) == 2
    assert w.engine.waiting == 0 and w.kind("r1") == DONE
    assert w.counts() == {"recall_in": 1, "exposure_in": 1, "joined": 2}


def test_either_side_may_come_first(w: World) -> None:
    assert w.exposure("r1", [1], set()) == [] and w.engine.waiting == 1
    out = w.recall("r1", [1, 2])
    assert [type(o) for o in out] == [RealLabels, Unexposed] and w.engine.waiting == 0


def test_a_reread_is_skipped_and_a_duplicate_refused(w: World) -> None:
    w.recall("r1", [1, 2], offset=7)
    assert w.recall("r1", [1, 2], offset=7) == []  # the same offset after a restart: its work is done
    assert w.counts()["reread"] == 1
    with pytest.raises(DecodeError) as e:
        w.recall("r1", [1, 2], offset=8)
    assert e.value.reason == "duplicate" and w.engine.waiting == 1


def test_event_time_expires_a_lonely_recall_and_a_late_exposure_still_gives_real_labels(w: World) -> None:
    w.recall("r1", [1, 2], ts=T0)
    w.exposure("r2", [3], set(), ts=T0)  # the exposure input has been heard from: a watermark exists
    later = T0 + WAIT_MS + LATE_MS + 1
    w.recall("r3", [4], ts=later, offset=1)
    w.exposure("r4", [5], set(), ts=later, offset=1)  # both inputs moved past r1's due time
    out = list(w.engine.advance(0))
    assert [type(o) for o in out] == [RealLabels]  # r2: an exposure whose recall never came
    assert w.kind("r1") == EXPIRED and w.kind("r2") == EXPIRED
    assert w.counts()["expired"] == 1 and w.counts()["exposure_only"] == 1 and w.engine.waiting == 2
    late = w.exposure("r1", [1], {1}, ts=T0, offset=2)
    assert [type(o) for o in late] == [RealLabels] and w.counts()["late_exposure"] == 1


def test_the_wall_clock_guard_expires_what_event_time_cannot(w: World) -> None:
    w.recall("r1", [1])
    assert list(w.engine.due(w.wall)) == []
    w.wall += w.engine.guard_ms
    (due,) = list(w.engine.due(w.wall))
    assert due[0] == b"r1" and due[2] == 0
    assert list(w.engine.on_deadline(due[0], due[1])) == []
    assert w.counts()["expired_memory_guard"] == 1 and w.engine.waiting == 0
    assert list(w.engine.on_deadline(due[0], due[1])) == []  # a repeated expiry message changes nothing
    assert w.counts()["expired_memory_guard"] == 1


def test_a_recall_held_for_unknown_items_joins_once_the_indexer_has_them(tmp_path: Path) -> None:
    w = World(tmp_path, unknown_items="hold")
    assert w.recall("r1", [1, 42]) == [] and w.kind("r1") == HELD and w.engine.held == {b"r1": 0}
    assert w.exposure("r1", [1], {1}) == [] and w.kind("r1") == HELD and w.engine.waiting == 2
    assert list(w.engine.due(w.wall)) == []  # 42 still unknown
    w.add_items([42])
    w.wall += RESEND_MS
    (due,) = list(w.engine.due(w.wall))
    out = list(w.engine.on_deadline(due[0], due[1]))
    assert [type(o) for o in out] == [RealLabels, Unexposed]
    assert isinstance(out[1], Unexposed) and out[1].item_ids.tolist() == [42]
    assert w.counts()["unknown_released"] == 1 and w.engine.waiting == 0 and not w.engine.held


def test_recovery_rebuilds_waiting_held_and_the_schedules_from_the_table(tmp_path: Path) -> None:
    w = World(tmp_path, unknown_items="hold")
    w.recall("r1", [1])
    w.recall("r2", [2, 77], offset=1)  # held
    w.exposure("r3", [3], set())
    w.exposure("r1", [1], set(), offset=1)  # joined: a marker
    again = w.fresh()
    assert again.recover() == 3
    assert again.waiting == 2 and again.held == {b"r2": 0}
    w.engine = again
    assert list(again.due(w.wall)) == []
    w.wall += again.guard_ms  # the wall-clock bounds still cover what was recovered: marker, hold, guard
    assert {key for key, _, _ in again.due(w.wall)} == {b"r1", b"r2", b"r3"}


def test_an_output_not_taken_leaves_the_rest_undone(w: World) -> None:
    """The app sends each output before the engine goes on: a failing send stops the sweep there."""
    w.exposure("r1", [1], set(), ts=T0)
    w.exposure("r2", [2], set(), ts=T0 + 1, offset=1)
    w.recall("r9", [9], ts=T0 + WAIT_MS + LATE_MS + 10)
    w.exposure("r8", [8], set(), ts=T0 + WAIT_MS + LATE_MS + 10, offset=2)
    sweep = w.engine.advance(0)
    first = next(sweep)
    assert isinstance(first, RealLabels) and first.exposure.request_id == "r1"
    sweep.close()  # the send of r1's labels failed: r2 is not expired
    assert w.kind("r1") == EXPIRED and w.kind("r2") == b"E" and w.counts()["exposure_only"] == 1
