"""How a replay sends: its pacing, its producer with per-delivery accounting, and the topic check before it.

Why a module of its own: both kinds of replay (a JSONL file, gpl/replay.py; a topic range,
gpl/replay_topic.py) send the same way, and these are the rules that make a replay faithful to its
source, whatever it reads.

Order. The producer runs with one request in flight per connection, so a retried send cannot overtake
the next one and per-key order survives transient errors (about half the throughput of the default on
the embedded broker: ~8k instead of ~17k msg/s, measured here).

Pacing. ``speed=0`` sends as fast as possible. ``speed=s > 0`` reproduces the original gaps between
consecutive records' timestamps divided by ``s`` (``speed=60``: an hour of events in a minute); a
record whose timestamp is not after the previous one is sent at once, never reordered, and a record
without a timestamp (``ts`` <= 0, e.g. catalogue items) is never waited for. ``max_wait_s`` caps any
single wait, for data with idle gaps of years (MovieLens). Pacing changes timing only, never order.

Topics must exist (``gpl topics create``): :func:`existing_topics` asks for metadata without naming a
topic, so a replay never lets the broker auto-create one with another partition count.
"""

from __future__ import annotations

import time
from collections import Counter

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from runtime.kafka import producer
from runtime.settings import KafkaSettings

# One request in flight: a retry cannot reorder records of one partition (see the module docstring).
_ORDERED = {"max.in.flight.requests.per.connection": 1}


class Pacer:
    """Sleeps so that records leave with their original timestamp gaps divided by ``speed``."""

    def __init__(self, speed: float, max_wait_s: float | None) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0 (0: as fast as possible)")
        self.speed = speed
        self.max_wait_s = max_wait_s
        self._last_ts: int | None = None
        self._deadline = 0.0

    def wait(self, ts: int) -> None:
        if self.speed == 0 or ts <= 0:
            return
        now = time.monotonic()
        if self._last_ts is None:
            self._deadline = now
        else:
            gap = max(0, ts - self._last_ts) / 1000.0 / self.speed
            if self.max_wait_s is not None:
                gap = min(gap, self.max_wait_s)
            # a schedule, not a sleep per record: time spent producing is not added to the gaps
            self._deadline += gap
        self._last_ts = max(ts, self._last_ts or ts)
        delay = self._deadline - now
        if delay > 0:
            time.sleep(delay)


class Sink:
    """A producer that counts deliveries per topic and raises if any record failed."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.producer: Producer = producer(kafka, **_ORDERED)
        self.delivered: Counter[str] = Counter()
        self.failed = 0
        self.first_error: KafkaError | None = None

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failed += 1
            self.first_error = self.first_error or err
        else:
            self.delivered[msg.topic() or "?"] += 1

    def send(self, topic: str, value: bytes | None, key: bytes | None, ts: int, partition: int | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> None:
        kwargs: dict[str, object] = {"key": key, "on_delivery": self._on_delivery}
        if ts > 0:
            kwargs["timestamp"] = ts
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                self.producer.produce(topic, value, **kwargs)  # type: ignore[arg-type]
                break
            except BufferError:  # local queue full: let deliveries drain, then retry the same record
                self.producer.poll(0.05)
        self.producer.poll(0)

    def close(self, timeout: float) -> dict[str, int]:
        left = self.producer.flush(timeout)
        if left:
            raise TimeoutError(f"{left} records still undelivered after {timeout}s")
        if self.failed:
            raise KafkaException(self.first_error) if self.first_error else RuntimeError("delivery failed")
        return dict(self.delivered)


def existing_topics(kafka: KafkaSettings, timeout: float) -> dict[str, int]:
    """Topic -> partition count, from a metadata request that names no topic (so creates none)."""
    from confluent_kafka.admin import AdminClient

    md = AdminClient(kafka.client_config()).list_topics(timeout=timeout)
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}
