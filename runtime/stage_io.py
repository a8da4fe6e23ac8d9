"""One stage's Kafka I/O: consume → decode → dead-letter → flush → commit, through one offset ledger.

Every worker stage (indexer, anchors, labeler, trainer, calibration monitor) runs the same cycle around
its own domain step, and the cycle's rules are where data gets lost when each stage writes them
itself:

* every consumed message is counted ``in`` and recorded in the :class:`~runtime.offsets.OffsetLedger`
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
  (``gpl_consumer_lag_messages``, :mod:`runtime.lag`);
* ``transactional=True`` (the labeler and the trainer, when ``kafka.transactional`` is on): the outputs and
  the offsets of each commit point go in one Kafka transaction (:mod:`runtime.transactions`); an aborted
  one rewinds the owned partitions to their committed offsets, as a rebalance would, and a revoke or close
  aborts what no commit covered (the next reader does that work again).

The stage keeps its loop — each reads top to bottom in its own file — and uses this object as a
context manager so both clients are closed however the loop ends.

The rules above live in :class:`~runtime.stage_port.StageRules`, shared with the in-memory twin
(:mod:`runtime.stage_io_memory`) that unit tests drive; this module holds only the confluent-kafka
calls (and the embedded broker's gap guard, the lag gauge and the health beat, which only a real
consumer needs).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from confluent_kafka import OFFSET_BEGINNING, KafkaException, Message, Producer, TopicPartition

from runtime.health import HEALTH
from runtime.kafka import (
    Accounting,
    GapGuard,
    commit_offsets,
    consumer,
    producer,
    take,
)
from runtime.lag import LagGauge
from runtime.offsets import TP
from runtime.serde import Wire
from runtime.settings import KafkaSettings, SchemaRegistrySettings
from runtime.stage_port import Rebalance, StageRules, tp_of
from runtime.transactions import StageTransactions, transactional_id

if TYPE_CHECKING:
    from runtime.stage_port import StagePort

__all__ = ["StageIO", "tp_of"]
log = logging.getLogger(__name__)


class StageIO(StageRules):
    """A stage's Kafka consumer, producer, dead letters and offset ledger, with the commit rules above."""

    def __init__(self, kafka: KafkaSettings, stage: str, accounting: Accounting, *,
                 consumer_config: dict[str, Any] | None = None, producer_config: dict[str, Any] | None = None,
                 registry: SchemaRegistrySettings | None = None, transactional: bool = False,
                 instance: str | None = None) -> None:
        self.consumer = consumer(kafka, stage, **(consumer_config or {}))
        extra = dict(producer_config or {})
        if transactional:
            extra["transactional.id"] = transactional_id(kafka, stage, instance)
        self.kafka_producer: Producer = producer(kafka, **extra)
        self.tx: StageTransactions | None = None
        if transactional:
            self.tx = StageTransactions(self.kafka_producer, self.consumer, stage)
            self.tx.start()
        self._on_revoke: Rebalance | None = None
        self._rewinding = False
        # both wire formats in; plain JSON out unless the registry settings say so
        super().__init__(stage, accounting, Wire(registry), self.kafka_producer, max_bytes=kafka.max_message_bytes)
        self.lag = LagGauge(stage, kafka.lag_interval_s)
        self.gaps = GapGuard(self.consumer, kafka.refetch_gaps)  # records the embedded broker let us skip
        self._closed = False

    @property
    def producer(self) -> Producer:
        """The confluent-kafka producer (outputs and dead letters)."""
        return self.kafka_producer

    # ------------------------------------------------------------------------------ client calls

    def _join(self, topics: list[str], on_assign: Rebalance, on_revoke: Rebalance) -> None:
        self._on_revoke = on_revoke
        self.consumer.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke)

    def _assigned(self, tps: list[TP]) -> None:
        self.gaps.forget(tps)
        HEALTH.assigned(self.stage, len(tps))

    def _revoked(self, lost: list[TP]) -> None:
        super()._revoked(lost)
        self.gaps.forget(lost)
        HEALTH.assigned(self.stage, 0)
        if self.tx is not None and not self._rewinding:
            # what the stage's on_revoke did not commit belongs to work the next owner does again
            self.tx.abort()
            if not self._closed and not self.tx.fatal and not self.tx.open:
                self.tx.begin()

    def _fetch(self, n: int, timeout: float) -> list[Message]:
        """:func:`~runtime.kafka.take` through the gap guard; consume errors are logged and skipped."""
        out: list[Message] = []
        HEALTH.beat(self.stage)  # the loop came round: /healthz (runtime/health.py)
        refetched = self.gaps.refetched
        for m in self.gaps.filter(take(self.consumer, n, timeout)):
            if m.error():
                log.error("%s: consume error: %s", self.stage, m.error())
                continue
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

    def _owned(self) -> list[TP]:
        return [(tp.topic, tp.partition) for tp in self.consumer.assignment()]

    def _pause(self, tps: list[TP]) -> None:
        self.consumer.pause([TopicPartition(t, p) for t, p in tps])

    def _resume(self, tps: list[TP]) -> None:
        self.consumer.resume([TopicPartition(t, p) for t, p in tps])

    def _seek(self, tp: TP, offset: int) -> None:
        part = TopicPartition(tp[0], tp[1], offset)
        self.consumer.pause([part])
        self.consumer.seek(part)
        self.gaps.rewound(tp, offset)

    def commit(self, stop: threading.Event | None = None, *, what: str = "outputs",
               offsets: dict[TP, int] | None = None) -> bool:
        """:meth:`StageRules.commit`; refused (False) once the transactional producer failed fatally: the
        error was raised to the loop once, and its ``finally`` must not raise it again from a flush."""
        if self.tx is not None and self.tx.fatal:
            return False
        return super().commit(stop, what=what, offsets=offsets)

    def _commit_offsets(self, offsets: dict[TP, int]) -> None:
        if self.tx is not None:
            if not self.tx.commit(offsets) and not self.tx.fatal and not self._rewinding:
                self._rewind_to_committed()
            return
        try:
            commit_offsets(self.consumer, offsets)
        except KafkaException as e:
            log.warning("%s: offset commit failed, the work will be re-read: %s", self.stage, e)

    def _rewind_to_committed(self) -> None:
        """After an aborted transaction: the owned partitions start again at their committed offsets, the
        stage's revoke hook dropping what it kept of them (its deferred batches), as after a rebalance."""
        owned = [tp for tp in self._owned() if tp[0] in self.tracked]
        if not owned:
            return
        parts = [TopicPartition(t, p) for t, p in owned]
        self._rewinding = True
        try:
            self.ledger.forget(owned)  # so the hook's commit covers none of the aborted work
            if self._on_revoke is not None:
                self._on_revoke(self.consumer, parts)
            committed = self.consumer.committed(parts, timeout=10)
            for tp in committed:
                where = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                self.consumer.seek(TopicPartition(tp.topic, tp.partition, where))
                self.gaps.forget([(tp.topic, tp.partition)])
            self.consumer.resume(parts)
        except KafkaException as e:  # the next rebalance or restart starts them at the committed offsets
            log.warning("%s: rewind after the aborted transaction failed: %s", self.stage, e)
        finally:
            self._rewinding = False
        self.accounting.add("transactions_aborted")
        HEALTH.assigned(self.stage, len(self._owned()))

    # -------------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Flush what is queued and close both clients (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.tx is None or not self.tx.fatal:  # a fenced producer raises on flush
            self.kafka_producer.flush(10)
        self.consumer.close()  # its revoke callback may still commit, and flush the producer first
        if self.tx is not None:
            self.tx.abort()  # what no commit covered: never visible (its input is read again)
        if self.tx is None or not self.tx.fatal:
            self.kafka_producer.flush(10)
        # Producer.close is recent (2.16 here; >=2.6 allowed)
        close: Callable[[], Any] | None = getattr(self.kafka_producer, "close", None)
        if callable(close):
            try:
                close()
            except KafkaException as e:  # a fenced producer's close raises what fenced it: already logged
                log.info("%s: producer closed after a fatal error: %s", self.stage, e)


if TYPE_CHECKING:
    def _fits_the_port(io: StageIO) -> StagePort:
        """mypy proves the Kafka adapter has the port's shape (the twin's twin: stage_io_memory.py)."""
        return io
