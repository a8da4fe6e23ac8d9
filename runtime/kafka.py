"""confluent-kafka plumbing shared by every worker: clients, topic creation, dead letters, accounting.

Workers own their loops (they read top to bottom in their own files); this module only gives them
well-configured clients and the two things every loop needs: sending bad input to its DLQ with the
original bytes and origin offset, and counting where every message went.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from runtime.metrics import MESSAGES
from runtime.serde import Wire
from runtime.settings import KafkaSettings
from schemas.codec import DecodeError, dead_letter, encode, redrive_count
from schemas.topics import Naming, by_name, configure

log = logging.getLogger(__name__)
T = TypeVar("T")
# broker answers that only mean "not now": a partition without a leader for a moment (a paused, restarting or
# fenced broker), a coordinator moving, a request that timed out or a connection that dropped
TRANSIENT = frozenset({
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.REQUEST_TIMED_OUT,
    KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
})
# a record's headers as confluent-kafka takes them: [(name, value)] or {name: value}
Headers = dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]]


class Produces(Protocol):
    """What a stage and its dead letters ask of a producer: confluent's :class:`Producer`, or the
    in-memory twin's (runtime/stage_io_memory.py)."""

    def produce(self, topic: str, value: str | bytes | None = None, key: str | bytes | None = None,
                partition: int = -1, *, headers: Headers | None = None) -> None: ...

    def poll(self, timeout: float = -1) -> int: ...

    def flush(self, timeout: float = -1) -> int: ...


def producer(kafka: KafkaSettings, **extra: Any) -> Producer:
    """A producer: the project's defaults, then ``kafka.extra`` and ``kafka.producer_extra`` (the
    deployment's choices), then ``extra`` (what the call site needs to be correct).

    Idempotent, so a retry keeps a partition's order: without it librdkafka keeps many requests in flight,
    and a batch retried after a broker error (a leader gone for a moment, a paused broker) lands behind
    newer batches that got through. The join reads each partition's records in event time
    (streams/clock.py): recalls that landed behind later requests' records expired unjoined when the
    broker came back (the chaos suite's broker stop, issue 21). Idempotence also writes a retried batch
    once, not twice."""
    conf = kafka.client_config() | {
        "batch.num.messages": kafka.producer_batch_messages,
        "linger.ms": kafka.linger_ms,
        "enable.idempotence": True,
        "acks": "all",
        "message.max.bytes": kafka.max_message_bytes,
        "partitioner": "murmur2_random",  # the Java client's partitioner, so faust/aiokafka agree on keys
    }
    return Producer(conf | kafka.extra | kafka.producer_extra | extra)


def ask_broker(query: Callable[[], T], what: str, *, for_s: float = 60.0, every_s: float = 0.5) -> T:
    """``query()`` (a broker query: committed offsets, watermarks), asked again while the broker answers
    only "not now" (:data:`TRANSIENT`), for up to ``for_s``; any other error, or a transient one after
    ``for_s``, is raised. For what rebalance callbacks ask: an exception there leaves librdkafka's poll and
    ends the stage (the trainer died so when the chaos suite's broker stop left the partitions without a
    leader for a moment while its group rebalanced, issue 21)."""
    deadline = time.monotonic() + for_s
    while True:
        try:
            return query()
        except KafkaException as e:
            err = e.args[0] if e.args else None
            if not isinstance(err, KafkaError) or err.code() not in TRANSIENT or time.monotonic() >= deadline:
                raise
            log.warning("%s: %s; asking again", what, err.str())
            time.sleep(every_s)


def take(c: Consumer, n: int, timeout: float) -> list[Message]:
    """Up to ``n`` messages, waiting up to ``timeout`` for the first one only, then taking what is already
    fetched. librdkafka's ``consume(n, timeout)`` waits for ``n`` messages or the whole timeout: at low load
    that added the timeout to every hop's latency (measured with ``gpl bench e2e --rate``)."""
    first = c.poll(timeout)
    if first is None:
        return []
    return [first, *c.consume(num_messages=n - 1, timeout=0)] if n > 1 else [first]


