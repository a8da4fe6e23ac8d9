"""The anchors worker's regeneration policy as small, pure pieces: queue, debounce, rate limit, capacity.

Each rule and why it exists is written in workers/anchors/engine.py's docstring (the engine composes them);
here are the mechanisms, Kafka-free, so they are tested on their own.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from schemas.events import AnchorRequest

log = logging.getLogger(__name__)


RATE_HEADROOM = 1.25  # the bucket lets dispatch run this much above measured capacity (bursts, growth)
CAPACITY_ALPHA = 0.3  # EWMA weight of the newest batch's throughput
BACKOFF_START_S = 0.5  # first wait after a failed batch; doubles up to BACKOFF_MAX_S
BACKOFF_MAX_S = 30.0
T = TypeVar("T")


def anchor_point_id(user_id: str, slot: int) -> int:
    """Deterministic non-negative 63-bit point id of a user's anchor slot (same id across generations)."""
    digest = hashlib.blake2b(f"{user_id}\x1f{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def newest_per_user(
    requests: Iterable[tuple[AnchorRequest, T]],
) -> tuple[dict[str, tuple[AnchorRequest, T]], int]:
    """The newest request of each user (by event time; on a tie the later one in the batch) and how many
    older ones it superseded. ``T`` rides along (the Kafka message, for dead-lettering)."""
    newest: dict[str, tuple[AnchorRequest, T]] = {}
    superseded = 0
    for req, extra in requests:
        cur = newest.get(req.user_id)
        if cur is not None:
            superseded += 1
            if req.ts < cur[0].ts:
                continue
        newest[req.user_id] = (req, extra)
    return newest, superseded


# ------------------------------------------------------------------------------ regeneration policy


@dataclass
class QueuedRequest(Generic[T]):
    """A request waiting for generation. ``origin`` rides along (the Kafka message, for DLQ and commits);
    ``priority`` and ``cold`` are merged over the requests it superseded."""

    req: AnchorRequest
    origin: T
    priority: int
    cold: bool
    seq: int = 0


def is_cold(req: AnchorRequest) -> bool:
    return req.reason == "cold_start"


