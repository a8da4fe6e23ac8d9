"""GplProducer and the client settings on the suite's real broker (docs/producers.md; tests/fixtures/brokers.py).

The contract is checked on what the broker holds: key, partition (the one faust/aiokafka's murmur2
picks for the same key), timestamp, value; the client settings by what librdkafka reports about itself.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import Consumer, KafkaException, Message, Producer

from runtime.broker import Broker
from runtime.kafka import consumer, create_topics, producer
from runtime.producer import GplProducer, ProduceError
from runtime.settings import Settings
from schemas.events import (
    RECALL_SCHEMA_VERSION,
    SCHEMA_VERSION,
    Candidate,
    ExposedItem,
    ExposureEvent,
    ItemEvent,
    RecallEvent,
)
from tests.fixtures.settings import make_settings

pytestmark = pytest.mark.integration


@contextmanager
def socket_nobody_listens() -> Iterator[int]:
    """A loopback port bound but never listening: connections to it are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def read_all(s: Settings, topics: list[str], expect: int, timeout: float = 30.0) -> list[Message]:
    c = consumer(s.kafka, f"check-{time.monotonic_ns()}")
    c.subscribe(topics)
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            out += [m for m in c.consume(100, timeout=0.3) if m.error() is None]
    finally:
        c.close()
    return out


def test_gpl_producer_follows_the_contract(tmp_path: Path, broker: Broker) -> None:
    s = make_settings(tmp_path, broker, partitions=4,
                      kafka={"producer_extra": {"compression.type": "zstd"}})
    create_topics(s.kafka)
    users = [f"user-{i}" for i in range(12)] + ["ünïcode-ユーザー"]
    with GplProducer(s.kafka) as p:
        p.send_item(ItemEvent(item_id=7, text="Toy Story (1995)"))
        for n, u in enumerate(users):
            ts = 1_700_000_000_000 + n
            p.send_recall(RecallEvent(request_id=f"r{n}", user_id=u, ts=ts,
                                      candidates=[Candidate(item_id=7, score=0.5)]))
            p.send_exposure(ExposureEvent(request_id=f"r{n}", user_id=u, ts=ts + 300,
                                          items=[ExposedItem(item_id=7, position=0, clicked=True)]))
    assert p.sent == p.delivered == 1 + 2 * len(users)
    msgs = read_all(s, ["recall", "exposure", "items"], expect=p.sent)
    assert len(msgs) == p.sent
    partitioner = DefaultPartitioner()  # what faust's producer (aiokafka) uses for a key
    parts = list(range(4))
    where: dict[str, set[int]] = {}
    for m in msgs:
        value = orjson.loads(m.value())
        assert value["schema_version"] == (RECALL_SCHEMA_VERSION if m.topic() == "recall" else SCHEMA_VERSION)
        if m.topic() == "items":
            assert m.key() == b"7"
            continue
        assert m.key() == value["user_id"].encode("utf-8")
        assert m.timestamp()[1] == value["ts"]  # event time in epoch ms, not the send time
        assert m.partition() == partitioner(m.key(), parts, parts), (m.topic(), m.key())
        where.setdefault(value["user_id"], set()).add(m.partition())
    assert set(where) == set(users) and all(len(p) == 1 for p in where.values())  # recall meets exposure
    assert len(set().union(*where.values())) > 1  # and users spread over the partitions


def test_wrong_record_type_is_refused_before_sending(tmp_path: Path, broker: Broker) -> None:
    s = make_settings(tmp_path, broker)
    with GplProducer(s.kafka) as p, pytest.raises(TypeError, match="takes RecallEvent"):
        p.send_recall(ExposureEvent(request_id="r", user_id="u", ts=1, items=[]))  # type: ignore[arg-type]
    assert p.sent == 0
    with pytest.raises(ValueError, match="consistent_random"):
        GplProducer(s.kafka, producer_config={"partitioner": "consistent_random"})


def test_undelivered_records_raise_at_flush(tmp_path: Path) -> None:
    with socket_nobody_listens() as port:
        s = make_settings(tmp_path, f"127.0.0.1:{port}")
        p = GplProducer(s.kafka, producer_config={"message.timeout.ms": 500})
        p.send_item(ItemEvent(item_id=1, text="x"))
        with pytest.raises(ProduceError, match="1 record\\(s\\) not delivered: items"):
            p.flush(10)
        p.flush(1)  # reported once


def _stats_client_id(client: Producer | Consumer, seen: list[str], timeout: float = 10.0) -> str:
    """The ``client_id`` librdkafka reports in its own statistics (``stats_cb`` appends to ``seen``)."""
    deadline = time.monotonic() + timeout
    while not seen and time.monotonic() < deadline:
        client.poll(0.1)  # serves stats_cb
    return seen[0] if seen else ""


def test_client_properties_reach_librdkafka_per_role(tmp_path: Path, broker: Broker) -> None:
    """``kafka.extra`` reaches every client, ``producer_extra``/``consumer_extra`` only their role."""
    s = make_settings(tmp_path, broker, kafka={
        "extra": {"client.id": "gpl-common", "statistics.interval.ms": 100},
        "producer_extra": {"client.id": "gpl-producer", "compression.type": "zstd"},
    })
    seen_p: list[str] = []
    seen_c: list[str] = []
    p = producer(s.kafka, stats_cb=lambda raw: seen_p.append(json.loads(raw)["client_id"]))
    assert _stats_client_id(p, seen_p) == "gpl-producer"
    c = consumer(s.kafka, "stats", stats_cb=lambda raw: seen_c.append(json.loads(raw)["client_id"]))
    try:
        assert _stats_client_id(c, seen_c) == "gpl-common"
    finally:
        c.close()
    # an unknown property is librdkafka's to refuse: it proves the dict arrives unfiltered, in its role only
    bad = make_settings(tmp_path, broker, kafka={"producer_extra": {"no.such.property": 1}})
    with pytest.raises(KafkaException, match="no.such.property"):
        producer(bad.kafka)
    consumer(bad.kafka, "unaffected").close()


def test_client_properties_from_toml(tmp_path: Path) -> None:
    from runtime.settings import load

    toml = tmp_path / "gpl.toml"
    toml.write_text('[kafka.extra]\n"client.id" = "from-toml"\n[kafka.producer_extra]\n"compression.type" = "zstd"\n'
                    '"linger.ms" = 20\n')
    s = load(toml, env={"GPL_KAFKA__CONSUMER_EXTRA": '{"fetch.min.bytes": 1024}'})
    assert s.kafka.extra == {"client.id": "from-toml"}
    assert s.kafka.producer_extra == {"compression.type": "zstd", "linger.ms": 20}
    assert s.kafka.consumer_extra == {"fetch.min.bytes": 1024}
    assert s.kafka.client_config()["client.id"] == "from-toml"
