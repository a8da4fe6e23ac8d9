"""Exactly-once for a confluent-kafka stage: outputs, dead letters and consumer offsets in one transaction.

Opt-in (``kafka.transactional``). Without it a stage is at-least-once: it flushes its outputs, then commits
its offsets, so a crash between the two re-reads work whose outputs are already on the broker (duplicates
the trainer drops by sample id). With it, :class:`StageTransactions` keeps one Kafka transaction open on
the stage's producer and, at each commit point of :class:`~runtime.stage_io.StageIO`, adds the
consumed offsets to it (``send_offsets_to_transaction`` with the consumer's group metadata) and commits:
a ``read_committed`` reader sees a message's outputs exactly when its offset is committed, never twice.

Fencing. The ``transactional.id`` is ``<group_prefix>-<stage>-<instance>``: stable across restarts of one
instance, so a restarted process's ``init_transactions`` aborts what its killed predecessor left open at
once (else ``read_committed`` readers of those partitions wait up to ``transaction.timeout.ms``), and unique
per live instance (two live producers with one id fence each other). A zombie that lost its partitions in a
rebalance is fenced by the group generation in the metadata (KIP-447): its offset commit fails and its
transaction aborts, so its outputs never become visible.

Failures. A retriable error is retried for ``timeout_s``; one that requires an abort (or a retry that ran
out of time) aborts the transaction and tells the caller, which rewinds to the committed offsets: the work is
done again, at least once, never lost. A fatal error (fenced by a newer instance) is raised: the stage ends.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from runtime.offsets import TP
from runtime.settings import KafkaSettings

__all__ = ["StageTransactions", "transactional_id"]
log = logging.getLogger(__name__)


def transactional_id(kafka: KafkaSettings, stage: str, instance: str | None = None) -> str:
    """``<group_prefix>-<stage>-<instance>``; the instance defaults to the consumer's ``group.instance.id``
    (static membership names a stable, unique member), else the host name (one stage instance per host or
    pod: a StatefulSet's pod names are stable)."""
    if instance is None:
        props = kafka.extra | kafka.consumer_extra
        instance = str(props.get("group.instance.id") or socket.gethostname() or "0")
    return f"{kafka.group_prefix}-{stage}-{instance}"


class StageTransactions:
    """One open transaction at a time on ``producer``, committed with ``consumer``'s offsets."""

    def __init__(self, producer: Producer, consumer: Consumer, stage: str, *, timeout_s: float = 30.0) -> None:
        self.producer, self.consumer, self.stage, self.timeout_s = producer, consumer, stage, timeout_s
        self.open = False
        self.fatal = False
        self.committed = 0
        self.aborted = 0

    def start(self) -> None:
        """Register the id with the coordinator (fencing an older producer of the same id and aborting what
        it left open) and open the first transaction."""
        self._retrying("init_transactions", lambda: self.producer.init_transactions(self.timeout_s))
        self.begin()

    def begin(self) -> None:
        """Open the next transaction (after a commit, an abort, or a revoke that aborted)."""
        self.producer.begin_transaction()
        self.open = True

    def commit(self, offsets: dict[TP, int]) -> bool:
        """Add ``offsets`` (next offsets to read) to the open transaction, commit it and open the next one.

        False when the transaction was aborted instead (its outputs are discarded and the offsets stay where
        they were committed before: the caller must rewind). A fatal error is raised.
        """
        if self.fatal or not self.open:
            return False
        try:
            if offsets:
                tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
                meta = self.consumer.consumer_group_metadata()
                self._retrying("send_offsets_to_transaction",
                               lambda: self.producer.send_offsets_to_transaction(tps, meta, self.timeout_s))
            self._retrying("commit_transaction", lambda: self.producer.commit_transaction(self.timeout_s))
        except KafkaException as e:
            self._failed(e)
            return False
        self.committed += 1
        self.begin()
        return True

    def abort(self) -> None:
        """Abort the open transaction (what it holds is never visible to committed readers); no new one."""
        if not self.open or self.fatal:
            return
        self.open = False
        try:
            self.producer.abort_transaction(self.timeout_s)
            self.aborted += 1
        except KafkaException as e:
            self._mark_fatal(e)
            log.error("%s: abort_transaction failed: %s", self.stage, e)

    def _failed(self, e: KafkaException) -> None:
        """Abort after a commit failed (raises when the producer can no longer be used)."""
        err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
        if err is not None and err.fatal():
            self._mark_fatal(e)
            raise e
        log.warning("%s: transaction aborted, its work will be done again: %s", self.stage, e)
        self.abort()
        if self.fatal:
            raise e
        self.begin()

    def _mark_fatal(self, e: KafkaException) -> None:
        err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
        if err is None or err.fatal():
            self.fatal, self.open = True, False
            log.error("%s: the transactional producer is fenced or failed (another instance with its id, "
                      "or a newer generation): the stage stops: %s", self.stage, e)

    def _retrying(self, what: str, call: Callable[[], Any]) -> None:
        """``call()`` again while the error is retriable, for up to ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                call()
                return
            except KafkaException as e:
                err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
                if err is None or not err.retriable() or time.monotonic() >= deadline:
                    raise
                log.warning("%s: %s: %s; retrying", self.stage, what, err.str())
                time.sleep(0.2)
