"""The anchors stage's regeneration policy as a pure engine: the request queue, debounce, rate limit,
backpressure and the retry of a failed batch, decided on plain state; the Kafka loop (workers/anchors/loop.py)
performs the decisions (done, pause, resume, produce, commit).

Why apart from the loop: these rules decide which user is served when, and inside the loop they could only
be tested through a broker. Here each is a method call on plain state, in the style of
streams/join_engine.py, with the mechanisms themselves in workers/anchors/policy.py. ``T`` is whatever rides
along with a request (the loop's :class:`~workers.anchors.loop.Origin`: its message, partition and offset).

Regeneration policy (why each rule):

* **Newest per user.** A user has at most one pending request: a newer one supersedes the queued one
  (its anchors would be replaced at once), keeping the more urgent priority of the two (a cold start
  superseded by a drift request is still a user without anchors).
* **Priority.** The queue serves the lowest ``AnchorRequest.priority`` first (0 = cold start), then the
  oldest event time. Because the worker reads ahead up to ``anchors.max_pending`` requests, a cold
  start behind a backlog of drift refreshes is served before them, not after.
* **Debounce.** A request (cold start excepted) for a user whose last generation was made for a request
  less than ``anchors.debounce_s`` earlier *in event time* is dropped (``debounced``). Event time, not
  wall time, so a replay makes the same decisions; the stream already debounces its own triggers, this
  guards against re-emitted requests (rebalances, restarts, several producers).
* **Rate limit.** A token bucket (one token per user) gates dispatch. Its rate follows the worker's
  measured capacity (users per second of batch processing, an EWMA) with headroom, capped by
  ``anchors.rate_limit`` when set (a shared server's quota). When the backend slows down, requests wait
  in the bounded queue instead of piling up as timeouts at the server.
* **Backpressure.** When the queue holds ``max_pending`` requests the consumer's partitions are
  ``pause()``d, and ``resume()``d once it has drained to half: the backlog stays in Kafka (as lag, where
  it is visible and durable), never in this process's memory. A fresh assignment while paused is paused
  again (a rebalance resumes what it assigns).
* **Outages.** A batch whose generation (or storage, or publication) fails as a whole goes back into the
  queue and is retried after an exponential backoff; the requests are never turned into fallback
  anchors or skipped, and their offsets stay uncommitted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Generic, Literal, TypeVar

from runtime.anchor_settings import AnchorsBase
from runtime.kafka import Accounting
from schemas.events import AnchorRequest, AnchorSet
from workers.anchors.metrics import ANCHOR_PAUSED, ANCHOR_QUEUED, ANCHOR_RATE, ANCHOR_REQUEST_DELAY
from workers.anchors.policy import (
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    CapacityMeter,
    Debouncer,
    QueuedRequest,
    RequestQueue,
    TokenBucket,
    is_cold,
    rate_limit,
)

log = logging.getLogger("workers.anchors")  # the stage's logger, as before the engine was split out
T = TypeVar("T")
MIN_WAIT_S = 0.01  # the shortest idle poll: 0 would spin


class AnchorsEngine(Generic[T]):
    """The queue of pending requests and the rules that fill, gate and drain it (see the module docstring).

    ``clock`` is monotonic (the backoff and the token bucket); event times come with the requests.
    """

    def __init__(self, cfg: AnchorsBase, accounting: Accounting,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.accounting = accounting
        self.clock = clock
        self.debouncer = Debouncer(cfg.debounce_s)
        self.capacity = CapacityMeter()
        self.bucket = TokenBucket(rate_limit(None, cfg.rate_limit), burst=cfg.batch_size, clock=clock)
        self.max_queued = 0  # high-water mark of the pending queue (tests, logs)
        self.pauses = 0  # how often backpressure paused the partitions
        self.start()

    def start(self) -> None:
        """A fresh run: nothing queued, nothing paused, no backoff (what a run read but did not finish is
        uncommitted, so the next run reads it again)."""
        self.queue: RequestQueue[T] = RequestQueue()
        self.paused = False
        self.reassigned = False
        self.retry_at = 0.0
        self.backoff_s = BACKOFF_START_S

    # reading -----------------------------------------------------------------------------------

    def poll_budget(self) -> tuple[int, float]:
        """How many records the next poll may read (the queue's room, at least 1: a paused consumer still polls
        for its callbacks) and how long it may wait (until a retry or a token is due, at most the batch wait)."""
        wait_s = max(self.cfg.batch_wait_ms / 1000, MIN_WAIT_S)
        now = self.clock()
        if len(self.queue) == 0:
            timeout = wait_s
        elif now < self.retry_at:
            timeout = min(wait_s, self.retry_at - now)
        else:
            timeout = min(wait_s, self.bucket.wait_s(1))
        return max(1, self.cfg.max_pending - len(self.queue)), timeout

    def assigned(self) -> None:
        """Partitions were assigned (a rebalance): a pause must be applied to them again."""
        self.reassigned = True

    def repause(self) -> bool:
        """After a poll: whether a fresh assignment must be paused because the queue is still full."""
        again, self.reassigned = self.reassigned and self.paused, False
        return again

    def admit(self, req: AnchorRequest, origin: T) -> T | None:
        """Queue one decoded request; returns the origin finished without output: ``req``'s own when it is
        debounced or superseded by a newer queued one, the queued one's when ``req`` supersedes it."""
        if req.user_id not in self.queue and self.debouncer.blocks(req, is_cold(req)):
            self.accounting.add("debounced")
            return origin
        loser = self.queue.push(req, origin)
        if loser is not None:
            self.accounting.add("superseded")
        return loser

    def polled(self) -> None:
        """A poll's requests are admitted: the queue's high-water mark and gauge."""
        self.max_queued = max(self.max_queued, len(self.queue))
        ANCHOR_QUEUED.set(len(self.queue))

    def backpressure(self) -> Literal["pause", "resume"] | None:
        """Pause when the queue is full, resume once it has drained to half; None: leave the partitions as they are."""
        cap = self.cfg.max_pending
        act: Literal["pause", "resume"] | None = None
        if not self.paused and len(self.queue) >= cap:
            act, self.paused = "pause", True
            self.pauses += 1
        elif self.paused and len(self.queue) <= cap // 2:
            act, self.paused = "resume", False
        if act is not None:
            ANCHOR_PAUSED.set(int(self.paused))
            log.info("anchors: %d requests pending, partitions %s", len(self.queue), f"{act}d")
        ANCHOR_QUEUED.set(len(self.queue))
        return act

    def revoked(self, lost: Callable[[T], bool]) -> list[T]:
        """Forget the queued requests of revoked partitions (another worker reads them again)."""
        dropped = self.queue.drop(lost)
        self.accounting.add("revoked", len(dropped))
        return dropped

    # dispatching -------------------------------------------------------------------------------

    def take(self) -> list[QueuedRequest[T]]:
        """The next micro-batch: the most urgent requests the rate limit lets through now (none while a failed
        batch backs off)."""
        if self.clock() < self.retry_at or len(self.queue) == 0:
            return []
        return self.queue.pop(self.bucket.take(min(self.cfg.batch_size, len(self.queue))))

    def failed(self, batch: Sequence[QueuedRequest[T]]) -> None:
        """The batch failed as a whole: back into the queue, retried after a doubling backoff."""
        self.queue.restore(batch)
        self.retry_at = self.clock() + self.backoff_s
        self.backoff_s = min(BACKOFF_MAX_S, self.backoff_s * 2)
        ANCHOR_QUEUED.set(len(self.queue))

    def served(self, batch: Sequence[QueuedRequest[T]], sets: Sequence[AnchorSet], seconds: float) -> None:
        """The batch's sets are published: the backoff ends, their users' debounce windows start, and the rate
        follows the capacity measured over ``seconds`` of processing."""
        self.backoff_s = BACKOFF_START_S
        self.accounting.add("emitted", len(sets))
        by_user = {e.req.user_id: e.req for e in batch}
        now_s = time.time()
        for aset in sets:
            req = by_user[aset.user_id]
            self.debouncer.generated(aset.user_id, req.ts)
            ANCHOR_REQUEST_DELAY.observe(max(0.0, now_s - req.ts / 1000))
        rate = self.capacity.observe(len(batch), seconds)
        self.bucket.set_rate(rate_limit(rate, self.cfg.rate_limit))
        if rate is not None:
            ANCHOR_RATE.set(rate)
