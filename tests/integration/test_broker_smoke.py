"""The embedded broker answers the Kafka protocol: topics, produce, consumer group, committed offsets."""

from __future__ import annotations

from confluent_kafka import OFFSET_INVALID, TopicPartition

from runtime.kafka import commit_offsets, consumer, producer
from runtime.settings import Settings


def test_produce_consume_commit(settings: Settings) -> None:
    p = producer(settings.kafka)
    for i in range(20):
        p.produce("recall", f"v{i}".encode(), key=f"u{i % 3}".encode())
    assert p.flush(10) == 0
    c = consumer(settings.kafka, "smoke")
    c.subscribe(["recall"])
    got: list[bytes] = []
    offsets: dict[tuple[str, int], int] = {}
    for _ in range(60):
        for m in c.consume(50, timeout=0.5):
            assert m.error() is None
            got.append(m.value())
            offsets[(m.topic(), m.partition())] = m.offset() + 1
        if len(got) >= 20:
            break
    commit_offsets(c, offsets)
    c.close()
    assert sorted(got) == sorted(f"v{i}".encode() for i in range(20))
    # the group's committed offsets are the ends of what it read: asked of the broker, not inferred from a
    # consumer that reads nothing (which a group still joining, or no commit at all, would also give)
    c2 = consumer(settings.kafka, "smoke")
    parts = [TopicPartition("recall", p) for p in range(settings.kafka.partitions)]
    committed = {(tp.topic, tp.partition): tp.offset for tp in c2.committed(parts, timeout=10)}
    assert committed == {tp: offsets.get(tp, OFFSET_INVALID) for tp in committed} and sum(offsets.values()) == 20
    # and a member of the group resumes there: the next record it reads is the one produced after the commit
    p.produce("recall", b"after", key=b"u0")
    assert p.flush(10) == 0
    c2.subscribe(["recall"])
    again: list[bytes] = []
    for _ in range(60):
        again += [m.value() for m in c2.consume(50, timeout=0.5) if m.error() is None]
        if again:
            break
    c2.close()
    assert again == [b"after"]