class GapGuard:
    """Re-read records the embedded broker let a live consumer skip (``kafka.refetch_gaps``, set by the
    embedded profile alone: EmbeddedBroker.profile()).

    Why the embedded broker needs it is written beside ``EMBEDDED_PROFILE`` (runtime/broker.py). With
    one record per batch (that profile) offsets are dense, so a consumer that receives
    an offset past the one it expects seeks back to the expected one and drops the rest of that partition's
    messages from the batch (they come again). A gap that persists ``max_tries`` reads is accepted and
    logged: it is a real one (compaction, a transaction marker).
    """

    def __init__(self, c: Consumer, enabled: bool, max_tries: int = 20) -> None:
        self.consumer, self.enabled, self.max_tries = c, enabled, max_tries
        self.expected: dict[tuple[str, int], int] = {}  # next offset per partition (after what was delivered)
        self.tries: dict[tuple[str, int], int] = {}  # re-reads spent on the gap at expected[tp]
        self.refetched = 0  # gaps that a re-read filled
        self.accepted = 0  # gaps given up on

    def rewound(self, tp: tuple[str, int], offset: int) -> None:
        """The stage sought ``tp`` back to ``offset`` itself: that is the next offset to expect."""
        self.expected[tp] = offset
        self.tries.pop(tp, None)

    def forget(self, tps: Iterable[tuple[str, int]]) -> None:
        """Partitions revoked or sought elsewhere: their next message sets the expectation again."""
        for tp in tps:
            self.expected.pop(tp, None)
            self.tries.pop(tp, None)

    def filter(self, msgs: list[Message]) -> list[Message]:
        if not self.enabled:
            return msgs
        out: list[Message] = []
        rewound: set[tuple[str, int]] = set()
        for m in msgs:
            if m.error() is not None:
                out.append(m)
                continue
            tp, off = (m.topic() or "", m.partition() or 0), m.offset() or 0
            if tp in rewound:
                continue
            want = self.expected.get(tp)
            if want is not None and off < want:
                continue  # delivered before a re-read went back
            if want is not None and off > want:
                tries = self.tries.get(tp, 0)
                if tries < self.max_tries:
                    self.tries[tp] = tries + 1
                    try:
                        self.consumer.seek(TopicPartition(tp[0], tp[1], want))
                    except KafkaException as e:  # not fetching that partition now: take what came
                        log.warning("%s[%d]: re-read of offset %d failed: %s", tp[0], tp[1], want, e)
                    else:
                        rewound.add(tp)
                        continue
                log.warning("%s[%d]: offsets %d..%d never came after %d re-reads: a real gap, going on",
                            tp[0], tp[1], want, off - 1, tries)
                self.accepted += 1
            elif want is not None and self.tries.pop(tp, 0):
                self.refetched += 1
            self.expected[tp] = off + 1
            out.append(m)
        return out


def consumer(kafka: KafkaSettings, group: str, **extra: Any) -> Consumer:
    """A consumer of group ``<group_prefix>-<group>``; settings layered as in :func:`producer`."""
    conf = kafka.client_config() | {
        "group.id": f"{kafka.group_prefix}-{group}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 300_000,
        "fetch.message.max.bytes": kafka.max_message_bytes,
    }
    if kafka.fetch_wait_max_ms is not None:  # the embedded profile's short wait; else librdkafka's own
        conf["fetch.wait.max.ms"] = kafka.fetch_wait_max_ms
    return Consumer(conf | kafka.extra | kafka.consumer_extra | extra)


def reader_config(kafka: KafkaSettings, group_id: str) -> dict[str, Any]:
    """A consumer that only looks positions up (lag, committed offsets) under an exact group id, never
    committing: the same properties as every other consumer (``extra`` and ``consumer_extra``)."""
    return kafka.client_config() | kafka.consumer_extra | {"group.id": group_id, "enable.auto.commit": False}


def use_topic_names(kafka: KafkaSettings) -> Naming:
    """This process names its topics as ``kafka.topic_prefix`` and ``kafka.topic_names`` say
    (schemas/topics.py); returns the naming it replaced, for a caller that restores it."""
    return configure(Naming(kafka.topic_prefix, dict(kafka.topic_names)))


