"""The project's faust transport (``gplkafka://``): the stock aiokafka one with five corrections.

Only 1. is about the embedded broker (and applies only where its profile asks); 2. to 5. correct faust and
aiokafka themselves and stay on every broker: lost records around a rebalance (2., 3.), a producer that
blocks every send behind one full partition (4.), table writes ordered before their commit (5.).

1. **Fetch wait (the embedded profile only).** faust 0.15 builds its aiokafka consumer with a hard-coded
   ``fetch_max_wait_ms=1500``. The embedded Tansu broker holds a fetch for the whole wait when no data is there
   at the time it is asked, so every hop through the streams processor cost up to 1.5 s of latency; its
   profile sets ``kafka.fetch_wait_max_ms`` and this transport applies it. Unset (Apache Kafka, which answers
   a fetch as soon as data comes), faust's own wait stays.

2. **No stream records while a rebalance is in progress.** On assignment faust marks *every* assigned
   partition active, and only a few awaits later pauses the stream partitions for table recovery. A fetch
   in that window drains stream records from aiokafka (which advances their positions); faust then drops
   them because the partition is no longer active when it iterates the batch. The same happens to the tail
   of any batch that a rebalance interrupts. While the app is rebalancing (``app.rebalancing``: from the
   revoke callback to the end of table recovery) this consumer asks aiokafka only for changelog partitions,
   so stream records stay in aiokafka's buffer at their position. It never hands aiokafka an empty set of
   partitions either: aiokafka reads an empty set as "all partitions".

3. **Seek to committed rewinds uncommitted partitions too.** After recovery faust seeks stream partitions
   to their committed offsets to undo whatever was fetched but not processed. aiokafka's
   ``seek_to_committed`` skips a partition that has no committed offset yet (a topic that had no traffic
   before the restart), so records dropped as in 2. were lost for good: a restart lost joins
   (docs/design.md §5). With ``consumer_auto_offset_reset="earliest"`` (faust's default) such a partition is
   sought to its beginning, the position it had at assignment. That is the at-least-once rule faust
   already applies to committed partitions (the uncommitted tail is read again), extended to partitions
   whose commit point is "nothing yet".

4. **A full batch queues the next one instead of blocking every send.** aiokafka keeps one open batch per
   partition; when it is full, ``send`` waits until the sender has drained it, i.e. until the request in
   flight to that broker comes back. faust sends its buffer one message at a time, so one full partition
   stalls every later message of the stage, whatever its partition. With the embedded broker's
   one-record-per-batch remedy every batch is full after one record: the streams stage sent about one
   record per round trip and ran at a fifth of a bare loop while its CPU idled (``gpl bench e2e``).
   :class:`QueueingAccumulator` appends a new batch behind the full one (up to ``MAX_QUEUED_BATCHES``
   per partition, then it waits, so memory stays bounded): each produce request then carries the next
   batch of *every* partition with data, as the Java client does. Order within a partition is unchanged
   (one batch per partition per request, in queue order; a retried batch goes back to the front).
   Several requests in flight to the broker would go further, but the embedded broker then stored a
   partition's records out of order (2 in 30,000 with 4 requests in flight): not done.

5. **Coalesced table writes before each commit.** The streams tables send their changelog records late, as
   each key's latest value (streams/changelog.py); ``_commit_offsets`` hands them to the producer first, and
   faust then flushes the producer and commits, so no input offset is committed before its table writes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any

import aiokafka
from aiokafka.errors import IllegalStateError, KafkaTimeoutError, ProducerClosed
from aiokafka.producer.message_accumulator import MessageAccumulator
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as driver
from faust.types import TP

SCHEME = "gplkafka"
FAUST_FETCH_WAIT_MS = 1500  # faust 0.15's hard-coded aiokafka fetch_max_wait_ms


def fetch_wait_ms(kafka: Any) -> int:
    """The streams consumer's fetch wait: ``kafka.fetch_wait_max_ms`` where a profile sets it, else faust's."""
    return int(kafka.fetch_wait_max_ms or FAUST_FETCH_WAIT_MS)


def fetchable(app: Any, active: set[TP]) -> set[TP]:
    """The partitions a fetch may drain now: a snapshot of ``active`` (faust mutates the live set while a
    fetch runs), reduced to changelog partitions while the app is rebalancing."""
    tps = set(active)
    if getattr(app, "rebalancing", False):
        changelogs = app.tables.changelog_topics
        tps = {tp for tp in tps if tp.topic in changelogs}
    return tps


def fetch_answers(app: Any) -> dict[tuple[str, int], int | None]:
    """(topic, partition) -> wall ms the broker last answered a fetch of it (None: not yet), for each
    partition the consumer holds: what tells the join's clock a stalled broker from a quiet input
    (streams/clock.py). Read from the consumer thread's aiokafka client; an assignment changing under
    the read ends it early (the next timer tick reads again)."""
    consumer = getattr(getattr(app.consumer, "_thread", None), "_consumer", None)
    out: dict[tuple[str, int], int | None] = {}
    if consumer is None:
        return out
    try:
        for tp in list(consumer.assignment()):
            out[(tp.topic, tp.partition)] = consumer.last_poll_timestamp(tp)
    except (AssertionError, KeyError, RuntimeError, IllegalStateError):
        pass
    return out


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # read by AIOKafkaConsumer.start() when it builds its fetcher
        wait = getattr(self.app, "gpl_fetch_wait_max_ms", None)
        if wait is not None:  # the embedded profile's wait; else faust's own stays (see the docstring, 1.)
            consumer._fetch_max_wait_ms = int(wait)
        return consumer

    async def _fetch_records(self, consumer: Any, active_partitions: set[TP],
                             timeout: float | None = None, max_records: int | None = None) -> Any:
        """Checked again here, in the consumer thread, right before draining: a rebalance may have started
        since the main loop asked (see :meth:`_Consumer._getmany`). None (a client-only app) passes as is."""
        if active_partitions is not None:
            active_partitions = fetchable(self.app, active_partitions)
            if not active_partitions:  # aiokafka would read the empty set as "all partitions"
                return {}
        return await super()._fetch_records(consumer, active_partitions, timeout=timeout, max_records=max_records)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        return await self.call_thread(self._seek_to_committed)

    async def _seek_to_committed(self) -> Mapping[TP, int]:
        """aiokafka's seek to committed, plus: stream partitions without a committed offset go back to their
        beginning (see the module docstring, 3.). Returns aiokafka's mapping unchanged (None for those), which
        faust reads as "no read offset yet"."""
        consumer = self._ensure_consumer()
        committed: Mapping[Any, int | None] = await consumer.seek_to_committed()
        if self.app.conf.consumer_auto_offset_reset == "earliest":
            changelogs = self.app.tables.changelog_topics
            fresh = [tp for tp, off in committed.items() if not off and tp.topic not in changelogs]
            if fresh:
                await consumer.seek_to_beginning(*fresh)
        return committed  # type: ignore[return-value]


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _commit_offsets(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        """Coalesced table writes (streams/changelog.py) go to the producer first: faust then flushes the
        producer and commits, so a committed input offset always has its table writes in the changelog."""
        before = getattr(self.app, "gpl_before_commit", None)
        if before is not None:
            before()
        committed: bool = await super()._commit_offsets(offsets, start_new_transaction)
        return committed

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Any:
        """Skip the round trip to the consumer thread when nothing may be fetched, and wait a little instead:
        faust's fetch loop calls again at once, and would spin for the whole table recovery."""
        if active_partitions is not None and not fetchable(self.app, active_partitions):
            await self.sleep(min(timeout, 0.2))
            return {}
        return await super()._getmany(active_partitions, timeout)


