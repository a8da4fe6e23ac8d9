"""One stage's Kafka I/O: consume → decode → dead-letter → flush → commit, through one offset ledger.

Every worker stage (indexer, anchors, labeler, trainer, calibration monitor) runs the same cycle around
its own domain step, and the cycle's rules are where data gets lost when each stage writes them
itself:

* every consumed message is counted ``in`` and recorded in the :class:`~gpl.runtime.offsets.OffsetLedger`
  as open until the stage says it is done with it (:meth:`StageIO.done`);
* a message that does not decode goes to its topic's DLQ with the original bytes, the error and the
  origin offset, and is done (:meth:`StageIO.decode`); so does one whose processing raised
  (:meth:`StageIO.processing`, reason ``processing_error``);
* offsets are committed only after everything the finished messages produced — outputs and dead
  letters — is flushed to the broker (:meth:`StageIO.commit`), and only up to the oldest message still
  open, so out-of-order finishing (read-ahead, deferral) never skips work on a restart;
* backpressure pauses partitions and, when a message cannot be taken now, rewinds its partition to it
  (:meth:`StageIO.pause`, :meth:`StageIO.rewind`, :meth:`StageIO.resume`): the backlog stays in Kafka,
  never in process memory;
* a rebalance forgets the partitions handed away (their open work is the next owner's);
* the consumer lag of the tracked topics is exported every ``kafka.lag_interval_s``
  (``gpl_consumer_lag_messages``, :mod:`gpl.runtime.lag`).

The stage keeps its loop — each reads top to bottom in its own file — and uses this object as a
context manager so both clients are closed however the loop ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from pydantic import BaseModel

from gpl.runtime.health import HEALTH
from gpl.runtime.kafka import (
    Accounting,
    DeadLetters,
    GapGuard,
    commit_offsets,
    consumer,
    flush_until_empty,
    producer,
    take,
)
from gpl.runtime.lag import LagGauge
from gpl.runtime.offsets import TP, OffsetLedger
from gpl.runtime.serde import Wire
from gpl.runtime.settings import KafkaSettings, SchemaRegistrySettings
from schemas.codec import DecodeError

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
Rebalance = Callable[[Consumer, list[TopicPartition]], None]


def tp_of(m: Message) -> TP:
    """(topic, partition) of a message."""
    return (m.topic() or "?", m.partition() or 0)


class StageIO:
    """A stage's consumer, producer, dead letters and offset ledger, with the commit rules above.

    ``tracked`` names the topics whose offsets the ledger commits (default: all subscribed topics);
    a topic read whole as state on every assignment (the labeler's ``anchors``) is left out.
    """

    def __init__(self, kafka: KafkaSettings, stage: str, accounting: Accounting, *,
                 consumer_config: dict[str, Any] | None = None,
                 registry: SchemaRegistrySettings | None = None) -> None:
        self.stage = stage
        self.wire = Wire(registry)  # both wire formats in; plain JSON out unless the registry settings say so
        self.accounting = accounting
        self.consumer = consumer(kafka, stage, **(consumer_config or {}))
        self.producer = producer(kafka)
        self.dlq = DeadLetters(self.producer, stage, accounting, self.wire, max_bytes=kafka.max_message_bytes)
        self.ledger = OffsetLedger()
        self.tracked: set[str] = set()
        self.paused: set[TP] = set()
        self.lag = LagGauge(stage, kafka.lag_interval_s)
        self.gaps = GapGuard(self.consumer, kafka.refetch_gaps)  # records the embedded broker let us skip
        self._closed = False

    # ------------------------------------------------------------------------------ subscription

    def subscribe(self, topics: Sequence[str], *, tracked: Iterable[str] | None = None,
                  on_assign: Rebalance | None = None, on_revoke: Rebalance | None = None) -> None:
        """Join the group; revoked partitions are forgotten by the ledger after ``on_revoke`` ran."""
        self.tracked = set(topics if tracked is None else tracked)

        def revoked(c: Consumer, parts: list[TopicPartition]) -> None:
            if on_revoke is not None:
                on_revoke(c, parts)
            lost = [(tp.topic, tp.partition) for tp in parts]
            self.ledger.forget(lost)
            self.paused.difference_update(lost)
            self.gaps.forget(lost)

        def assigned(c: Consumer, parts: list[TopicPartition]) -> None:
            if on_assign is not None:
                on_assign(c, parts)
            self.gaps.forget((tp.topic, tp.partition) for tp in parts)
            HEALTH.assigned(self.stage, len(parts))

        def revoked_health(c: Consumer, parts: list[TopicPartition]) -> None:
            revoked(c, parts)
            HEALTH.assigned(self.stage, 0)

        self.consumer.subscribe(list(topics), on_assign=assigned, on_revoke=revoked_health)

    # ------------------------------------------------------------------------------------ consume

    def poll(self, n: int, timeout: float) -> list[Message]:
        """Up to ``n`` messages, waiting up to ``timeout`` for the first (:func:`~gpl.runtime.kafka.take`);
        each is counted ``in`` and open in the ledger (if its topic is tracked)."""
        out: list[Message] = []
        HEALTH.beat(self.stage)  # the loop came round: /healthz (gpl/runtime/health.py)
        refetched = self.gaps.refetched
        for m in self.gaps.filter(take(self.consumer, n, timeout)):
            if m.error():
                log.error("%s: consume error: %s", self.stage, m.error())
                continue
            tp = tp_of(m)
            if tp[0] in self.tracked:
                self.ledger.read(tp, m.offset() or 0)
            out.append(m)
        if self.gaps.refetched != refetched:
            self.accounting.add("gaps_refetched", self.gaps.refetched - refetched)
        if self.lag.due():
            self.update_lag()
        return out

    def update_lag(self, *, force: bool = False) -> dict[str, int]:
        """Measure the tracked topics' lag on the owned partitions, export it, return it per topic."""
        owned = [(tp.topic, tp.partition) for tp in self.consumer.assignment() if tp.topic in self.tracked]
        self.lag.update(self.consumer, owned, force=force)
        return self.lag.last

    def decode(self, m: Message, model: type[M]) -> M | None:
        """The message as its contract, or None after sending it to the DLQ (then it is done)."""
        try:
            return self.wire.decode(m.topic() or "?", m.value(), model)
        except DecodeError as e:
            self.dead_letter(m, e)
            return None

    def dead_letter(self, m: Message, err: Exception, reason: str | None = None) -> None:
        """Send the message to its DLQ with the reason; it is done."""
        self.dlq.send(m, err, reason)
        self.done(m)

    @contextmanager
    def processing(self, m: Message) -> Iterator[None]:
        """Run one message's domain step: any exception sends the message to its DLQ (``processing_error``,
        with the exception text, original bytes and origin offset) and the loop goes on. Without it a bug
        that one input triggers either stops the stage or, caught and logged, leaves the input nowhere."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every exception of one message's step ends in its DLQ
            log.exception("%s: processing %s[%d]@%d failed", self.stage, *tp_of(m), m.offset() or 0)
            self.dead_letter(m, RuntimeError(f"{type(e).__name__}: {e}"), reason="processing_error")

    def done(self, m: Message) -> None:
        """The message's work is finished; its offset may be committed after the next flush."""
        tp = tp_of(m)
        if tp[0] in self.tracked:
            self.ledger.done(tp, m.offset() or 0)

    # ------------------------------------------------------------------------------- backpressure

    def rewind(self, m: Message) -> None:
        """Pause the message's partition and seek it back to the message: it will be read again."""
        tp = tp_of(m)
        offset = m.offset() or 0
        part = TopicPartition(tp[0], tp[1], offset)
        self.consumer.pause([part])
        self.consumer.seek(part)
        self.gaps.rewound(tp, offset)
        self.ledger.rewind(tp, offset)
        self.paused.add(tp)

    def pause(self, tps: Iterable[TP] | None = None) -> None:
        """Stop fetching these partitions (default: the whole assignment)."""
        parts = self._parts(tps)
        if parts:
            self.consumer.pause(parts)
            self.paused.update((p.topic, p.partition) for p in parts)

    def resume(self, tps: Iterable[TP] | None = None) -> None:
        """Fetch these paused partitions again (default: every paused one)."""
        chosen = set(self.paused if tps is None else tps) & self.paused
        if chosen:
            self.consumer.resume([TopicPartition(t, p) for t, p in sorted(chosen)])
            self.paused -= chosen

    def _parts(self, tps: Iterable[TP] | None) -> list[TopicPartition]:
        if tps is None:
            return list(self.consumer.assignment())
        return [TopicPartition(t, p) for t, p in tps]

    # ------------------------------------------------------------------------------------- commit

    def flush(self, stop: threading.Event, what: str = "outputs") -> bool:
        """Everything produced so far is on the broker; False if ``stop`` came first."""
        return flush_until_empty(self.producer, stop, what)

    def commit(self, stop: threading.Event | None = None, *, what: str = "outputs",
               offsets: dict[TP, int] | None = None) -> bool:
        """Flush, then commit the ledger's positions (or ``offsets``). False if the flush was cut short.

        A failed commit (e.g. the partitions were revoked meanwhile) is logged, not raised: the next
        owner re-reads from the last committed offset and every stage's outputs are idempotent.
        """
        if stop is not None:
            if not self.flush(stop, what):
                return False
        elif self.producer.flush(10) > 0:
            return False
        todo = self.ledger.committable() if offsets is None else offsets
        try:
            commit_offsets(self.consumer, todo)
        except KafkaException as e:
            log.warning("%s: offset commit failed, the work will be re-read: %s", self.stage, e)
        return True

    # -------------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Flush what is queued and close both clients (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.producer.flush(10)
        self.consumer.close()  # its revoke callback may still commit, and flush the producer first
        self.producer.flush(10)
        close = getattr(self.producer, "close", None)  # Producer.close is recent (2.16 here; >=2.6 allowed)
        if callable(close):
            close()

    def __enter__(self) -> StageIO:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
