"""The streams stage's write path on the real broker: coalesced table changelogs (streams/changelog.py) and the
producer that queues full batches instead of blocking every send (streams/transport.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from confluent_kafka.admin import AdminClient, ConfigResource

from runtime.broker import Broker
from runtime.kafka import consumer, create_topics
from streams.app import StreamsProcessor
from streams.join import DONE, RECALL, Pending
from streams.lifecycle import prepare
from streams.transport import QueueingAccumulator, QueueingProducer
from tests.fixtures.settings import make_settings
from tests.helpers import item_index, produce, running, wait_for
from tests.helpers import records as read_records
from tests.integration.test_streams import ITEMS, exposure, recall


def test_joined_requests_leave_their_marker_not_their_recall(tmp_path: Path, broker: Broker) -> None:
    """20 requests joined within the coalescing window: the join table's changelog gets fewer than the 40
    records faust would write (recall, then marker), each request's last record is its DONE marker, and a
    second worker recovers the markers: the same recalls sent again are duplicates, not new requests."""
    s = make_settings(tmp_path, broker, partitions=2,
                      streams={"join_wait_s": 120.0, "changelog_coalesce_ms": 60_000})
    create_topics(s.kafka)
    index = item_index(ITEMS, s.encoder.collection)
    cands = list(range(1, 41))
    produce(s, "recall", [recall(f"c{i}", f"u{i % 5}", cands) for i in range(20)])
    produce(s, "exposure", [exposure(f"c{i}", f"u{i % 5}", [1 + i], set()) for i in range(20)])
    first = StreamsProcessor(s, index)
    with running(first, "streams-1"):
        wait_for(lambda: first.accounting["joined"] == 40, 60, lambda: f"20 joins: {first.accounting.snapshot()}")
    records = read_records(s, f"{s.streams.app_id}-pending-changelog", settle=2.0)
    last = {k: Pending.unpack(v) for k, v in records if v is not None}
    assert sorted(last) == sorted(f"c{i}".encode() for i in range(20))
    assert all(rec.kind == DONE for rec in last.values())
    assert len(records) < 40, f"{len(records)} changelog records for 20 joined requests: not coalesced"
    assert sum(1 for _, v in records if v is not None and Pending.unpack(v).kind == RECALL) < 20

    second = StreamsProcessor(s, index)
    produce(s, "recall", [recall(f"c{i}", f"u{i % 5}", cands) for i in range(3)])
    with running(second, "streams-2"):
        wait_for(lambda: second.accounting["dlq:duplicate"] == 3, 60,
                 lambda: f"3 duplicates recognised from the recovered markers: {second.accounting.snapshot()}")
    assert second.accounting["joined"] == 0


def test_full_batches_queue_and_keep_partition_order(broker: Broker, tmp_path: Path) -> None:
    """With one record per batch (the embedded broker's remedy) a send to a partition whose batch is full
    queues a new batch instead of waiting for the broker: many batches wait at once, and every partition
    still gets its records in the order they were sent."""
    s = make_settings(tmp_path, broker, partitions=2)
    create_topics(s.kafka, ["ordered"])
    n = 3000
    queued: list[int] = []

    async def send_all() -> None:
        p = QueueingProducer(bootstrap_servers=broker.bootstrap, max_batch_size=1, linger_ms=0)
        await p.start()
        try:
            acc = p._message_accumulator
            assert isinstance(acc, QueueingAccumulator)
            futures = []
            for i in range(n):
                futures.append(await p.send("ordered", value=str(i).encode(), partition=i % 2))
                queued.append(sum(len(b) for b in acc._batches.values()))
            await asyncio.gather(*futures)
        finally:
            await p.stop()

    asyncio.run(send_all())
    assert max(queued) > 2, "sends waited for the broker instead of queueing batches"
    got = {0: [], 1: []}  # type: dict[int, list[int]]
    c = consumer(s.kafka, "ordered-check")
    c.subscribe(["ordered"])
    deadline = time.monotonic() + 60
    try:
        while sum(map(len, got.values())) < n and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.3):
                if m.error() is None:
                    got[m.partition()].append(int(m.value()))
    finally:
        c.close()
    assert got[0] == list(range(0, n, 2)) and got[1] == list(range(1, n, 2))


def test_the_tables_changelogs_exist_before_faust_starts(tmp_path: Path, broker: Broker) -> None:
    """faust creates a missing changelog and subscribes a few ms later; on Apache Kafka its group could miss
    the new topic and refuse every write of that table until a metadata refresh (a chaos run dead-lettered
    169 valid inputs so, issue 21). The stage creates them first, compacted, a leader on every partition."""
    s = make_settings(tmp_path, broker, partitions=3)
    create_topics(s.kafka)
    proc = StreamsProcessor(s, item_index(ITEMS, s.encoder.collection))
    names = [t.changelog_topic_name for t in proc.app.tables.values()]
    assert len(names) == 2
    prepare(proc)  # no faust yet
    admin = AdminClient(s.kafka.client_config())
    md = admin.list_topics(timeout=10).topics
    assert all(len(md[n].partitions) == 3 and all(p.leader >= 0 for p in md[n].partitions.values()) for n in names)
    configs = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in names])
    assert {r.name: f.result()["cleanup.policy"].value for r, f in configs.items()} == dict.fromkeys(names, "compact")