MAX_QUEUED_BATCHES = 4096  # per partition; then a send waits for the oldest batch to drain (backpressure)


class QueueingAccumulator(MessageAccumulator):
    """aiokafka's accumulator, except that a full batch does not block the send (module docstring, 4.)."""

    async def add_message(self, tp: Any, key: Any, value: Any, timeout: float, timestamp_ms: int | None = None,
                          headers: Any = ()) -> Any:
        while True:
            if self._closed:
                raise ProducerClosed()
            if self._exception is not None:
                raise copy.copy(self._exception)
            queued = self._batches.get(tp)
            if queued:
                future = queued[-1].append(key, value, timestamp_ms, headers=list(headers))
                if future is not None:
                    return future
            if not queued or len(queued) < MAX_QUEUED_BATCHES:
                batch = self._append_batch(self.create_builder(), tp)  # wakes the sender
                future = batch.append(key, value, timestamp_ms, headers=list(headers))
                if future is not None:
                    return future
                queued = self._batches.get(tp)  # a fresh batch refused it: wait as aiokafka does
            if not self._waiter_future.done():
                self._waiter_future.set_result(None)
            start = time.monotonic()
            assert queued
            await queued[0].wait_drain(timeout)
            timeout -= time.monotonic() - start
            if timeout <= 0:
                raise KafkaTimeoutError()


class QueueingProducer(aiokafka.AIOKafkaProducer):
    """aiokafka's producer with the :class:`QueueingAccumulator` (what the faust transport builds)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._message_accumulator.__class__ = QueueingAccumulator  # same state, the queueing add_message


class _Producer(driver.Producer):
    @property
    def _producer_type(self) -> type[aiokafka.AIOKafkaProducer]:
        return QueueingProducer


class Transport(driver.Transport):
    Consumer = _Consumer
    Producer = _Producer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