class RequestQueue(Generic[T]):
    """At most one pending request per user, served by (priority, event time, arrival).

    A heap with lazy deletion: a superseded entry's heap item stays until popped and is skipped then
    (its ``seq`` no longer matches the user's entry), so push and pop are O(log n).
    """

    def __init__(self) -> None:
        self._entries: dict[str, QueuedRequest[T]] = {}
        self._heap: list[tuple[int, int, int, str]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._entries

    def push(self, req: AnchorRequest, origin: T) -> T | None:
        """Queue ``req``; the origin of the request this one superseded (or that superseded it), if any.

        The newer request by event time wins (a tie goes to the one pushed last); the kept entry takes
        the more urgent priority and the cold-start flag of either.
        """
        cur = self._entries.get(req.user_id)
        if cur is None:
            self._put(QueuedRequest(req, origin, req.priority, is_cold(req)))
            return None
        priority, cold = min(cur.priority, req.priority), cur.cold or is_cold(req)
        if req.ts < cur.req.ts:  # the queued one is newer: this request is the superseded one
            if priority < cur.priority:
                self._put(QueuedRequest(cur.req, cur.origin, priority, cold))
            else:
                cur.cold = cold
            return origin
        self._put(QueuedRequest(req, origin, priority, cold))
        return cur.origin

    def restore(self, entries: Iterable[QueuedRequest[T]]) -> None:
        """Put popped entries back as they were (a batch that failed as a whole)."""
        for e in entries:
            if e.req.user_id not in self._entries:
                self._put(QueuedRequest(e.req, e.origin, e.priority, e.cold))

    def pop(self, n: int) -> list[QueuedRequest[T]]:
        """Up to ``n`` most urgent entries."""
        out: list[QueuedRequest[T]] = []
        while self._heap and len(out) < n:
            _, _, seq, user = heapq.heappop(self._heap)
            e = self._entries.get(user)
            if e is not None and e.seq == seq:
                del self._entries[user]
                out.append(e)
        return out

    def drop(self, pred: Callable[[T], bool]) -> list[T]:
        """Remove the entries whose origin matches (their partition was revoked); their origins."""
        gone = [u for u, e in self._entries.items() if pred(e.origin)]
        return [self._entries.pop(u).origin for u in gone]

    def _put(self, e: QueuedRequest[T]) -> None:
        e.seq = next(self._seq)
        self._entries[e.req.user_id] = e
        heapq.heappush(self._heap, (e.priority, e.req.ts, e.seq, e.req.user_id))
        if len(self._heap) > 4 * len(self._entries) + 64:  # many stale items: rebuild, bounded memory
            self._heap = [(x.priority, x.req.ts, x.seq, u) for u, x in self._entries.items()]
            heapq.heapify(self._heap)


class Debouncer:
    """Remembers, per user, the event time of the request their current anchors answered.

    Entries older than the window can no longer block anything (requests arrive roughly in event-time
    order) and are pruned, so memory follows the users active within one window, not all users.
    """

    def __init__(self, window_s: float) -> None:
        self.window_ms = int(window_s * 1000)
        self._last: dict[str, int] = {}
        self._high = 0
        self._prune_at = 10_000

    def blocks(self, req: AnchorRequest, cold: bool) -> bool:
        if cold or self.window_ms <= 0:
            return False
        last = self._last.get(req.user_id)
        return last is not None and req.ts - last < self.window_ms

    def generated(self, user_id: str, ts: int) -> None:
        self._last[user_id] = max(ts, self._last.get(user_id, ts))
        self._high = max(self._high, ts)
        if len(self._last) > self._prune_at:
            floor = self._high - self.window_ms
            self._last = {u: t for u, t in self._last.items() if t >= floor}
            self._prune_at = max(10_000, 2 * len(self._last))


class TokenBucket:
    """Classic token bucket: ``rate`` tokens per second up to ``burst``; ``inf`` rate never limits."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.clock = clock
        self.tokens = self.burst
        self._t = clock()

    def set_rate(self, rate: float) -> None:
        self._refill()
        self.rate = rate

    def take(self, n: int) -> int:
        """Take up to ``n`` whole tokens; how many were taken."""
        self._refill()
        got = min(n, int(self.tokens))
        self.tokens -= got
        return got

    def wait_s(self, n: int = 1) -> float:
        """Seconds until ``n`` tokens are there (0 if they are)."""
        self._refill()
        missing = min(n, self.burst) - self.tokens
        if missing <= 0 or math.isinf(self.rate):
            return 0.0
        return missing / self.rate if self.rate > 0 else math.inf

    def _refill(self) -> None:
        now = self.clock()
        if math.isinf(self.rate):
            self.tokens = self.burst
        else:
            self.tokens = min(self.burst, self.tokens + (now - self._t) * self.rate)
        self._t = now


class CapacityMeter:
    """Users per second of batch processing (generate + embed + store + publish), as an EWMA.

    Measured on processing time, not on dispatch rate, so a rate limit derived from it cannot talk
    itself down: a throttled worker still measures what one batch costs.
    """

    def __init__(self, alpha: float = CAPACITY_ALPHA) -> None:
        self.alpha = alpha
        self.rate: float | None = None

    def observe(self, users: int, seconds: float) -> float | None:
        if users <= 0 or seconds <= 0:
            return self.rate
        inst = users / seconds
        self.rate = inst if self.rate is None else self.alpha * inst + (1 - self.alpha) * self.rate
        return self.rate


def rate_limit(capacity: float | None, cap: float) -> float:
    """The bucket's rate: measured capacity with headroom (unlimited before the first measurement),
    never above the configured cap (0: no cap)."""
    rate = math.inf if capacity is None else capacity * RATE_HEADROOM
    return min(rate, cap) if cap > 0 else rate
