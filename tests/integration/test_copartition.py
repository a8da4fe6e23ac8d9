"""Co-partitioning of recall and exposure: refused at start on a count mismatch, split requests counted."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka.admin import AdminClient, NewTopic

from runtime.broker import Broker
from runtime.kafka import Accounting, create_topics, producer
from runtime.producer import GplProducer
from runtime.vectors.memory import MemoryIndex
from schemas.codec import encode
from schemas.events import Candidate, ExposedItem, ExposureEvent, ItemEvent, RecallEvent
from streams.app import StreamsProcessor
from streams.copartition import SPLIT_REQUESTS, CopartitionError, SplitWatch, check_counts, verify_copartitioned
from streams.join import pending_exposure
from tests.fixtures.settings import make_settings
from tests.helpers import item_index, running, wait_for

ITEMS = [ItemEvent(item_id=i, text=f"movie {i}") for i in range(1, 11)]


def test_check_counts() -> None:
    check_counts({"recall": 4, "exposure": 4}, 4)
    check_counts({"recall": 4, "exposure": None}, 4)  # faust will create it with kafka.partitions
    with pytest.raises(CopartitionError, match=r"different partition counts \(exposure=3, recall=4\)"):
        check_counts({"recall": 4, "exposure": 3}, 4)
    with pytest.raises(CopartitionError, match="GPL_KAFKA__PARTITIONS=8"):
        check_counts({"recall": 8, "exposure": 8}, 4)


def test_split_watch_counts_only_splits() -> None:
    acc = Accounting("streams-test")
    watch = SplitWatch(acc)
    ev = ExposureEvent(request_id="r", user_id="u", ts=1, items=[ExposedItem(item_id=1, position=0, clicked=False)])
    first = pending_exposure(ev, encode(ev), 10, 2, 0)
    before = SPLIT_REQUESTS._value.get()
    assert not watch.joined(first, 2) and not watch.joined(None, 1)
    assert watch.joined(first, 0) and watch.joined(first, 1)
    assert acc["split_partitions"] == 2 and SPLIT_REQUESTS._value.get() == before + 2


@pytest.mark.integration
def test_streams_refuses_to_start_on_mismatched_topics(tmp_path: Path, broker: Broker) -> None:
    s = make_settings(tmp_path, broker, partitions=2)
    admin = AdminClient(s.kafka.client_config())
    for f in admin.create_topics([NewTopic("recall", num_partitions=2, replication_factor=1),
                                  NewTopic("exposure", num_partitions=3, replication_factor=1)]).values():
        f.result(30)
    wait_for(lambda: all(t in admin.list_topics(timeout=5).topics for t in ("recall", "exposure")), 30, "topics")
    with pytest.raises(CopartitionError, match="exposure=3, recall=2"):
        verify_copartitioned(s.kafka, ["recall", "exposure"])
    proc = StreamsProcessor(s, MemoryIndex())
    with pytest.raises(CopartitionError), running(proc, "streams"):
        pass
    assert proc.accounting.snapshot() == {}  # refused before faust started: nothing read


@pytest.mark.integration
def test_split_request_is_counted_and_contract_requests_are_not(tmp_path: Path, broker: Broker) -> None:
    """GplProducer's requests join in one partition; a recall sent by hand to another partition than its
    exposure (a foreign partitioner) still joins in this single process, and is counted as split."""
    s = make_settings(tmp_path, broker, partitions=3, streams={"join_wait_s": 30.0})
    create_topics(s.kafka)
    proc = StreamsProcessor(s, item_index(ITEMS, s.encoder.collection))
    with GplProducer(s.kafka) as p:
        for n in range(6):
            p.send_recall(RecallEvent(request_id=f"ok{n}", user_id=f"u{n}", ts=1_000,
                                      candidates=[Candidate(item_id=i) for i in range(1, 6)]))
            p.send_exposure(ExposureEvent(request_id=f"ok{n}", user_id=f"u{n}", ts=2_000,
                                          items=[ExposedItem(item_id=1, position=0, clicked=False)]))
        p.send_exposure(ExposureEvent(request_id="split", user_id="u0", ts=2_000,
                                      items=[ExposedItem(item_id=2, position=0, clicked=False)]))
    parts = list(range(3))
    exposure_partition = int(DefaultPartitioner()(b"u0", parts, parts))  # where GplProducer put its exposure
    raw = producer(s.kafka)
    raw.produce("recall", encode(RecallEvent(request_id="split", user_id="u0", ts=1_000,
                                             candidates=[Candidate(item_id=i) for i in range(1, 6)])),
                key=b"u0", partition=(exposure_partition + 1) % 3)
    assert raw.flush(10) == 0
    with running(proc, "streams"):
        wait_for(lambda: proc.accounting["joined"] == 14, 60, lambda: f"joins: {proc.accounting.snapshot()}")
    assert proc.accounting["split_partitions"] == 1

