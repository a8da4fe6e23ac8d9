"""The indexer on the real broker and the real embedded engine: items in, vectors out, bad input to DLQ.

Checks the three promises of the indexer: every good item ends up in ``items__<encoder>`` with its text
as payload; every bad message ends up in ``items.dlq`` with its original bytes, a reason and its origin
offset; an item already indexed under this encoder is never embedded again (even after a restart).
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, TopicPartition

from runtime.encoder import HashEncoder
from runtime.kafka import consumer, producer
from runtime.settings import Settings
from runtime.vectors.edge import EdgeIndex
from schemas.codec import decode, encode
from schemas.events import DeadLetter, ItemEvent
from workers.indexer import Indexer


@pytest.fixture
def settings(broker_settings: Settings) -> Settings:
    """This file's integration tests on the suite's broker (tests/fixtures/brokers.py: Apache Kafka by default)."""
    return broker_settings


pytestmark = pytest.mark.integration


class CountingEncoder:
    """The hashing encoder, remembering every text it was asked to embed."""

    def __init__(self) -> None:
        self._inner = HashEncoder()
        self.id = self._inner.id
        self.dim = self._inner.dim
        self.texts: list[str] = []
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            self.texts.extend(texts)
        return self._inner.encode(texts)


def produce(settings: Settings, records: list[tuple[bytes, bytes]]) -> dict[bytes, tuple[int, int]]:
    """Produce (key, value) to ``items``; returns value -> (partition, offset) as the broker assigned."""
    p = producer(settings.kafka)
    where: dict[bytes, tuple[int, int]] = {}

    def delivered(err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        where[msg.value() or b""] = (msg.partition() or 0, msg.offset() or 0)

    for key, value in records:
        p.produce("items", value, key=key, on_delivery=delivered)
        p.poll(0)
    assert p.flush(15) == 0
    return where


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture
def index(tmp_path: Path) -> Iterator[EdgeIndex]:
    with EdgeIndex(tmp_path / "qdrant") as idx:
        yield idx


def run_indexer(indexer: Indexer, until: Callable[[], bool]) -> None:
    stop = threading.Event()
    t = threading.Thread(target=indexer.run, args=(stop,), kwargs={"batch": 64}, daemon=True)
    t.start()
    try:
        wait_for(until)
    finally:
        stop.set()
        t.join(15)
    assert not t.is_alive(), "indexer did not stop"


def settled(acc: dict[str, int]) -> int:
    """Messages that reached an outcome (everything except ``in``)."""
    return sum(v for k, v in acc.items() if k != "in")


def test_indexer_end_to_end(settings: Settings, index: EdgeIndex) -> None:
    s = settings.with_overrides(encoder={"model": "hash-bow-64"})
    col = s.encoder.collection
    assert col == "items__hash-bow-64"
    n = 30
    good = [ItemEvent(item_id=i, text=f"item {i} red shoes size {i % 7}", category=f"c{i % 3}", ts=1)
            for i in range(n)]
    malformed = b'{"item_id": 5, "text": '
    invalid = orjson.dumps({"item_id": -4, "text": ""})
    dup = ItemEvent(item_id=3, text="item 3 a later edit", category="c0")
    records = [(str(ev.item_id).encode(), encode(ev)) for ev in good]
    records[10:10] = [(b"5", malformed)]
    records[20:20] = [(b"x", invalid)]
    records.append((b"3", encode(dup)))
    where = produce(s, records)

    enc = CountingEncoder()
    indexer = Indexer(s, index, enc, progress=False)
    acc = indexer.accounting
    run_indexer(indexer, lambda: acc["in"] == len(records) and settled(acc.snapshot()) == len(records))

    # accounting adds up: everything that came in left somewhere
    snap = acc.snapshot()
    assert snap["in"] == n + 3
    assert snap["indexed"] == n
    assert snap["dlq:malformed_json"] == 1 and snap["dlq:schema"] == 1
    # the edit of item 3 either shares a batch with the original (the last event wins, the first is
    # superseded) or comes later (item 3 is then known and the edit is skipped): batching decides
    assert snap.get("superseded", 0) + snap.get("skipped_known", 0) == 1
    assert settled(snap) == snap["in"]
    texts = [ev.text for ev in good]
    if snap.get("superseded"):
        texts[3] = dup.text

    # every good item is in the collection, with its text as payload, embedded once
    assert index.count(col) == n
    got = index.retrieve(col, list(range(n)), with_payload=True)
    assert got.ids.tolist() == list(range(n))
    assert [p["text"] for p in got.payloads] == texts
    assert got.payloads[4]["category"] == "c1"
    np.testing.assert_allclose(got.vectors, HashEncoder().encode(texts), atol=1e-6)
    assert sorted(enc.texts) == sorted(texts)

    # both bad messages are in the DLQ, with their bytes, reason and origin
    c = consumer(s.kafka, "test-dlq-reader")
    # assign, not subscribe: reading every partition needs no group join (seconds on the broker)
    c.assign([TopicPartition("items.dlq", part, OFFSET_BEGINNING) for part in range(s.kafka.partitions)])
    letters: list[DeadLetter] = []
    deadline = time.monotonic() + 30
    while len(letters) < 2 and time.monotonic() < deadline:
        for m in c.consume(10, timeout=0.5):
            if m.error() is None:
                letters.append(decode(m.value(), DeadLetter))
    c.close()
    assert len(letters) == 2
    by_reason = {dl.reason: dl for dl in letters}
    assert set(by_reason) == {"malformed_json", "schema"}
    for reason, raw in (("malformed_json", malformed), ("schema", invalid)):
        dl = by_reason[reason]
        assert base64.b64decode(dl.value) == raw
        assert (dl.partition, dl.offset) == where[raw]
        assert dl.topic == "items" and dl.stage == "indexer" and dl.error
    assert by_reason["malformed_json"].key == "5"

    # a restart resumes after the committed offsets; a re-sent known item is not embedded again
    again = ItemEvent(item_id=7, text="item 7 text changed upstream", category="c1")
    fresh = ItemEvent(item_id=1000, text="brand new blue hat", category="c2")
    produce(s, [(b"7", encode(again)), (b"1000", encode(fresh))])
    enc2 = CountingEncoder()
    indexer2 = Indexer(s, index, enc2, progress=False)
    acc2 = indexer2.accounting
    run_indexer(indexer2, lambda: acc2["in"] >= 2 and settled(acc2.snapshot()) == acc2["in"])
    snap2 = acc2.snapshot()
    assert snap2 == {"in": 2, "indexed": 1, "skipped_known": 1}  # nothing from the first run re-read
    assert enc2.texts == [fresh.text]
    assert index.count(col) == n + 1
    assert index.retrieve(col, [7], with_payload=True).payloads[0]["text"] == good[7].text
    assert index.search(col, HashEncoder().encode([fresh.text])[0], 1)[0][0] == 1000
