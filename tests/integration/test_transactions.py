"""Exactly-once for the labeler (``kafka.transactional``, runtime/transactions.py) on the real broker.

The scenario: a labeler process labels a stream of requests, is killed with SIGKILL mid-traffic, and a new one
takes over. At-least-once (the default) may write a request's SampleBatch twice: once before the kill, once
more when the successor re-reads what was not committed. With transactions, the samples and the offsets are
committed together, so a ``read_committed`` reader finds every request exactly once; the killed process's open
transaction is aborted when its successor, with the same ``transactional.id``, calls ``init_transactions``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from runtime.kafka import consumer
from runtime.settings import Settings
from runtime.stage_io import StageIO
from runtime.transactions import transactional_id
from schemas.events import UnexposedBatch
from tests.fixtures.settings import make_settings
from tests.helpers import item_index, produce, wait_for
from tests.integration.test_labeler import ALL_IDS, ENC, ITEMS, _anchors, _committed_everything
from workers.labeler.loop import STAGE, Labeler

pytestmark = pytest.mark.integration

USERS = [f"u{i}" for i in range(8)]
REQUESTS = 1500  # a backlog: the first labeler is killed 0.3 s after it arrives


def _label_forever(settings: Settings) -> None:
    """A labeler child process: runs until it is killed."""
    Labeler(settings, item_index(ITEMS, settings.encoder.collection, ENC)).run(threading.Event())


def _samples(s: Settings, isolation: str) -> Counter[str]:
    """request id -> SampleBatches of it in ``samples``, read from the beginning with ``isolation``."""
    c = consumer(s.kafka, f"read-samples-{time.monotonic_ns()}", **{"isolation.level": isolation})
    c.assign([TopicPartition("samples", p, OFFSET_BEGINNING) for p in range(s.kafka.partitions)])
    seen: Counter[str] = Counter()
    quiet = time.monotonic()
    try:
        while time.monotonic() - quiet < 2.0:
            got = [m for m in c.consume(500, timeout=0.3) if m.error() is None]
            if got:
                quiet = time.monotonic()
            seen.update(str(orjson.loads(m.value() or b"{}").get("request_id")) for m in got)
    finally:
        c.close()
    return seen


def _kill_mid_traffic(s: Settings) -> dict[str, Any]:
    """Label REQUESTS requests with one labeler SIGKILLed mid-traffic and a second one finishing the work."""
    produce(s, "anchors", [_anchors(s, u, ["running shoes", "fantasy dragons"]) for u in USERS])
    ctx = mp.get_context("spawn")
    first = ctx.Process(target=_label_forever, args=(s,), daemon=True)
    first.start()

    def requests(start: int, stop: int) -> None:
        produce(s, "unexposed", [UnexposedBatch(request_id=f"r{j}", user_id=USERS[j % len(USERS)], ts=j,
                                                item_ids=ALL_IDS, recall_scores=[0.5] * len(ALL_IDS))
                                 for j in range(start, stop)])

    # the kill lands while a backlog is being labeled (256 requests a poll, one commit point each): after the
    # first samples, long before the last request
    requests(0, 20)
    wait_for(lambda: sum(_samples(s, "read_uncommitted").values()) > 0 or not first.is_alive(), 60,
             "the first labeler to join and write samples")
    requests(20, REQUESTS)
    time.sleep(0.3)
    assert first.is_alive() and first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    first.join(10)
    second = ctx.Process(target=_label_forever, args=(s,), daemon=True)
    second.start()
    try:
        wait_for(lambda: _committed_everything(s), 60, "the second labeler to commit every request")
        committed, uncommitted = _samples(s, "read_committed"), _samples(s, "read_uncommitted")
    finally:
        if second.pid is not None and second.is_alive():
            os.kill(second.pid, signal.SIGKILL)
        second.join(10)
    return {"committed": committed, "uncommitted": uncommitted}


def _traffic_settings(tmp_path: Path, broker: Any, transactional: bool) -> Settings:
    s = make_settings(tmp_path, broker, kafka={"transactional": transactional},
                      labeler={"wait_for_anchors_s": 30.0, "top_n": 2, "random_n": 2, "cap": 3})
    from runtime.kafka import create_topics

    create_topics(s.kafka)
    return s


def test_transactional_labeler_killed_mid_traffic_writes_each_request_once(tmp_path: Path, broker: Any) -> None:
    if getattr(broker, "name", "") != "kafka":
        pytest.skip("transactions need Apache Kafka (the embedded profile refuses kafka.transactional)")
    got = _kill_mid_traffic(_traffic_settings(tmp_path, broker, transactional=True))
    committed, uncommitted = got["committed"], got["uncommitted"]
    assert set(committed) == {f"r{j}" for j in range(REQUESTS)}, "every request labeled"
    assert max(committed.values()) == 1, f"duplicates: {[r for r, n in committed.items() if n > 1][:10]}"
    # what read_uncommitted sees beyond that is the killed process's aborted transaction (reported, not asserted)
    print(f"transactional: {sum(committed.values())} committed batches, "
          f"{sum(uncommitted.values()) - sum(committed.values())} more in aborted transactions")


@pytest.mark.slow  # the comparison run without transactions (the kill -9 suite covers at-least-once): `make test-all`
def test_at_least_once_labeler_killed_mid_traffic_loses_nothing(tmp_path: Path, broker: Any) -> None:
    """The same scenario without transactions: nothing lost; the duplicates, if any, are reported only
    (whether the kill lands between a flush and its commit is a matter of timing)."""
    got = _kill_mid_traffic(_traffic_settings(tmp_path, broker, transactional=False))
    committed = got["committed"]
    assert set(committed) == {f"r{j}" for j in range(REQUESTS)}, "every request labeled"
    print(f"at-least-once: {sum(n - 1 for n in committed.values())} duplicate batches of {REQUESTS} requests")


def test_the_setting_reaches_the_producer(tmp_path: Path, broker: Any) -> None:
    """kafka.transactional gives the labeler's StageIO a transactional producer with a stable id, whose
    transaction opens at start and is aborted on close; the consumer reads committed records only."""
    if getattr(broker, "name", "") != "kafka":
        pytest.skip("transactions need Apache Kafka")
    s = _traffic_settings(tmp_path, broker, transactional=True)
    tid = transactional_id(s.kafka, STAGE, "i0")
    assert tid == f"{s.kafka.group_prefix}-{STAGE}-i0"
    with StageIO(s.kafka, STAGE, Labeler(s, item_index(ITEMS, s.encoder.collection, ENC)).accounting,
                 transactional=s.kafka.transactional, instance="i0") as io:
        assert io.tx is not None and io.tx.open
        io.producer.produce("samples", b"{}", key=b"k")
        assert io.tx.commit({})  # an offsetless commit point: the record is now committed
    assert io.tx is not None and not io.tx.open and io.tx.aborted == 1  # close aborted the empty one
    assert _samples(s, "read_committed") == Counter({"None": 1})
    plain = StageIO(s.kafka.model_copy(update={"transactional": False}), STAGE, Labeler(s, item_index(
        ITEMS, s.encoder.collection, ENC)).accounting)
    with plain:
        assert plain.tx is None


def test_the_setting_is_refused_where_it_cannot_hold() -> None:
    """Off by default, on by its environment name; the embedded broker's profile (refetch_gaps) and a
    read_uncommitted consumer refuse it, in one line."""
    from runtime.settings import load

    assert not load(env={}).kafka.transactional
    assert load(env={"GPL_KAFKA__TRANSACTIONAL": "true"}).kafka.transactional
    with pytest.raises(ValueError, match="needs Apache Kafka"):
        make_settings(Path("/tmp"), "localhost:1", kafka={"transactional": True, "refetch_gaps": True})
    with pytest.raises(ValueError, match="read committed"):
        make_settings(Path("/tmp"), "localhost:1", kafka={"transactional": True,
                                                          "consumer_extra": {"isolation.level": "read_uncommitted"}})


def _read_all(io: StageIO, n: int) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline:
        got += io.poll(10, 0.5)
    return got


def test_an_aborted_transaction_rewinds_to_the_committed_offsets(tmp_path: Path, broker: Any) -> None:
    """A record the broker refuses makes the transaction abortable: StageIO aborts it, hands the partitions
    to the stage's revoke hook (its kept work is dropped, as on a rebalance), rewinds them to the committed
    offsets, and the work done again is committed once: a read_committed reader sees every output once."""
    if getattr(broker, "name", "") != "kafka":
        pytest.skip("transactions need Apache Kafka")
    from confluent_kafka.admin import AdminClient, NewTopic

    from runtime.kafka import Accounting, create_topics

    s = make_settings(tmp_path, broker, partitions=1, kafka={"transactional": True})
    create_topics(s.kafka, ["unexposed", "samples"])
    admin = AdminClient({"bootstrap.servers": s.kafka.bootstrap_servers})  # kept: its futures need it alive
    admin.create_topics([NewTopic("tiny", 1, 1, config={"max.message.bytes": "1000"})])["tiny"].result(30)
    wait_for(lambda: "tiny" in admin.list_topics(timeout=5).topics, 10, "the tiny topic")
    produce(s, "unexposed", [f"in{i}".encode() for i in range(5)], keys=["k"] * 5)
    revoked: list[list[int]] = []
    with StageIO(s.kafka, STAGE, Accounting(STAGE), transactional=True, instance="abort") as io:
        io.subscribe(["unexposed"], on_revoke=lambda c, parts: revoked.append([tp.partition for tp in parts]))
        first = _read_all(io, 5)
        assert [m.offset() for m in first] == [0, 1, 2, 3, 4]
        for m in first[:3]:
            io.producer.produce("samples", b"out%d" % m.offset(), key=b"k")
            io.done(m)
        assert io.commit()
        for m in first[3:]:
            io.producer.produce("samples", b"out%d" % m.offset(), key=b"k")
            io.done(m)
        io.producer.produce("tiny", b"z" * 5000, key=b"k")  # refused by the broker: abort required
        io.commit()
        assert io.accounting["transactions_aborted"] == 1 and revoked == [[0]]
        again = _read_all(io, 2)
        assert [m.offset() for m in again] == [3, 4]  # from the committed offset, not from where it was
        for m in again:
            io.producer.produce("samples", b"out%d" % m.offset(), key=b"k")
            io.done(m)
        assert io.commit()
        assert io.tx is not None and io.tx.committed == 2 and io.tx.aborted == 1
    c = consumer(s.kafka, f"r-{time.monotonic_ns()}")
    c.assign([TopicPartition("samples", 0, OFFSET_BEGINNING)])
    values: list[bytes | None] = []
    deadline = time.monotonic() + 5
    while len(values) < 6 and time.monotonic() < deadline:
        values += [m.value() for m in c.consume(100, 0.5) if m.error() is None]
    c.close()
    assert values == [b"out0", b"out1", b"out2", b"out3", b"out4"]


def test_a_transaction_open_past_its_timeout_stops_the_stage(tmp_path: Path, broker: Any) -> None:
    """The broker aborts a transaction open longer than transaction.timeout.ms and bumps the producer's epoch;
    librdkafka then reports the producer fenced (fatal): the commit raises, nothing of it is visible, and
    close() returns (a restart resumes from the committed offsets)."""
    if getattr(broker, "name", "") != "kafka":
        pytest.skip("transactions need Apache Kafka")
    from confluent_kafka import KafkaException

    from runtime.kafka import Accounting, create_topics

    s = make_settings(tmp_path, broker, partitions=1, kafka={"transactional": True})
    create_topics(s.kafka, ["unexposed", "samples"])
    produce(s, "unexposed", [b"in0"], keys=["k"])
    io = StageIO(s.kafka, STAGE, Accounting(STAGE), transactional=True, instance="slow",
                 producer_config={"transaction.timeout.ms": 2000})
    with io:
        io.subscribe(["unexposed"])
        (m,) = _read_all(io, 1)
        io.producer.produce("samples", b"late", key=b"k")
        io.done(m)
        time.sleep(6)  # past the transaction's timeout: the broker aborts it
        with pytest.raises(KafkaException):
            io.commit()
        assert io.tx is not None and io.tx.fatal
        assert not io.commit()  # and stays refused (the loop's finally commits once more)
    assert _samples(s, "read_committed") == Counter()


def test_a_transactional_trainer_commits_its_dead_letters_with_its_offsets(tmp_path: Path, broker: Any) -> None:
    """The trainer's commit point is its checkpoint: the dead letters sent since the last one and the
    checkpoint's offsets go in one transaction, readable by read_committed consumers once it commits."""
    if getattr(broker, "name", "") != "kafka":
        pytest.skip("transactions need Apache Kafka")
    from runtime.kafka import create_topics
    from tests.integration import test_trainer as tt
    from workers.trainer import Trainer

    s = tt.tuned(make_settings(tmp_path, broker, kafka={"transactional": True}))
    create_topics(s.kafka)
    tt.produce(s, [tt.request(n) for n in range(4)] + [b"{not a batch"])
    trainer = Trainer(s, tt.item_index(s), progress=False)
    with tt.running(trainer):
        counts = trainer.accounting.snapshot
        wait_for(lambda: trainer.counts["samples"] == 28 and any(k.startswith("dlq:") for k in counts()), 30,
                 lambda: str(counts()))
    assert trainer.version >= 1
    c = consumer(s.kafka, f"dlq-{time.monotonic_ns()}")
    c.assign([TopicPartition("samples.dlq", q, OFFSET_BEGINNING) for q in range(s.kafka.partitions)])
    letters: list[Any] = []
    deadline = time.monotonic() + 10
    while not letters and time.monotonic() < deadline:
        letters = [m for m in c.consume(10, timeout=0.5) if m.error() is None]
    c.close()
    assert len(letters) == 1
    group = consumer(s.kafka, trainer.name)
    try:
        ends = {q: group.get_watermark_offsets(TopicPartition("samples", q), timeout=10)[1]
                for q in range(s.kafka.partitions)}
        done = group.committed([TopicPartition("samples", q) for q in range(s.kafka.partitions)], timeout=10)
    finally:
        group.close()
    # the checkpoint's offsets, committed in the transaction: the end of every partition that had records
    assert {tp.partition: tp.offset for tp in done if ends[tp.partition]} == {q: e for q, e in ends.items() if e}
