"""Anchors: ``anchor-requests`` → interest anchors → frozen space → Qdrant ``anchors`` → ``anchors``, the Kafka loop.

Reads top to bottom: read requests ahead into a bounded pending queue (dead-lettering what does not
parse), pick the most urgent micro-batch (up to ``anchors.batch_size``), answer what the replay cache
knows, generate the rest, embed the anchor texts with the same frozen encoder as the items, upsert them
into Qdrant, publish one ``AnchorSet`` per user, flush, and only then commit the offsets the finished
work covers. Which request is served when — newest per user, priority, debounce, rate limit,
backpressure, retries after an outage — is the pure engine's (workers/anchors/engine.py, where each rule
says why); making the sets — history lookup, generation (replay cache first), embedding, vector-index
slots and versions — is :class:`~workers.anchors.sets.AnchorMaker`'s (held by workers/anchors/stage.py).
This module performs their decisions on the broker.

Offsets: read-ahead and priorities finish requests out of order, so each partition commits up to (not
including) its oldest request still pending or in flight (the ledger every stage's I/O shares,
:class:`~runtime.stage_port.StageRules`).

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
from typing import Any

from tqdm import tqdm

from runtime.stage_io import StageIO
from runtime.stage_port import StagePort
from schemas.events import AnchorRequest
from schemas.topics import ANCHOR_REQUESTS, ANCHORS
from workers.anchors.metrics import ANCHOR_BACKEND_ERRORS, ANCHOR_PAUSED, ANCHOR_QUEUED
from workers.anchors.policy import QueuedRequest
from workers.anchors.stage import STAGE, AnchorStage, Origin

log = logging.getLogger("workers.anchors")  # the stage's logger: the package's name, as before it was one
__all__ = ["STAGE", "AnchorWorker", "Origin"]


class AnchorWorker(AnchorStage):
    """Serve ``anchor-requests``: the engine decides which user is served when, the maker makes the sets
    (:class:`~workers.anchors.stage.AnchorStage`), this class performs the rest on the broker."""

    def run(self, stop: threading.Event, *, io: StagePort | None = None) -> None:
        """Serve requests until ``stop``; ``io`` replaces the Kafka I/O (the in-memory twin of the unit tests)."""
        if io is None:
            io = StageIO(self.settings.kafka, STAGE, self.accounting, registry=self.settings.schema_registry)
        eng = self.engine
        eng.start()

        def on_revoke(consumer_: Any, parts: list[Any]) -> None:
            tps = {(tp.topic, tp.partition) for tp in parts}
            io.commit(offsets=io.ledger.committable(tps))  # what is finished stays finished
            eng.revoked(lambda o: o.tp in tps)  # the ledger forgets them after this

        io.subscribe([ANCHOR_REQUESTS.name], on_assign=lambda c, parts: eng.assigned(), on_revoke=on_revoke)
        bar = tqdm(desc="anchor users", unit="user", disable=not self.progress, leave=False)
        try:
            while not stop.is_set():
                msgs = io.poll(*eng.poll_budget())
                if eng.repause():
                    io.pause()
                for m in msgs:
                    self.accounting.add("in")
                    req = io.decode(m, AnchorRequest)
                    origin = Origin(m, (m.topic() or ANCHOR_REQUESTS.name, m.partition() or 0), m.offset() or 0)
                    finished = eng.admit(req, origin) if req is not None else None
                    if finished is not None:  # debounced or superseded: done, nothing to emit
                        io.done(finished.msg)
                eng.polled()
                self._backpressure(io)
                if len(eng.queue) == 0 and msgs:  # only DLQ'd or debounced: make that durable, commit
                    io.commit(stop, what="dead letters")
                    continue
                batch = eng.take()
                if batch:
                    bar.update(self._dispatch(io, batch))
                    self._backpressure(io)
        finally:
            bar.close()
            ANCHOR_QUEUED.set(0)
            ANCHOR_PAUSED.set(0)
            io.close()

    def _backpressure(self, io: StagePort) -> None:
        act = self.engine.backpressure()
        if act == "pause":
            io.pause()
        elif act == "resume":
            io.resume()

    def _dispatch(self, io: StagePort, batch: list[QueuedRequest[Origin]]) -> int:
        """Generate, store, publish and commit one micro-batch; on failure put it back (the engine backs off)."""
        t0 = time.monotonic()
        try:
            sets, skipped = self._generate([e.req for e in batch])
        except Exception:
            log.exception("anchors: generating %d users failed; re-queued, retry in %.1fs", len(batch),
                          self.engine.backoff_s)
            ANCHOR_BACKEND_ERRORS.labels(model=self.generator.model).inc()
            self.engine.failed(batch)
            return 0
        by_user = {e.req.user_id: e for e in batch}
        for user_id, why in skipped.items():
            io.dead_letter(by_user[user_id].origin.msg, ValueError(why[1]), reason=why[0])
        for aset in sets:
            io.producer.produce(ANCHORS.name, io.wire.encode(ANCHORS.name, aset), key=aset.user_id.encode())
            io.producer.poll(0)
        left = io.producer.flush(30)
        if left:
            log.error("anchors: %d messages not delivered; batch re-queued", left)
            self.engine.failed(batch)
            return 0
        for e in batch:
            io.done(e.origin.msg)
        io.commit()
        self.engine.served(batch, sets, time.monotonic() - t0)
        return len(batch)
