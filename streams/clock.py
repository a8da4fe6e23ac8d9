"""Event time of the join (pure logic, tested without a broker): per-partition watermarks and due times.

A waiting request expires when its partition's *watermark* passes its event time + ``join_wait_s``.
Wall-clock deadlines expired every waiting request after downtime or consumer lag longer than the wait
(the clock ran while no event could arrive); event time only moves when events do, so a restarted or
lagging processor joins what it finds. One partition's clock never moves another's.

The join reads two inputs per partition (recall and exposure), and the consumer fetches each topic
partition on its own: after a restart it may read hours of recalls before the exposures of the same
hours. So, as in Flink, a partition's watermark is the *minimum* over its inputs of the newest event time
seen on each, minus ``allowed_lateness_s``: a request expires only when both inputs are past it.

An input that delivers nothing for ``idle_ms`` of *live* time is idle: it no longer holds the minimum
back, and when every input of a partition is idle the watermark follows the live clock from the newest
event time seen (so the last requests of a stream that stops expire). An input never seen counts as
idle ``idle_ms`` after the (re)start. ``idle_ms`` = 0 turns idleness off (an input never seen then
holds its partition's event time back for good).

Live time is wall time during which the input could have delivered: the processor runs (downtime never
counts: the count starts at the last event or at the (re)start, whichever is later) and, when the
caller reports fetch answers (:meth:`EventClock.answered`), the broker answers this input's fetches. A
broker that stalls for longer than ``idle_ms`` therefore does not make its inputs idle: otherwise, when
it came back, the one input read first (hours of recall backlog) would move the watermark alone, and
requests whose exposures were still unread would expire (the chaos suite's broker stop). Without
reports (the in-memory harness), live time is the wall clock.

An event time far ahead of the wall clock (a producer with a broken clock) would expire everything on its
partition at once, so one event moves its input's clock at most to the wall clock (the event itself is
processed as is). Replays of past data are unaffected.
"""

from __future__ import annotations

import heapq
import time


class EventClock:
    """Watermark per partition over the inputs ``sources``, plus a heap per partition of (due, request id)."""

    def __init__(self, lateness_ms: int, idle_ms: int = 0, sources: tuple[str, ...] = ("recall", "exposure"),
                 now_ms: int | None = None, stall_ms: int = 5_000) -> None:
        self.lateness_ms, self.idle_ms, self.sources, self.stall_ms = lateness_ms, idle_ms, sources, stall_ms
        self.newest: dict[tuple[str, int], int] = {}  # (input, partition) -> newest event time (clamped)
        self.seen_at: dict[tuple[str, int], int] = {}  # (input, partition) -> live time of its last event
        self._live: dict[tuple[str, int], tuple[int, int, int]] = {}  # -> (live ms, at wall ms, answered ms)
        self.started_at = _now(now_ms)
        self._due: dict[int, list[tuple[int, bytes]]] = {}

    def live_ms(self, source: str, partition: int, now_ms: int | None = None) -> int:
        """Live time of an input since the (re)start: the wall clock, less the time its fetches went
        unanswered beyond ``stall_ms`` (only once :meth:`answered` has reported on it)."""
        now = _now(now_ms)
        state = self._live.get((source, partition))
        if state is None:
            return now - self.started_at
        live, at, answered = state
        return live + max(0, min(now, answered + self.stall_ms) - at)

    def answered(self, source: str, partition: int, answered_ms: int | None, now_ms: int | None = None) -> None:
        """The broker last answered a fetch of this input at ``answered_ms`` (None: not yet). Live time
        runs until ``stall_ms`` after each answer, so call this more often than ``stall_ms``."""
        now = _now(now_ms)
        live = self.live_ms(source, partition, now)  # up to now, under what was known before this report
        if answered_ms is None:
            answered_ms = -self.stall_ms  # no answer yet: stalled
        self._live[(source, partition)] = (live, now, answered_ms)

    def observe(self, source: str, partition: int, ts: int, now_ms: int | None = None) -> None:
        wall = _now(now_ms)
        self.seen_at[(source, partition)] = self.live_ms(source, partition, wall)
        ts = min(ts, wall)
        if ts > self.newest.get((source, partition), -1):
            self.newest[(source, partition)] = ts

    def watermark(self, partition: int, now_ms: int | None = None) -> int | None:
        """min over the active inputs of their newest event time − lateness (idle ones left out; all idle:
        the newest + the live time idle beyond ``idle_ms``); None while an input that is not idle yet was
        never seen."""
        now = _now(now_ms)
        active: list[int] = []
        idle: list[int] = []
        for source in self.sources:
            key = (source, partition)
            newest = self.newest.get(key)
            quiet = self.live_ms(source, partition, now) - self.seen_at.get(key, 0) - self.idle_ms
            if self.idle_ms > 0 and quiet > 0:
                if newest is not None:
                    idle.append(newest + quiet)
            elif newest is None:
                return None  # an input not heard from yet, and not idle: it may still bring older events
            else:
                active.append(newest)
        if active:
            return min(active) - self.lateness_ms
        return max(idle) - self.lateness_ms if idle else None

    def due_partitions(self, now_ms: int | None = None) -> list[int]:
        """Partitions with an entry the watermark passed (stale entries included). With events flowing the
        agent expires them after each event; the timer uses this to wake the agent of an idle partition."""
        out = []
        for partition, heap in self._due.items():
            wm = self.watermark(partition, now_ms)
            if heap and wm is not None and heap[0][0] < wm:
                out.append(partition)
        return out

    def schedule(self, partition: int, due: int, key: bytes) -> None:
        heapq.heappush(self._due.setdefault(partition, []), (due, key))

    def pop_due(self, partition: int, now_ms: int | None = None) -> list[tuple[int, bytes]]:
        """Entries whose due time the watermark has passed, oldest first. Entries may be stale (the record
        was joined or rewritten since): the caller checks the record's current due time."""
        wm = self.watermark(partition, now_ms)
        heap = self._due.get(partition)
        out: list[tuple[int, bytes]] = []
        while wm is not None and heap and heap[0][0] < wm:
            out.append(heapq.heappop(heap))
        return out

    def reset(self, now_ms: int | None = None) -> None:
        self.newest.clear()
        self.seen_at.clear()
        self._live.clear()
        self._due.clear()
        self.started_at = _now(now_ms)


def _now(now_ms: int | None) -> int:
    return int(time.time() * 1000) if now_ms is None else now_ms
