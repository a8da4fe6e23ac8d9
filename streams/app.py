"""The streams processor (faust-streaming), top to bottom.

    recall ───┐                       ┌──► samples          (real labels of exposed items)
              ├─ join per request ────┼──► unexposed        (recall − exposure)
    exposure ─┘  (table `pending`)    └──► interest (table) ──► anchor-requests (cold start, drift, …)

Both inputs are keyed by ``user_id`` with the same partition count, so one agent reads them together
and a user's requests, interest state and anchors live in one partition: no repartition hop.
Either side of a request may come first; the first one waits in the ``pending`` table (changelogged)
until its partner arrives or ``join_wait_s`` passes. Expiry is decided by a timer but carried out by the
agent: the timer only sends the due request to the internal ``<app id>-expiry`` topic, at the request's
partition, and the agent expires it while iterating that topic. Tables can only be written inside stream
iteration (faust raises otherwise and the agent dies), and an expiry may write both tables: an exposure
whose recall never came still yields its real labels and updates the user's interest.
After a request is joined or expired a small marker stays for ``dedup_window_s`` to recognise
duplicates and late arrivals. Markers live in memory, not in the changelog: on the embedded broker every
changelog record costs a round trip (one record per batch, docs/design.md §5), and after a restart a duplicate
that slips past the lost markers is still harmless downstream, because sample ids are deterministic and
the trainer drops repeats.

Every input message ends in exactly one outcome of :attr:`StreamsProcessor.accounting`:
``joined`` (both sides), ``expired``,
``exposure_only``, ``late_exposure``, ``late_recall`` or ``dlq:<reason>``; until then it is counted in
:attr:`StreamsProcessor.waiting`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import struct
import threading
import time
from typing import Any, cast

import faust
import numpy as np
from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from gpl.runtime.faust_config import faust_settings
from gpl.runtime.health import HEALTH
from gpl.runtime.kafka import Accounting
from gpl.runtime.lag import LagGauge
from gpl.runtime.metrics import JOIN_PENDING
from gpl.runtime.serde import Wire
from gpl.runtime.settings import Settings
from gpl.runtime.vectors.index import VectorIndex
from schemas.codec import DecodeError, dead_letter, decode
from schemas.events import ExposureEvent
from schemas.topics import ANCHOR_REQUESTS, EXPOSURE, RECALL, SAMPLES, UNEXPOSED
from streams.copartition import SplitWatch, verify_copartitioned
from streams.interest import Interest, add_positives, decide, request_anchors, trim
from streams.join import (
    DONE,
    EXPIRED,
    Pending,
    decode_recall,
    encode_unexposed,
    marker,
    pending_exposure,
    pending_recall,
    real_samples,
    unexposed,
)
from streams.join import (
    EXPOSURE as PENDING_EXPOSURE,
)
from streams.join import (
    RECALL as PENDING_RECALL,
)
from streams.transport import SCHEME

log = logging.getLogger(__name__)
STAGE = "streams"
RAW: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
RAW_TABLE: dict[str, Any] = {"key_type": bytes, "value_type": bytes}  # faust picks "raw" for bytes
_DEADLINE = struct.Struct("<q")  # value of an expiry message: the deadline it was scheduled for


def now_ms() -> int:
    return int(time.time() * 1000)


class Catalog:
    """Known item ids (sorted int64), refreshed from the vector index only for ids not seen yet."""

    def __init__(self, index: VectorIndex, collection: str) -> None:
        self.index, self.collection = index, collection
        self._known = np.zeros(0, np.int64)

    def unknown(self, ids: np.ndarray) -> np.ndarray:
        missing = ids[~np.isin(ids, self._known, assume_unique=False)]
        if len(missing):
            found = self.index.retrieve(self.collection, np.unique(missing)).ids
            if len(found):
                self._known = np.union1d(self._known, found)
                missing = missing[~np.isin(missing, found)]
        return np.unique(missing)


class StreamsProcessor:
    def __init__(self, settings: Settings, index: VectorIndex) -> None:
        self.settings = settings
        self.index = index
        self.accounting = Accounting(STAGE)
        self.splits = SplitWatch(self.accounting)  # requests whose halves came on different partitions
        self.agent_error: BaseException | None = None  # set by a crashing agent; run() raises it
        self.catalog = Catalog(index, settings.encoder.collection)
        self.ready = threading.Event()
        self.waiting = 0  # inputs waiting for their partner (not yet an outcome)
        self._deadlines: list[tuple[int, bytes, int]] = []  # (deadline ms, request id, partition)
        self._markers: dict[bytes, Pending] = {}  # joined/expired requests, until their forget time
        self.wire = Wire(settings.schema_registry)  # plain JSON and Confluent-framed input alike
        self.lag = LagGauge(STAGE, settings.kafka.lag_interval_s)
        self.app = self._build()

    # ------------------------------------------------------------------ the app, top to bottom
    def _build(self) -> faust.App:
        s, cfg = self.settings, self.settings.streams
        # the stage's own settings, then the deployment's: security, client properties (gpl/runtime/faust_config.py)
        app = faust.App(cfg.app_id, **faust_settings(s.kafka, dict(
            broker=[f"{SCHEME}://{b}" for b in s.kafka.bootstrap_servers.split(",")],
            store="memory://",
            datadir=str(s.data_dir / "streams"),  # faust's own state files, not in the working directory
            topic_partitions=s.kafka.partitions,
            # faust counts bytes: 1 byte means one record per batch (the Tansu remedy), else 1 MiB
            producer_max_batch_size=1 if s.kafka.producer_batch_messages == 1 else 1 << 20,
            broker_rebalance_timeout=5,
            broker_session_timeout=6,
            broker_heartbeat_interval=1,
            web_enabled=False,
            autodiscover=False,
            topic_allow_declare=True,
            stream_wait_empty=False,
        )))
        setattr(app, "gpl_fetch_wait_max_ms", s.kafka.fetch_wait_max_ms)  # noqa: B010 - read by streams/transport.py
        # topics: declared in schemas/topics.py, bound here as raw bytes (we decode, so bad input
        # reaches its DLQ with the original bytes instead of crashing the agent)
        # the expiry topic is internal (declared by faust with the app's partition count) and read by the
        # same agent as the inputs: co-partitioned with them, so an expiry runs where its request lives
        self.expiry_topic_name = f"{cfg.app_id}-expiry"
        events = app.topic(RECALL.name, EXPOSURE.name, self.expiry_topic_name, **RAW)
        self.expiry_topic = app.topic(self.expiry_topic_name, partitions=s.kafka.partitions, internal=True, **RAW)
        self.out_samples = app.topic(SAMPLES.name, **RAW)
        self.out_unexposed = app.topic(UNEXPOSED.name, **RAW)
        self.out_anchor_requests = app.topic(ANCHOR_REQUESTS.name, **RAW)
        self.dlq = {t: app.topic(f"{t}.dlq", **RAW) for t in (RECALL.name, EXPOSURE.name)}
        # state: pending joins by request id; interest by user id (both changelogged)
        self.pending = cast(faust.Table, app.Table("pending", partitions=s.kafka.partitions, **RAW_TABLE,
                                                   on_recover=self._on_recover))
        self.interest = cast(faust.Table, app.Table("interest", partitions=s.kafka.partitions, **RAW_TABLE))

        @app.agent(events)
        async def recall_exposure(stream: faust.StreamT) -> None:
            async for event in stream.events():
                m = event.message
                try:
                    if m.topic == RECALL.name:
                        await self.on_recall(m)
                    elif m.topic == self.expiry_topic_name:
                        await self.on_expiry(m.key, m.value)
                    else:
                        await self.on_exposure(m)
                except DecodeError as e:
                    await self.dead_letter(m, e)
                except Exception as e:  # faust would log it and restart the agent: end the stage instead
                    self.agent_error = e
                    raise

        @app.timer(interval=0.5)
        async def expire() -> None:
            await self.expire_due()

        @app.task
        async def started() -> None:
            self.ready.set()

        return app

    # ------------------------------------------------------------------ recall
    async def on_recall(self, m: Any) -> None:
        cfg = self.settings.streams
        recall = decode_recall(self.wire.payload(m.topic, m.value), cfg.max_candidates)
        self.accounting.add("recall_in")
        unknown = self.catalog.unknown(recall.item_ids)
        if len(unknown):
            raise DecodeError("unknown_items", f"recall {recall.request_id}: {len(unknown)} unknown item ids, "
                                               f"e.g. {unknown[:5].tolist()}")
        _, first = np.unique(recall.item_ids, return_index=True)
        if len(first) < len(recall.item_ids):  # repeated candidates: keep the first, count the rest
            self.accounting.add("duplicate_candidates", len(recall.item_ids) - len(first))
            keep = np.sort(first)
            recall = type(recall)(recall.request_id, recall.user_id, recall.ts,
                                  recall.item_ids[keep], recall.scores[keep])
        key = recall.request_id.encode()
        prev = self._get(key)
        if prev is None:
            self._put(key, pending_recall(recall, now_ms() + int(cfg.join_wait_s * 1000), m.partition))
            self.waiting += 1
        elif prev.kind == PENDING_EXPOSURE:
            assert prev.exposure is not None
            await self.join(recall.request_id, recall.item_ids, recall.scores, decode(prev.exposure, ExposureEvent),
                            m.partition)
        elif prev.kind == EXPIRED:
            self.accounting.add("late_recall")
        else:
            raise DecodeError("duplicate", f"recall {recall.request_id} seen before")

    # ------------------------------------------------------------------ exposure
    async def on_exposure(self, m: Any) -> None:
        cfg = self.settings.streams
        value = self.wire.payload(m.topic, m.value)
        exposure = decode(value, ExposureEvent)
        assert value is not None  # decode refused None
        self.accounting.add("exposure_in")
        key = exposure.request_id.encode()
        prev = self._get(key)
        if prev is None:
            deadline = now_ms() + int(cfg.join_wait_s * 1000)
            self._put(key, pending_exposure(exposure, value, deadline, m.partition))
            self.waiting += 1
        elif prev.kind == PENDING_RECALL:
            assert prev.item_ids is not None and prev.scores is not None
            await self.join(exposure.request_id, prev.item_ids, prev.scores, exposure, m.partition)
        elif prev.kind == EXPIRED:
            # the recall expired before this exposure came: its clicks are still real labels
            self.accounting.add("late_exposure")
            await self.emit_real(exposure)
        else:
            raise DecodeError("duplicate", f"exposure {exposure.request_id} seen before")

    # ------------------------------------------------------------------ join → samples, unexposed
    async def join(self, request_id: str, recall_ids: np.ndarray, recall_scores: np.ndarray,
                   exposure: ExposureEvent, partition: int) -> None:
        cfg = self.settings.streams
        key = request_id.encode()
        self.splits.joined(self.pending.get(key), partition)
        if key in self.pending:
            del self.pending[key]
        self._mark(key, marker(DONE, exposure.user_id, exposure.ts, now_ms() + int(cfg.dedup_window_s * 1000),
                               partition))
        self.accounting.add("joined", 2)
        self.waiting -= 1
        batch = unexposed(recall_ids, recall_scores, exposure, request_id, exposure.user_id, exposure.ts)
        await self.emit_real(exposure)
        if batch is not None:
            value = self.wire.encode_json(UNEXPOSED.name, encode_unexposed(batch))
            await self.out_unexposed.send(key=exposure.user_id.encode(), value=value)
            self.accounting.add("unexposed_batches")
            self.accounting.add("unexposed_candidates", len(batch.item_ids))

    async def emit_real(self, exposure: ExposureEvent) -> None:
        samples = real_samples(exposure)
        if samples.samples:
            await self.out_samples.send(key=exposure.user_id.encode(), value=self.wire.encode(SAMPLES.name, samples))
            self.accounting.add("real_samples", len(samples.samples))
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

    # ------------------------------------------------------------------ expiry (timer → agent)
    async def expire_due(self) -> None:
        """Timer: forget due markers (memory only) and hand due pending requests to the agent.

        Writes no table: faust refuses table writes outside stream iteration. The agent re-checks the record
        when the expiry message arrives (:meth:`on_expiry`), so a partner that came meanwhile, or a duplicate
        expiry message (after a restart the heap is rebuilt and may schedule it again), changes nothing.
        """
        now = now_ms()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, key, partition = heapq.heappop(self._deadlines)
            mark = self._markers.get(key)
            if mark is not None and mark.deadline_ms == deadline:
                del self._markers[key]
                continue
            raw = self.pending.get(key)
            if raw is None or self._due(Pending.unpack(raw), deadline) is None:
                continue
            await self.expiry_topic.send(key=key, value=_DEADLINE.pack(deadline), partition=partition)
        JOIN_PENDING.set(self.waiting)

    @staticmethod
    def _due(rec: Pending, deadline: int) -> Pending | None:
        """The record if it is still the one waiting for ``deadline``; None if superseded or already done."""
        if rec.deadline_ms != deadline or rec.kind not in (PENDING_RECALL, PENDING_EXPOSURE):
            return None
        return rec

    async def on_expiry(self, key: bytes, value: bytes) -> None:
        """Agent: expire a request the timer found due (inside stream iteration, at the request's partition)."""
        (deadline,) = _DEADLINE.unpack(value)
        raw = self.pending.get(key)
        rec = self._due(Pending.unpack(raw), deadline) if raw else None
        if rec is None or key in self._markers:
            return  # joined or expired since the timer looked
        cfg = self.settings.streams
        del self.pending[key]
        self._mark(key, marker(EXPIRED, rec.user_id, rec.ts, now_ms() + int(cfg.dedup_window_s * 1000),
                               rec.partition))
        self.waiting -= 1
        if rec.kind == PENDING_RECALL:
            self.accounting.add("expired")
        else:  # an exposure whose recall never came: real labels all the same
            self.accounting.add("exposure_only")
            assert rec.exposure is not None
            await self.emit_real(decode(rec.exposure, ExposureEvent))

    async def _on_recover(self) -> None:
        """After a restart the table comes back from its changelog: rebuild the deadline heap."""
        self._deadlines = []
        for key, raw in self.pending.items():
            rec = Pending.unpack(raw)
            self._deadlines.append((rec.deadline_ms, key, rec.partition))
            self.waiting += rec.kind in (PENDING_RECALL, PENDING_EXPOSURE)
        heapq.heapify(self._deadlines)
        log.info("streams: recovered %d pending records", len(self._deadlines))

    # ------------------------------------------------------------------ helpers
    def _get(self, key: bytes) -> Pending | None:
        mark = self._markers.get(key)
        if mark is not None:
            return mark
        raw = self.pending.get(key)
        return Pending.unpack(raw) if raw else None

    def _mark(self, key: bytes, rec: Pending) -> None:
        self._markers[key] = rec
        heapq.heappush(self._deadlines, (rec.deadline_ms, key, rec.partition))

    def _put(self, key: bytes, rec: Pending) -> None:
        self.pending[key] = rec.pack()
        heapq.heappush(self._deadlines, (rec.deadline_ms, key, rec.partition))

    async def dead_letter(self, m: Any, e: DecodeError) -> None:
        dl = dead_letter(topic=m.topic, partition=m.partition, offset=m.offset, key=m.key, value=m.value,
                         error=str(e), reason=e.reason, stage=STAGE)
        await self.dlq[m.topic].send(key=m.key, value=self.wire.encode(f"{m.topic}.dlq", dl))
        self.accounting.add(f"dlq:{e.reason}")
        log.warning("streams: %s[%d]@%d -> dlq (%s): %s", m.topic, m.partition, m.offset, e.reason, e)

    # ------------------------------------------------------------------ lifecycle
    def create_internal_topics(self, timeout: float = 30.0) -> None:
        """Create the expiry topic with the app's partition count before faust subscribes to it.

        faust declares only internal topics it subscribes to alone; a topic the broker auto-creates gets the
        broker's default count, and faust then refuses it as the source of the tables' changelogs
        (PartitionsMismatch, docs/design.md §5). An existing topic is left alone.
        """
        kafka = self.settings.kafka
        admin = AdminClient(kafka.client_config())
        if self.expiry_topic_name in admin.list_topics(timeout=timeout).topics:
            return
        topic = NewTopic(self.expiry_topic_name, num_partitions=kafka.partitions,
                         replication_factor=kafka.replication_factor)
        try:
            admin.create_topics([topic], operation_timeout=timeout)[self.expiry_topic_name].result(timeout)
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # consumers must see its partitions when they join
            md = admin.list_topics(timeout=timeout).topics.get(self.expiry_topic_name)
            if md is not None and md.partitions:
                return
            time.sleep(0.1)

    def run(self, stop: threading.Event) -> None:
        """Run the Faust app on its own event loop until ``stop`` is set (thread or main thread)."""
        verify_copartitioned(self.settings.kafka, [RECALL.name, EXPOSURE.name])  # refuse to start otherwise
        self.create_internal_topics()
        # faust makes its datadir with mkdir(exist_ok=True) only: the parents must exist
        (self.settings.data_dir / "streams").mkdir(parents=True, exist_ok=True)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        # faust's group offsets, read by a plain client that never joins the group (it only asks)
        lag_reader = Consumer(self.settings.kafka.client_config() | {"group.id": self.settings.streams.app_id,
                                                                     "enable.auto.commit": False})

        async def main() -> None:
            await self.app.start()
            try:
                while not stop.is_set() and not self.app.should_stop:
                    if self.agent_error is not None:  # honest liveness (gpl/runtime/health.py)
                        raise RuntimeError(f"streams agent crashed: {self.agent_error!r}") from self.agent_error
                    HEALTH.beat(STAGE)
                    consumer = self.app._consumer  # noqa: SLF001 - None until faust has started it
                    HEALTH.assigned(STAGE, len(consumer.assignment()) if consumer is not None else 0)
                    if self.lag.due():
                        owned = [(tp.topic, tp.partition) for tp in self.app.consumer.assignment()
                                 if tp.topic in (RECALL.name, EXPOSURE.name)]
                        await loop.run_in_executor(None, self.lag.update, lag_reader, owned)
                    await asyncio.sleep(0.1)
            finally:
                # table changelog writes are buffered: make them durable before leaving the group,
                # or a restart would recover a table missing its last records
                try:
                    await asyncio.wait_for(self.app.producer.flush(), timeout=20)
                finally:
                    await asyncio.wait_for(self.app.stop(), timeout=20)

        try:
            loop.run_until_complete(main())
        except TimeoutError:
            log.warning("streams: faust did not stop within 20 s")
        finally:
            lag_reader.close()
            loop.close()
