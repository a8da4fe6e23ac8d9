"""``GplProducer``: the typed client your services use to feed GPL stream (the contract: docs/producers.md).

The join of recall and exposure happens per partition, so a producer that keys or partitions
differently from the rest of the system does not fail: it silently splits a user's recall and exposure
across partitions and the requests expire unjoined. This client makes the contract the only thing you
can do: key = ``user_id`` as UTF-8 (``item_id`` in decimal for items), the murmur2 partitioner of the
Java client and faust, the record timestamp = the event's ``ts`` (epoch ms), the value = the contract's
orjson encoding with its ``schema_version``. Security, codecs and any librdkafka property come from the
same :class:`KafkaSettings` as the stages (``kafka.extra``, ``kafka.producer_extra``).

    with GplProducer(settings.kafka) as p:
        p.send_recall(RecallEvent(request_id="r1", user_id="42", ts=now_ms, item_ids=[...], scores=[...]))
        p.send_exposure(ExposureEvent(...))
    # leaving the block flushes; a record the broker refused raises ProduceError
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from runtime.kafka import producer
from runtime.settings import KafkaSettings
from schemas.events import Contract, ExposureEvent, ItemEvent, RecallEvent
from schemas.topics import EXPOSURE, ITEMS, RECALL, TopicSpec

log = logging.getLogger(__name__)


class ProduceError(RuntimeError):
    """Records the broker did not take (after librdkafka's retries), or that were still queued at the
    flush deadline; ``failures`` holds (topic, key, error) of each."""

    def __init__(self, failures: list[tuple[str, bytes | None, str]]) -> None:
        first = ", ".join(f"{t} key={k!r}: {e}" for t, k, e in failures[:3])
        super().__init__(f"{len(failures)} record(s) not delivered: {first}")
        self.failures = failures


def message_key(spec: TopicSpec, event: Contract) -> bytes:
    """The key the contract prescribes: the topic's key field as UTF-8 (an int key in decimal)."""
    return str(getattr(event, spec.key)).encode("utf-8")


class GplProducer:
    """Sends recall, exposure and item events with the key, partitioner, timestamp and codec the
    stages expect. Thread-safe as librdkafka's producer is; failures surface at :meth:`flush`."""

    def __init__(self, kafka: KafkaSettings, *, producer_config: dict[str, Any] | None = None,
                 flush_timeout_s: float = 30.0) -> None:
        part = (producer_config or {}).get("partitioner", "murmur2_random")
        if part not in ("murmur2_random", "murmur2"):  # the one thing a caller must not change (docs/producers.md)
            raise ValueError(f"partitioner {part!r} would split users' recall and exposure across partitions")
        # the stages' producer factory: murmur2_random, acks=all, security and extras from the settings
        self._producer: Producer = producer(kafka, **(producer_config or {}))
        self.flush_timeout_s = flush_timeout_s
        self._failures: list[tuple[str, bytes | None, str]] = []
        self._lock = threading.Lock()
        self.sent = 0
        self.delivered = 0

    # ------------------------------------------------------------------ the three input topics
    def send_recall(self, event: RecallEvent) -> None:
        self._send(RECALL, event, RecallEvent)

    def send_exposure(self, event: ExposureEvent) -> None:
        self._send(EXPOSURE, event, ExposureEvent)

    def send_item(self, event: ItemEvent) -> None:
        self._send(ITEMS, event, ItemEvent)

    def _send(self, spec: TopicSpec, event: Contract, expected: type[Contract]) -> None:
        if not isinstance(event, expected):  # a wrong record on a topic would end in its DLQ, far from here
            raise TypeError(f"topic {spec.name!r} takes {expected.__name__}, not {type(event).__name__}")
        kwargs: dict[str, Any] = {"key": message_key(spec, event), "on_delivery": self._delivered}
        ts = int(getattr(event, "ts", 0))
        if ts > 0:  # event time; a catalogue item without one gets the send time from the client
            kwargs["timestamp"] = ts
        while True:
            try:
                self._producer.produce(spec.name, spec.serde.serialize(event), **kwargs)  # the topic's format
                break
            except BufferError:  # the local queue is full: serve delivery reports until there is room
                self._producer.poll(0.1)
        self.sent += 1
        self._producer.poll(0)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        with self._lock:
            if err is None:
                self.delivered += 1
            else:
                self._failures.append((msg.topic() or "?", msg.key(), str(err)))

    # ------------------------------------------------------------------ durability
    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every record sent so far is acknowledged; raise :class:`ProduceError` for those that
        were not (each reported once)."""
        left = self._producer.flush(self.flush_timeout_s if timeout_s is None else timeout_s)
        with self._lock:
            failures, self._failures = self._failures, []
        if left:
            failures.append(("?", None, f"{left} record(s) still queued after the flush timeout"))
        if failures:
            raise ProduceError(failures)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> GplProducer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.flush()
            return
        try:  # already failing: deliver what we can, but do not hide the original error
            self.flush()
        except ProduceError as e:
            log.error("while handling %s: %s", exc_type.__name__, e)


__all__ = ["GplProducer", "ProduceError", "message_key"]
