"""Anchors: ``anchor-requests`` → interest anchors → frozen space → Qdrant ``anchors`` → ``anchors``.

Reads top to bottom: read requests ahead into a bounded pending queue (dead-lettering what does not
parse), pick the most urgent micro-batch (up to ``anchors.batch_size``), answer what the replay cache
knows, generate the rest, embed the anchor texts with the same frozen encoder as the items, upsert them
into Qdrant, publish one ``AnchorSet`` per user, flush, and only then commit the offsets the finished
work covers.

Making the sets — history lookup, generation (replay cache first), embedding, vector-index slots and
versions — is :class:`~workers.anchors.sets.AnchorMaker`'s (workers/anchors/sets.py); this module is the
stage's loop and its regeneration policy.

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
  it is visible and durable), never in this process's memory.
* **Outages.** A batch whose generation (or storage, or publication) fails as a whole goes back into the
  queue and is retried after an exponential backoff; the requests are never turned into fallback
  anchors or skipped, and their offsets stay uncommitted.

Offsets: read-ahead and priorities finish requests out of order, so each partition commits up to (not
including) its oldest request still pending or in flight (the ledger every stage's I/O shares,
:class:`~gpl.runtime.stage_port.StageRules`).

Counting (``Accounting("anchors")``): every request is ``in`` and ends as exactly one of ``emitted``,
``superseded``, ``debounced``, ``revoked`` (its partition went to another worker before it was served;
that worker reads it again) or ``dlq:<reason>`` (``dlq:unknown_items`` when none of its history items
has a text yet, or for a vector backend is in the item collection, or has a semantic ID;
``dlq:no_anchors`` if even the fallback had nothing to offer). ``fallback`` counts,
among the emitted, the sets whose anchors came from the generator's fallback instead of the LLM.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from gpl.runtime.encoder import Encoder
from gpl.runtime.kafka import Accounting
from gpl.runtime.metrics import (
    ANCHOR_BACKEND_ERRORS,
    ANCHOR_PAUSED,
    ANCHOR_QUEUED,
    ANCHOR_RATE,
    ANCHOR_REQUEST_DELAY,
)
from gpl.runtime.offsets import TP
from gpl.runtime.settings import Settings
from gpl.runtime.stage_io import StageIO
from gpl.runtime.stage_port import StagePort
from gpl.runtime.vectors.index import VectorIndex
from schemas.events import AnchorRequest, AnchorSet
from schemas.topics import ANCHOR_REQUESTS, ANCHORS
from workers.anchors.generation_cache import GenerationCache
from workers.anchors.generators.base import AnchorGenerator
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
from workers.anchors.sets import AnchorMaker
from workers.anchors.vector_anchors import VectorAnchorSource

log = logging.getLogger("workers.anchors")  # the stage's logger: the package's name, as before it was one
STAGE = "anchors"
__all__ = ["STAGE", "AnchorWorker", "Origin"]


@dataclass
class Origin:
    """Where a pending request came from: its message (for the DLQ) and its partition/offset."""

    msg: Any
    tp: TP
    offset: int


@dataclass
class _LoopState:
    queue: RequestQueue[Origin] = field(default_factory=RequestQueue)
    paused: bool = False
    reassigned: bool = False
    retry_at: float = 0.0
    backoff_s: float = BACKOFF_START_S


class AnchorWorker:
    def __init__(self, settings: Settings, index: VectorIndex, encoder: Encoder,
                 generator: AnchorGenerator | VectorAnchorSource, *, progress: bool = False,
                 cache: GenerationCache | None = None) -> None:
        self.settings = settings
        self.index = index
        self.encoder = encoder
        self.generator = generator
        self.accounting = Accounting(STAGE)
        self.maker = AnchorMaker(settings, index, encoder, generator, self.accounting, cache=cache)
        self.items, self.collection = self.maker.items, self.maker.collection
        self.vector_source, self.cache = self.maker.vector_source, self.maker.cache
        self.progress = progress
        cfg = settings.anchors
        self.debouncer = Debouncer(cfg.debounce_s)
        self.capacity = CapacityMeter()
        self.bucket = TokenBucket(rate_limit(None, cfg.rate_limit), burst=cfg.batch_size)
        self.max_queued = 0  # high-water mark of the pending queue (tests, logs)
        self.pauses = 0  # how often backpressure paused the partitions

    def run(self, stop: threading.Event, *, io: StagePort | None = None) -> None:
        """Serve requests until ``stop``; ``io`` replaces the Kafka I/O (the in-memory twin of the unit tests)."""
        cfg = self.settings.anchors
        if io is None:
            io = StageIO(self.settings.kafka, STAGE, self.accounting, registry=self.settings.schema_registry)
        st = _LoopState()

        def on_assign(consumer_: Any, parts: list[Any]) -> None:
            st.reassigned = True  # re-apply a pause to the new assignment once consume() returns

        def on_revoke(consumer_: Any, parts: list[Any]) -> None:
            tps = {(tp.topic, tp.partition) for tp in parts}
            io.commit(offsets=io.ledger.committable(tps))  # what is finished stays finished
            dropped = st.queue.drop(lambda o: o.tp in tps)
            self.accounting.add("revoked", len(dropped))  # the ledger forgets them after this

        io.subscribe([ANCHOR_REQUESTS.name], on_assign=on_assign, on_revoke=on_revoke)
        wait_s = max(cfg.batch_wait_ms, 10) / 1000  # 0 would spin: wait at least 10 ms when idle
        bar = tqdm(desc="anchor users", unit="user", disable=not self.progress, leave=False)
        try:
            while not stop.is_set():
                room = cfg.max_pending - len(st.queue)
                now = time.monotonic()
                if len(st.queue) == 0:
                    timeout = wait_s
                elif now < st.retry_at:
                    timeout = min(wait_s, st.retry_at - now)
                else:
                    timeout = min(wait_s, self.bucket.wait_s(1))
                # paused: still call consume (callbacks, poll interval); only a fresh assignment can answer
                msgs = io.poll(max(1, room), timeout)
                if st.reassigned and st.paused:
                    io.pause()
                st.reassigned = False
                self._admit(msgs, st, io)
                self._backpressure(io, st)
                if len(st.queue) == 0 and msgs:  # only DLQ'd or debounced: make that durable, commit
                    io.commit(stop, what="dead letters")
                    continue
                if time.monotonic() < st.retry_at or len(st.queue) == 0:
                    continue
                n = self.bucket.take(min(cfg.batch_size, len(st.queue)))
                if n:
                    done = self._dispatch(io, st, st.queue.pop(n))
                    bar.update(done)
                    self._backpressure(io, st)
        finally:
            bar.close()
            ANCHOR_QUEUED.set(0)
            ANCHOR_PAUSED.set(0)
            io.close()

    def _admit(self, msgs: list[Any], st: _LoopState, io: StagePort) -> None:
        """Decode, dead-letter, debounce and queue a poll's messages (superseding per user)."""
        for m in msgs:
            origin = Origin(m, (m.topic() or ANCHOR_REQUESTS.name, m.partition() or 0), m.offset() or 0)
            self.accounting.add("in")
            req = io.decode(m, AnchorRequest)
            if req is None:
                continue
            if req.user_id not in st.queue and self.debouncer.blocks(req, is_cold(req)):
                self.accounting.add("debounced")
                io.done(m)
                continue
            loser = st.queue.push(req, origin)
            if loser is not None:
                self.accounting.add("superseded")
                io.done(loser.msg)
        self.max_queued = max(self.max_queued, len(st.queue))
        ANCHOR_QUEUED.set(len(st.queue))

    def _backpressure(self, io: StagePort, st: _LoopState) -> None:
        """Pause the partitions when the queue is full, resume them when it has drained to half."""
        cap = self.settings.anchors.max_pending
        if not st.paused and len(st.queue) >= cap:
            io.pause()
            st.paused = True
            self.pauses += 1
            ANCHOR_PAUSED.set(1)
            log.info("anchors: %d requests pending, partitions paused", len(st.queue))
        elif st.paused and len(st.queue) <= cap // 2:
            io.resume()
            st.paused = False
            ANCHOR_PAUSED.set(0)
            log.info("anchors: %d requests pending, partitions resumed", len(st.queue))
        ANCHOR_QUEUED.set(len(st.queue))

    def _dispatch(self, io: StagePort, st: _LoopState, batch: list[QueuedRequest[Origin]]) -> int:
        """Generate, store, publish and commit one micro-batch; on failure put it back and back off."""
        t0 = time.monotonic()
        by_user = {e.req.user_id: e for e in batch}
        try:
            sets, skipped = self._generate([e.req for e in batch])
        except Exception:
            log.exception("anchors: generating %d users failed; re-queued, retry in %.1fs", len(batch),
                          st.backoff_s)
            ANCHOR_BACKEND_ERRORS.labels(model=self.generator.model).inc()
            return self._requeue(st, batch)
        for user_id, why in skipped.items():
            io.dead_letter(by_user[user_id].origin.msg, ValueError(why[1]), reason=why[0])
        p = io.producer
        for aset in sets:
            p.produce(ANCHORS.name, io.wire.encode(ANCHORS.name, aset), key=aset.user_id.encode())
            p.poll(0)
        left = p.flush(30)
        if left:
            log.error("anchors: %d messages not delivered; batch re-queued", left)
            return self._requeue(st, batch)
        st.backoff_s = BACKOFF_START_S
        now_s = time.time()
        self.accounting.add("emitted", len(sets))
        for aset in sets:
            req = by_user[aset.user_id].req
            self.debouncer.generated(aset.user_id, req.ts)
            ANCHOR_REQUEST_DELAY.observe(max(0.0, now_s - req.ts / 1000))
        for e in batch:
            io.done(e.origin.msg)
        io.commit()
        rate = self.capacity.observe(len(batch), time.monotonic() - t0)
        self.bucket.set_rate(rate_limit(rate, self.settings.anchors.rate_limit))
        if rate is not None:
            ANCHOR_RATE.set(rate)
        return len(batch)

    def _requeue(self, st: _LoopState, batch: list[QueuedRequest[Origin]]) -> int:
        st.queue.restore(batch)
        st.retry_at = time.monotonic() + st.backoff_s
        st.backoff_s = min(BACKOFF_MAX_S, st.backoff_s * 2)
        ANCHOR_QUEUED.set(len(st.queue))
        return 0


    def generate_for(self, requests: list[AnchorRequest]) -> list[AnchorSet]:
        """Anchor sets for the requests, stored in the vector index, no broker involved (:class:`AnchorMaker`)."""
        return self.maker.generate_for(requests)

    def _generate(self, requests: list[AnchorRequest]) -> tuple[list[AnchorSet], dict[str, tuple[str, str]]]:
        """(anchor sets, {user_id: (reason, detail)} of the requests that got none)."""
        return self.maker.generate(requests)

    def history_items(self, requests: list[AnchorRequest], *, need_text: bool = True
                      ) -> dict[str, tuple[list[int], list[str], np.ndarray]]:
        """Per user: the recent history ids found in the item collection, their texts and their vectors."""
        return self.maker.history_items(requests, need_text=need_text)