def create_topics(kafka: KafkaSettings, names: Iterable[str] | None = None, timeout: float = 30.0, *,
                  compacted: Iterable[str] = ()) -> list[str]:
    """Create the project's topics with their partition counts; existing ones are left alone.

    Explicit creation matters: auto-created topics get the broker's default count, and Faust refuses a
    changelog whose count differs from its source. ``compacted``: names outside the registry to create
    compacted (the streams tables' changelogs).
    """
    compacted = set(compacted)
    admin = AdminClient(kafka.client_config())
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted: list[NewTopic] = []
    for name in names if names is not None else _all_names():
        if name in existing:
            continue
        base = by_name(name)
        parts = kafka.partitions  # one count for all: co-partitioned by user, no repartition hop
        compact = name in compacted or bool(base and base.compacted and not name.endswith(".dlq"))
        config = {"cleanup.policy": "compact"} if compact else {}
        wanted.append(NewTopic(name, num_partitions=parts, replication_factor=kafka.replication_factor, config=config))
    if not wanted:
        return []
    futures = admin.create_topics(wanted, operation_timeout=timeout)
    created = []
    for name, fut in futures.items():
        try:
            fut.result(timeout)
            created.append(name)
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # wait until metadata shows them with a leader for every partition,
        md = admin.list_topics(timeout=timeout).topics  # so consumers see partitions and offsets answer
        if all(n in md and md[n].partitions and all(q.leader >= 0 and q.error is None
                                                    for q in md[n].partitions.values()) for n in created):
            break
        time.sleep(0.1)
    return created


def _all_names() -> list[str]:
    from schemas.topics import all_topic_names

    return all_topic_names()


class Accounting:
    """Where every message went, per stage and outcome; mirrored to Prometheus ``gpl_messages_total``.

    Outcomes used across stages: ``in``, ``labeled``, ``sampled_out``, ``deferred``, ``timed_out``,
    ``dlq:<reason>``, ``emitted``. Thread-safe: the embedded stack runs stages as threads.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._c: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._series: dict[str, Any] = {}  # outcome -> its Prometheus child (``labels()`` costs a lock and a lookup)

    def add(self, outcome: str, n: int = 1) -> None:
        if n == 0:
            return
        with self._lock:
            self._c[outcome] += n
            series = self._series.get(outcome)
            if series is None:
                series = self._series[outcome] = MESSAGES.labels(stage=self.stage, outcome=outcome)
        series.inc(n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)

    def __getitem__(self, outcome: str) -> int:
        with self._lock:
            return self._c[outcome]


class DeadLetters:
    """Send bad input to ``<topic>.dlq`` with its original bytes, the error and the origin offset."""

    def __init__(self, producer: Produces, stage: str, accounting: Accounting, wire: Wire | None = None,
                 max_bytes: int | None = None) -> None:
        self.producer = producer
        self.wire = wire
        self.stage = stage
        self.accounting = accounting
        # the producer's message limit: a larger original keeps a truncated payload + size + sha256, because a
        # dead letter the producer refuses raises in the stage's loop and the input would end nowhere
        self.max_bytes = max_bytes

    def send(self, msg: Message, err: DecodeError | Exception, reason: str | None = None) -> None:
        headers = getattr(msg, "headers", None)  # a redriven record's count (gpl dlq redrive) rides in them
        self.send_raw(msg.topic() or "?", msg.partition() or 0, msg.offset() or 0, msg.key(), msg.value(), err, reason,
                      redrives=redrive_count(headers() if callable(headers) else None))

    def send_raw(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        err: DecodeError | Exception,
        reason: str | None = None,
        redrives: int = 0,
    ) -> None:
        why = reason or (err.reason if isinstance(err, DecodeError) else type(err).__name__)
        dl = dead_letter(
            topic=topic, partition=partition, offset=offset, key=key, value=value,
            error=str(err), reason=why, stage=self.stage, max_bytes=self.max_bytes, redrives=redrives,
        )
        why = dl.reason  # redrive_exhausted for a redriven record that failed again
        dlq = f"{topic}.dlq"
        self.producer.produce(dlq, self.wire.encode(dlq, dl) if self.wire is not None else encode(dl), key=key)
        self.producer.poll(0)
        self.accounting.add(f"dlq:{why}")
        log.warning("%s: %s[%d]@%d -> dlq (%s): %s", self.stage, topic, partition, offset, why, err)


def flush_until_empty(p: Produces, stop: threading.Event, what: str = "messages") -> bool:
    """Flush until the producer queue is empty: the outputs a batch produced are durable before its
    offsets are committed. False if ``stop`` was set first (the offsets then stay where they were)."""
    while p.flush(5) > 0:
        log.warning("%s still queued; retrying the flush before committing offsets", what)
        if stop.is_set():
            return False
    return True


def commit_offsets(c: Consumer, offsets: dict[tuple[str, int], int]) -> None:
    """Commit next-offsets (last processed + 1), synchronously: called only after the work is durable."""
    if offsets:
        c.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False)
