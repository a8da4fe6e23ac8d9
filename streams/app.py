"""The streams processor (faust-streaming), top to bottom.

    recall ───┐                       ┌──► samples          (real labels of exposed items)
              ├─ join per request ────┼──► unexposed        (recall − exposure)
    exposure ─┘  (table `pending`)    └──► interest (table) ──► anchor-requests (cold start, drift, …)

Both inputs are keyed by ``user_id`` with the same partition count, so one agent reads them together
and a user's requests, interest state and anchors live in one partition: no repartition hop.
The join's rules below are :class:`~streams.join_engine.JoinEngine`'s, a pure state machine over the
``pending`` table (unit-tested without a broker); this module binds it to faust: decode, feed the
engine, send what it yields, and the timer, changelogs and interest around it (the faust app, its topics
and tables are wired in streams/topology.py).
Either side of a request may come first; the first one waits in the ``pending`` table (changelogged)
until its partner arrives or its partition's *event time* passes it (streams/clock.py): the watermark is
the newest event time seen on the partition − ``allowed_lateness_s``, and a request expires when the
watermark passes its event time + ``join_wait_s``. Downtime and consumer lag therefore expire nothing: the
clock moves only with the events. Expiry by event time happens in the agent, right after the event that
moved the watermark. A wall-clock bound (``join_memory_guard_s``) only guards memory on a partition whose
events stopped; it is counted apart (``expired_memory_guard``). The guard is decided by a timer and carried
out by the agent: the timer sends the due request to the internal ``<app id>-expiry`` topic
(schemas/topics.py) at the request's partition, because tables can only be written inside stream iteration
(faust raises otherwise and the agent dies), and an expiry may write both tables: an exposure whose recall
never came still yields its real labels and updates the user's interest.

Both tables send their changelog as each key's latest value, at most ``changelog_coalesce_ms`` late and always
before the input offsets that wrote them are committed (streams/changelog.py): a request joined within that
window costs one small changelog record instead of its whole recall and then a marker.

After a request is joined or expired a small marker replaces it in the same table (so it survives a
restart) until event time passes ``dedup_window_s``: it tells a duplicate (another offset: DLQ
``duplicate``), a late partner, and a re-read after a restart (the same offset: already done, skipped).

Candidates the vector index does not know yet follow ``streams.unknown_items``: dropped from the request
and counted (default), held in the table until the indexer has them (bounded in count and time), or the
whole recall goes to the DLQ.

Every input message ends in exactly one outcome of :attr:`StreamsProcessor.accounting`:
``joined`` (both sides), ``expired``, ``expired_memory_guard``, ``exposure_only``,
``exposure_only_memory_guard``, ``late_exposure``, ``late_recall``, ``reread`` or ``dlq:<reason>`` — any
exception while processing a message sends it to its DLQ as ``processing_error`` and the agent keeps going;
until then it is counted in :attr:`StreamsProcessor.waiting`.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from runtime.kafka import Accounting
from runtime.lag import LagGauge
from runtime.serde import Wire
from runtime.settings import Settings
from runtime.vectors.index import VectorIndex
from schemas.codec import DecodeError, dead_letter, decode, redrive_count
from schemas.events import ExposureEvent
from schemas.fast_codec import decode_recall, encode_real_samples, encode_unexposed
from schemas.topics import ANCHOR_REQUESTS, EXPOSURE, RECALL, SAMPLES, UNEXPOSED
from streams.catalog import Catalog
from streams.clock import EventClock
from streams.interest import Interest, add_positives, decide, request_anchors, trim
from streams.join_engine import RESEND_MS, JoinEngine, Output, RealLabels, Unexposed, now_ms
from streams.lifecycle import serve
from streams.metrics import JOIN_PENDING
from streams.topology import build_topology
from streams.transport import fetch_answers, fetch_wait_ms

log = logging.getLogger(__name__)
STAGE = "streams"
_DEADLINE = struct.Struct("<q")  # value of an expiry message: the wall-clock deadline it was sent for
_ADVANCE = b"advance"  # value of a message that wakes the agent of an idle partition (streams/clock.py)


class StreamsProcessor:
    def __init__(self, settings: Settings, index: VectorIndex) -> None:
        self.settings = settings
        cfg = settings.streams
        self.index = index
        self.accounting = Accounting(STAGE)
        self.agent_error: BaseException | None = None  # set by a crashing agent; run() raises it
        self.wire = Wire(settings.schema_registry)  # plain JSON and Confluent-framed input alike
        self.lag = LagGauge(STAGE, settings.kafka.lag_interval_s)
        self.catalog = Catalog(index, settings.encoder.collection)
        self.ready = threading.Event()
        # an input is stalled (its idle time stops) once its fetches go unanswered for a few fetch waits
        self.clock = EventClock(int(cfg.allowed_lateness_s * 1000), int(cfg.idle_advance_s * 1000),
                                (RECALL.name, EXPOSURE.name), stall_ms=3 * fetch_wait_ms(settings.kafka) + 2_000)
        self._woken: dict[int, int] = {}  # idle partition -> when the timer last woke its agent (ms)
        t = build_topology(settings, self)  # the faust app, its topics and tables (streams/topology.py)
        self.app, self.expiry_topic_name, self.expiry_topic = t.app, t.expiry_topic_name, t.expiry_topic
        self.out_samples, self.out_unexposed = t.out_samples, t.out_unexposed
        self.out_anchor_requests, self.dlq, self.dlq_max_bytes = t.out_anchor_requests, t.dlq, t.dlq_max_bytes
        self.pending, self.interest = t.pending, t.interest
        # the join's state machine over the changelogged table (streams/join_engine.py)
        self.engine = JoinEngine(self.pending, cfg, self.accounting, self.catalog, self.clock)
        self.splits = self.engine.splits  # requests whose halves came on different partitions

    @property
    def waiting(self) -> int:
        """Inputs waiting for their partner or their items (not yet an outcome)."""
        return self.engine.waiting

    @property
    def held(self) -> dict[bytes, int]:
        """Recalls held for unknown items: request id -> when the index was last asked (ms)."""
        return self.engine.held

    async def process(self, m: Any) -> None:
        """One message, whatever happens: an exception ends in the DLQ, never in a dead agent."""
        try:
            if m.topic == self.expiry_topic_name:
                await self.on_expiry(m.key, m.value)
            elif m.topic == RECALL.name:
                await self.on_recall(m)
            else:
                await self.on_exposure(m)
        except DecodeError as e:
            await self.dead_letter(m, e, e.reason)
        except Exception as e:  # a bug or a broken record must not stop the stream: DLQ, counted
            log.exception("streams: %s[%d]@%d failed", m.topic, m.partition, m.offset)
            await self.dead_letter(m, e, "processing_error")
        try:
            await self.advance(m.partition)
        except Exception:  # the swept record stays in the table; the wall-clock guard retries it
            log.exception("streams: event-time expiry on partition %d failed", m.partition)
            self.accounting.add("expiry_error")
        if self.pending.flush_due() or self.interest.flush_due():
            self.flush_changelogs()

    # ------------------------------------------------------------------ inputs → the join (streams/join_engine.py)
    async def on_recall(self, m: Any) -> None:
        recall = decode_recall(self.wire.payload(m.topic, m.value), self.settings.streams.max_candidates)
        await self.perform(self.engine.on_recall(recall, m.partition, m.offset))

    async def on_exposure(self, m: Any) -> None:
        value = self.wire.payload(m.topic, m.value)
        exposure = decode(value, ExposureEvent)
        assert value is not None  # decode refused None
        await self.perform(self.engine.on_exposure(exposure, value, m.partition, m.offset))

    async def advance(self, partition: int) -> None:
        """Expire the waiting requests and forget the markers whose due time the partition's watermark passed
        (called by the agent after each input, so tables may be written)."""
        await self.perform(self.engine.advance(partition))

    async def perform(self, outputs: Iterator[Output]) -> None:
        """Send what the join produced, one output at a time: the engine goes on only after each send."""
        for out in outputs:
            if isinstance(out, RealLabels):
                await self.emit_real(out.exposure)
            else:
                await self.emit_unexposed(out)

    # ------------------------------------------------------------------ join → samples, unexposed
    async def emit_unexposed(self, out: Unexposed) -> None:
        exposure = out.exposure
        body = encode_unexposed(exposure.request_id, exposure.user_id, exposure.ts, out.item_ids,
                                out.scores if self.settings.streams.unexposed_scores else None,
                                version=self.settings.streams.unexposed_schema_version)
        value = self.wire.encode_json(UNEXPOSED.name, body)
        await self.out_unexposed.send(key=exposure.user_id.encode(), value=value)
        self.accounting.add("unexposed_batches")
        self.accounting.add("unexposed_candidates", len(out.item_ids))

    async def emit_real(self, exposure: ExposureEvent) -> None:
        if exposure.items:
            value = self.wire.encode_json(SAMPLES.name, encode_real_samples(exposure))
            await self.out_samples.send(key=exposure.user_id.encode(), value=value)
            self.accounting.add("real_samples", len(exposure.items))
        clicked = [it.item_id for it in exposure.items if it.clicked]
        if clicked:
            await self.update_interest(exposure.user_id, np.asarray(clicked, np.int64), exposure.ts)

    # ------------------------------------------------------------------ interest → anchor-requests
    async def update_interest(self, user_id: str, clicked: np.ndarray, ts: int) -> None:
        cfg = self.settings.streams
        col = self.settings.encoder.collection
        key = user_id.encode()
        found = self.index.retrieve(col, clicked)
        if not len(found):
            return
        raw = self.interest.get(key)
        state = Interest.unpack(raw) if raw else Interest.empty(found.vectors.shape[1])
        state = add_positives(state, found.ids, found.vectors)
        if len(state.recent) > cfg.recent_positives:
            kept = self.index.retrieve(col, state.recent[-cfg.recent_positives:])
            state = trim(state, cfg.recent_positives, {int(i): v for i, v in zip(kept.ids, kept.vectors, strict=True)})
        reason = decide(state, ts, cfg)
        if reason is not None:
            state, req = request_anchors(state, user_id, reason, ts, cfg)
            await self.out_anchor_requests.send(key=key, value=self.wire.encode(ANCHOR_REQUESTS.name, req))
            self.accounting.add(f"anchor_requests:{reason}")
        self.interest[key] = state.pack()

    # ------------------------------------------------------------------ wall clock: guard, hold (timer → agent)
    async def expire_due(self) -> None:
        """Timer: hand the agent what the wall clock made due: waiting requests past the memory guard,
        markers past their bound, held recalls whose items arrived or whose hold ended.

        Writes no table: faust refuses table writes outside stream iteration. The agent re-checks the record
        when the expiry message arrives (:meth:`on_expiry`), so a partner that came meanwhile, or a duplicate
        expiry message (after a restart the heap is rebuilt and may schedule it again), changes nothing.
        """
        now = now_ms()
        for key, deadline, partition in self.engine.due(now):
            await self.expiry_topic.send(key=key, value=_DEADLINE.pack(deadline), partition=partition)
        for (topic, partition), answered in fetch_answers(self.app).items():
            if topic in self.clock.sources:
                self.clock.answered(topic, partition, answered, now)
        for partition in self.clock.due_partitions(now):
            if now - self._woken.get(partition, 0) >= RESEND_MS:
                self._woken[partition] = now
                await self.expiry_topic.send(key=b"", value=_ADVANCE, partition=partition)
        JOIN_PENDING.set(self.waiting)

    async def on_expiry(self, key: bytes, value: bytes) -> None:
        """Agent: act on what the timer found due (inside stream iteration, at the request's partition)."""
        if value == _ADVANCE:
            return  # an idle partition's event time moved: process() expires what it passed
        (deadline,) = _DEADLINE.unpack(value)
        await self.perform(self.engine.on_deadline(key, deadline))

    async def on_recover(self) -> None:
        """After a restart the table comes back from its changelog: the engine rebuilds its schedules and the
        watermarks from it (nothing expires for the downtime)."""
        log.info("streams: recovered %d join records", self.engine.recover())

    async def dead_letter(self, m: Any, e: Exception, reason: str) -> None:
        dl = dead_letter(topic=m.topic, partition=m.partition, offset=m.offset, key=m.key, value=m.value,
                         error=f"{type(e).__name__}: {e}" if reason == "processing_error" else str(e),
                         reason=reason, stage=STAGE, max_bytes=self.dlq_max_bytes,
                         redrives=redrive_count(getattr(m, "headers", None)))
        reason = dl.reason  # redrive_exhausted for a redriven record that failed again
        topic = self.dlq.get(m.topic)
        if topic is None:  # the internal expiry topic has no DLQ: its messages are re-derived from the table
            self.accounting.add(f"internal_error:{reason}")
            log.warning("streams: internal %s[%d]@%d failed (%s): %s", m.topic, m.partition, m.offset, reason, e)
            return
        await topic.send(key=m.key, value=self.wire.encode(f"{m.topic}.dlq", dl))
        self.accounting.add(f"dlq:{reason}")
        log.warning("streams: %s[%d]@%d -> dlq (%s): %s", m.topic, m.partition, m.offset, reason, e)

    # ------------------------------------------------------------------ changelogs (streams/changelog.py)
    def flush_changelogs(self, partitions: set[int] | None = None) -> None:
        """Hand the tables' pending changelog records to the producer: when due, before every offset commit
        (streams/transport.py), before partitions are given up, and at stop."""
        for table in (self.pending, self.interest):
            table.flush_changelog(partitions)

    async def on_revoked(self, sender: Any, *args: Any, signal: Any = None, **_: Any) -> None:
        """The next owner recovers what this worker wrote: send it and wait, before the partitions go
        (faust's signal: ``receiver(app, revoked, signal=...)``)."""
        revoked: set[Any] = args[0] if args else set()
        self.flush_changelogs({tp.partition for tp in revoked})
        await self.app.producer.flush()

    # ------------------------------------------------------------------ lifecycle
    def run(self, stop: threading.Event) -> None:
        """Run the Faust app on its own event loop until ``stop`` is set (streams/lifecycle.py)."""
        serve(self, stop)
