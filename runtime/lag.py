"""Consumer lag per stage and topic: the backlog a stage has not committed yet, as a Prometheus gauge.

Why here and not only in an exporter: backpressure in this system pauses partitions and leaves the
backlog in Kafka (docs/design.md §6), so lag is *the* signal that a stage falls behind; KEDA scales on it
and the alerts in deploy/ page on it. Every stage measures its own group on its own partitions, so the
gauge exists wherever the stage runs (compose, Kubernetes, the embedded demo) without a separate
exporter.

Lag of a partition = high watermark − committed offset of the group (what a restart would re-read).
Before the group ever committed, the consumer's position is used, and before it read anything the
low watermark (``auto.offset.reset=earliest``: the whole retained log is still to do).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from runtime.metrics import CONSUMER_LAG

log = logging.getLogger(__name__)


def measure_lag(consumer: Consumer, parts: Iterable[tuple[str, int]], timeout: float = 5.0) -> dict[str, int]:
    """Records still to commit per topic over ``parts``, for the consumer's group (broker round trips)."""
    tps = [TopicPartition(t, p) for t, p in parts]
    if not tps:
        return {}
    committed = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(tps, timeout=timeout)}
    try:
        position = {(tp.topic, tp.partition): tp.offset for tp in consumer.position(tps)}
    except KafkaException:  # not assigned to this consumer (e.g. a group read from outside)
        position = {}
    out: dict[str, int] = defaultdict(int)
    for tp in tps:
        key = (tp.topic, tp.partition)
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
        base = committed.get(key, -1)
        if base < 0:
            base = position.get(key, -1)
        if base < 0:
            base = low
        out[tp.topic] += max(0, high - base)
    return dict(out)


class LagGauge:
    """Refreshes ``gpl_consumer_lag_messages{stage,topic}`` at most every ``interval_s`` (0: never).

    A topic measured before but absent now (its partitions were revoked) is set to 0, so a stage that
    handed its partitions to another process does not keep reporting the old backlog.
    """

    def __init__(self, stage: str, interval_s: float) -> None:
        self.stage = stage
        self.interval_s = interval_s
        self._next = 0.0
        self._topics: set[str] = set()
        self.last: dict[str, int] = {}

    def due(self) -> bool:
        return self.interval_s > 0 and time.monotonic() >= self._next

    def update(self, consumer: Consumer, parts: Iterable[tuple[str, int]], *, force: bool = False) -> None:
        """Measure and export when due (or ``force``); a failed measurement is logged and retried later."""
        if not force and not self.due():
            return
        self._next = time.monotonic() + self.interval_s
        try:
            lag = measure_lag(consumer, parts)
        except KafkaException as e:
            log.debug("%s: consumer lag not measured: %s", self.stage, e)
            return
        for topic in self._topics - set(lag):
            CONSUMER_LAG.labels(stage=self.stage, topic=topic).set(0)
        for topic, n in lag.items():
            CONSUMER_LAG.labels(stage=self.stage, topic=topic).set(n)
        self._topics |= set(lag)
        self.last = lag
