"""Event time of the join (pure logic, tested without a broker): per-partition watermarks and due times.

A waiting request expires when its partition's *watermark* passes its event time + ``join_wait_s``; the
watermark is the newest event time seen on the partition minus ``allowed_lateness_s``. Wall-clock deadlines
expired every waiting request after downtime or consumer lag longer than the wait (the clock ran while no
event could arrive); event time only moves when events do, so a restarted or lagging processor joins what it
finds. One partition's clock never moves another's: a slow partition's requests wait for their own events.

The last requests of a stream that stops would then wait forever (until the memory guard), so a partition
that saw no event for ``idle_ms`` of wall clock *while the processor runs* lets its event time advance with
the wall clock from there (like Flink's idle sources). The idle count starts at the last event or at the
(re)start, whichever is later, so downtime still counts for nothing; ``idle_ms`` = 0 turns it off.

An event time far ahead of the wall clock (a producer with a broken clock) would expire everything on its
partition at once, so a single event moves the watermark at most to the wall clock (the event itself is
processed as is). Replays of past data are unaffected.
"""

from __future__ import annotations

import heapq
import time


class EventClock:
    """Watermark per partition plus a heap per partition of (event-time due, request id)."""

    def __init__(self, lateness_ms: int, idle_ms: int = 0) -> None:
        self.lateness_ms, self.idle_ms = lateness_ms, idle_ms
        self.newest: dict[int, int] = {}  # partition -> newest event time seen (clamped to the wall clock)
        self.seen_at: dict[int, int] = {}  # partition -> wall clock of its last event (or of the recovery)
        self._due: dict[int, list[tuple[int, bytes]]] = {}

    def observe(self, partition: int, ts: int, now_ms: int | None = None) -> None:
        wall = _now(now_ms)
        self.seen_at[partition] = wall
        ts = min(ts, wall)
        if ts > self.newest.get(partition, -1):
            self.newest[partition] = ts

    def watermark(self, partition: int, now_ms: int | None = None) -> int | None:
        """Newest event time − lateness (+ the wall time idle beyond ``idle_ms``); None before any event."""
        newest = self.newest.get(partition)
        if newest is None:
            return None
        idle = _now(now_ms) - self.seen_at[partition] - self.idle_ms if self.idle_ms > 0 else 0
        return newest - self.lateness_ms + max(0, idle)

    def idle_due(self, now_ms: int | None = None) -> list[int]:
        """Partitions whose idle advance made an entry due (stale entries included): the timer wakes their
        agent, which expires them (only the agent may write tables)."""
        out = []
        for partition, heap in self._due.items():
            wm = self.watermark(partition, now_ms)
            if self.idle_ms > 0 and heap and wm is not None and heap[0][0] < wm:
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

    def scheduled(self, partition: int) -> int:
        return len(self._due.get(partition, ()))

    def reset(self) -> None:
        self.newest.clear()
        self.seen_at.clear()
        self._due.clear()


def _now(now_ms: int | None) -> int:
    return int(time.time() * 1000) if now_ms is None else now_ms
