"""The recall × exposure join as a pure state machine: one input in, the table updated, the outputs out.

Why apart from the faust app (streams/app.py): the rules of the join — who waits for whom, re-reads,
duplicates, late partners, expiry by event time, the wall-clock guard, recalls held for unknown items,
markers and when they are forgotten — are the stage's logic, and in the agent they could only be tested
through a broker. Here they run over any ``MutableMapping[bytes, bytes]`` (a dict in the unit tests,
the changelogged faust table in the app), in the style of a stateful map: the state is the table plus
the schedules rebuilt from it (:meth:`JoinEngine.recover`), each call takes one input and yields what
it produces.

Outputs are *yielded* (:class:`RealLabels`, :class:`Unexposed`) and the app performs each one before the
engine goes on, so a failing send leaves the remaining work exactly where it was: always iterate an
engine call to its end. The record formats and the join arithmetic are streams/join.py's.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np

from runtime.kafka import Accounting
from runtime.settings import StreamsSettings
from schemas.codec import decode
from schemas.events import ExposureEvent
from schemas.fast_codec import Recall
from schemas.topics import EXPOSURE, RECALL
from streams.catalog import Catalog, UnknownItems
from streams.clock import EventClock
from streams.copartition import SplitWatch
from streams.join import (
    DONE,
    EXPIRED,
    HELD,
    NO_OFFSET,
    PENDING_EXPOSURE,
    PENDING_RECALL,
    Pending,
    event_due,
    is_reread,
    marker,
    pending_exposure,
    pending_recall,
    unexposed,
    unique_candidates,
)

RESEND_MS = 2_000  # the timer hands the agent the same held recall or idle partition again after this


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class RealLabels:
    """The exposure's items are real labels (``samples``), and its clicks move the user's interest."""

    exposure: ExposureEvent


@dataclass(frozen=True)
class Unexposed:
    """The recalled candidates the exposure did not show (``unexposed``), with their recall scores."""

    exposure: ExposureEvent
    item_ids: np.ndarray
    scores: np.ndarray


Output = RealLabels | Unexposed


class JoinEngine:
    """The join table's state machine; counts every input's outcome in ``accounting``.

    ``waiting`` is how many inputs wait for their partner or their items (not yet an outcome); ``held``
    the recalls held for unknown items (request id → when the index was last asked, ms).
    """

    def __init__(self, table: MutableMapping[bytes, bytes], cfg: StreamsSettings, accounting: Accounting,
                 catalog: Catalog, clock: EventClock, *, now: Callable[[], int] = now_ms) -> None:
        self.table = table
        self.cfg = cfg
        self.accounting = accounting
        self.catalog = catalog
        self.unknown_items = UnknownItems(catalog, cfg, accounting)
        self.splits = SplitWatch(accounting)  # requests whose halves came on different partitions
        self.clock = clock
        self.now = now
        self.waiting = 0
        self.held: dict[bytes, int] = {}
        self.wait_ms, self.dedup_ms = int(cfg.join_wait_s * 1000), int(cfg.dedup_window_s * 1000)
        self.guard_ms = int(cfg.join_memory_guard_s * 1000)
        self._deadlines: list[tuple[int, bytes, int]] = []  # wall clock: (deadline ms, request id, partition)

    # ------------------------------------------------------------------ recall
    def on_recall(self, recall: Recall, partition: int, offset: int) -> Iterator[Output]:
        self.accounting.add("recall_in")
        self.clock.observe(RECALL.name, partition, recall.ts)
        key = recall.request_id.encode()
        prev = self.get(key)
        if is_reread(prev, "recall", recall.request_id, partition, offset):
            self.accounting.add("reread")  # read again after a restart: its work is in the table already
            return
        if prev is not None and prev.kind == EXPIRED:
            self.accounting.add("late_recall")
            self.put(key, marker(EXPIRED, prev, prev.ts, prev.deadline_ms, recall_offset=offset))
            return
        recall, dropped = unique_candidates(recall)
        if dropped:
            self.accounting.add("duplicate_candidates", dropped)  # the first of each is kept
        recall, unknown = self.unknown_items.screen(recall, len(self.held))
        if len(unknown):  # hold: wait in the table (with the exposure if it came) until the indexer has them
            deadline = self.now() + int(self.cfg.unknown_hold_s * 1000)
            self.put(key, pending_recall(recall, deadline, partition, offset, HELD, prev))
            self.held[key] = 0
            self.waiting += 1
            self.accounting.add("unknown_held")
        elif prev is None:
            self.put(key, pending_recall(recall, self.now() + self.guard_ms, partition, offset))
            self.waiting += 1
        else:
            assert prev.kind == PENDING_EXPOSURE and prev.exposure is not None
            self.splits.joined(prev, partition)
            yield from self.join(key, recall.item_ids, recall.scores, decode(prev.exposure, ExposureEvent), prev,
                                 offset, prev.exposure_offset)

    # ------------------------------------------------------------------ exposure
    def on_exposure(self, exposure: ExposureEvent, value: bytes, partition: int, offset: int) -> Iterator[Output]:
        """``value``: the exposure as it came (kept in the table until its recall arrives)."""
        self.accounting.add("exposure_in")
        self.clock.observe(EXPOSURE.name, partition, exposure.ts)
        key = exposure.request_id.encode()
        prev = self.get(key)
        if is_reread(prev, "exposure", exposure.request_id, partition, offset):
            self.accounting.add("reread")
            return
        if prev is None:
            self.put(key, pending_exposure(exposure, value, self.now() + self.guard_ms, partition, offset))
            self.waiting += 1
        elif prev.kind == PENDING_RECALL:
            assert prev.item_ids is not None and prev.scores is not None
            self.splits.joined(prev, partition)
            yield from self.join(key, prev.item_ids, prev.scores, exposure, prev, prev.recall_offset, offset)
        elif prev.kind == HELD:  # the recall waits for its items: the exposure waits with it
            self.put(key, Pending(HELD, prev.ts, prev.deadline_ms, prev.user_id, prev.partition,
                                  prev.recall_offset, offset, prev.item_ids, prev.scores, value))
            self.waiting += 1
        else:  # the recall expired before this exposure came: its clicks are still real labels
            self.accounting.add("late_exposure")
            self.put(key, marker(EXPIRED, prev, prev.ts, prev.deadline_ms, exposure_offset=offset))
            yield RealLabels(exposure)

    # ------------------------------------------------------------------ join
    def join(self, key: bytes, recall_ids: np.ndarray, recall_scores: np.ndarray, exposure: ExposureEvent,
             prev: Pending, recall_offset: int, exposure_offset: int) -> Iterator[Output]:
        self.put(key, marker(DONE, prev, exposure.ts, self.now() + max(self.dedup_ms, self.guard_ms),
                             recall_offset=recall_offset, exposure_offset=exposure_offset))
        self.accounting.add("joined", 2)
        self.waiting -= prev.waiting_inputs
        rest = unexposed(recall_ids, recall_scores, exposure)
        yield RealLabels(exposure)
        if rest is not None:
            yield Unexposed(exposure, *rest)

    # ------------------------------------------------------------------ expiry by event time
    def advance(self, partition: int) -> Iterator[Output]:
        """Expire the waiting requests and forget the markers whose due time the partition's watermark passed."""
        for due, key in self.clock.pop_due(partition):
            rec = self.get(key)
            if rec is None or event_due(rec, self.wait_ms, self.dedup_ms) != due:
                continue  # joined, rewritten or forgotten since it was scheduled
            if rec.kind in (DONE, EXPIRED):
                del self.table[key]
            else:
                yield from self.expire(key, rec, guard=False)

    def expire(self, key: bytes, rec: Pending, *, guard: bool) -> Iterator[Output]:
        """A request whose partner did not come in time (``guard``: the wall-clock memory guard fired)."""
        self.put(key, marker(EXPIRED, rec, rec.ts, self.now() + max(self.dedup_ms, self.guard_ms)))
        self.waiting -= rec.waiting_inputs
        suffix = "_memory_guard" if guard else ""
        if rec.kind == PENDING_RECALL:
            self.accounting.add("expired" + suffix)
        else:  # an exposure whose recall never came: real labels all the same
            self.accounting.add("exposure_only" + suffix)
            assert rec.exposure is not None
            yield RealLabels(decode(rec.exposure, ExposureEvent))

    # ------------------------------------------------------------------ wall clock: guard, hold
    def due(self, now: int) -> Iterator[tuple[bytes, int, int]]:
        """(request id, deadline, partition) of what the wall clock made due: waiting requests past the
        memory guard, markers past their bound, held recalls whose items arrived. Writes no record (the
        app's timer may not): the app hands each to :meth:`on_deadline` through its partition's agent."""
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, key, partition = heapq.heappop(self._deadlines)
            raw = self.table.get(key)
            if raw is None or Pending.unpack(raw).deadline_ms != deadline:
                continue
            yield key, deadline, partition
        yield from held_ready(self.held, self.table, self.catalog, now)

    def on_deadline(self, key: bytes, deadline: int) -> Iterator[Output]:
        """Act on what :meth:`due` found; a record joined, released or rewritten since changes nothing."""
        rec = self.get(key)
        if rec is None or rec.deadline_ms != deadline:
            return  # joined, released or forgotten since the timer looked
        if rec.kind == HELD:
            yield from self.release(key, rec)
        elif rec.kind in (DONE, EXPIRED):
            del self.table[key]
        elif self.now() >= deadline:
            yield from self.expire(key, rec, guard=True)

    def release(self, key: bytes, rec: Pending) -> Iterator[Output]:
        """A held recall goes on once the indexer has its items, or at the end of its hold without the ones
        still unknown (counted)."""
        assert rec.item_ids is not None and rec.scores is not None
        recall = Recall(key.decode(), rec.user_id, rec.ts, rec.item_ids, rec.scores)
        unknown = self.catalog.unknown(recall.item_ids)
        if len(unknown) and self.now() < rec.deadline_ms:
            return  # not yet: the timer asks again
        self.held.pop(key, None)
        if len(unknown):
            self.accounting.add("unknown_hold_timeout")
            recall = self.unknown_items.drop(recall, unknown)
        else:
            self.accounting.add("unknown_released")
        if rec.exposure is None:  # now it waits for its exposure, like any recall
            self.put(key, pending_recall(recall, self.now() + self.guard_ms, rec.partition, rec.recall_offset))
        else:
            yield from self.join(key, recall.item_ids, recall.scores, decode(rec.exposure, ExposureEvent), rec,
                                 rec.recall_offset, rec.exposure_offset)

    # ------------------------------------------------------------------ state
    def recover(self) -> int:
        """Rebuild the schedules and the watermarks from the table (after a restart it comes back from its
        changelog): the newest event time of the recovered records — markers carry it for joined requests —
        so the watermark resumes about where it stopped, never ahead, and nothing expires for the downtime.
        Returns how many records were recovered."""
        self._deadlines, self.waiting, self.held = [], 0, {}
        self.clock.reset()
        for key, raw in self.table.items():
            rec = Pending.unpack(raw)
            for source, offset in ((RECALL.name, rec.recall_offset), (EXPOSURE.name, rec.exposure_offset)):
                if offset != NO_OFFSET:  # this input had reached about rec.ts (a joined marker: its exposure ts)
                    self.clock.observe(source, rec.partition, rec.ts)
            self.schedule(key, rec)
            self.waiting += rec.waiting_inputs
            if rec.kind == HELD:
                self.held[key] = 0
        return len(self._deadlines)

    def get(self, key: bytes) -> Pending | None:
        raw = self.table.get(key)
        return Pending.unpack(raw) if raw else None

    def put(self, key: bytes, rec: Pending) -> None:
        """Write a record (a request waiting, or the marker that replaces it, changelogged alike) and
        schedule its expiry by event time and by wall clock."""
        self.table[key] = rec.pack()
        self.schedule(key, rec)

    def schedule(self, key: bytes, rec: Pending) -> None:
        heapq.heappush(self._deadlines, (rec.deadline_ms, key, rec.partition))
        due = event_due(rec, self.wait_ms, self.dedup_ms)
        if due is not None:
            self.clock.schedule(rec.partition, due, key)


def held_ready(held: dict[bytes, int], table: Mapping[bytes, bytes], catalog: Catalog,
               now: int) -> Iterator[tuple[bytes, int, int]]:
    """(request id, deadline, partition) of the held recalls whose items the index has now. Each held recall
    asks the index at most once per ``RESEND_MS`` (``held`` keeps when it last asked); one that is no longer
    held in the table is forgotten."""
    for key, checked in list(held.items()):
        if now - checked < RESEND_MS:
            continue
        raw = table.get(key)
        rec = Pending.unpack(raw) if raw else None
        if rec is None or rec.kind != HELD:
            held.pop(key, None)
            continue
        held[key] = now
        if rec.item_ids is not None and not len(catalog.unknown(rec.item_ids)):
            yield key, rec.deadline_ms, rec.partition
