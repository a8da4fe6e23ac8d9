"""The embedded broker answers the Kafka protocol: topics, produce, consumer group, committed offsets."""

from __future__ import annotations

from gpl.runtime.kafka import commit_offsets, consumer, producer
from gpl.runtime.settings import Settings


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
    c2 = consumer(settings.kafka, "smoke")
    c2.subscribe(["recall"])
    again = [m for _ in range(6) for m in c2.consume(50, timeout=0.5) if m.error() is None]
    c2.close()
    assert again == []
