"""Reliability of the streams stage on the real broker: event-time expiry, restarts, bad input, unknown items.

Each test runs on the suite's real broker (Apache Kafka, topics per test; tests/fixtures/brokers.py) and starts
the faust app; events carry explicit event times.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faust.transport.drivers.aiokafka as faust_kafka
import numpy as np
import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from runtime.broker import Broker
from runtime.encoder import HashEncoder
from runtime.kafka import Accounting, create_topics
from runtime.stage_io import StageIO
from runtime.vectors.index import Points
from runtime.vectors.memory import MemoryIndex
from schemas.events import ItemEvent
from schemas.topics import expiry_topic
from streams.app import StreamsProcessor
from tests.fixtures.settings import make_settings
from tests.helpers import drain, item_index, produce, running, wait_for
from tests.integration.test_streams import ITEMS, exposure, recall

pytestmark = pytest.mark.integration


def partition_of(user: str, partitions: int) -> int:
    """The partition the producers (murmur2, like the Java client) send a user's events to."""
    every = list(range(partitions))
    return int(DefaultPartitioner()(user.encode(), every, every))


def users_on(partitions: int, n: int) -> list[str]:
    """``n`` users on ``n`` different partitions (all on partition 0 when there is one)."""
    seen: dict[int, str] = {}
    for i in range(1000):
        seen.setdefault(partition_of(f"user{i}", partitions), f"user{i}")
    return [seen[p % partitions] if partitions > 1 else f"user{p}" for p in range(n)]


@pytest.mark.parametrize("partitions", [1, 3])
def test_event_time_expiry_out_of_order_and_per_partition(tmp_path: Path, broker: Broker,
                                                          partitions: int) -> None:
    """wait 2 s, lateness 1 s: a request expires only when both inputs of its own partition (recall and
    exposure) are 3 s of event time past it; wall-clock time alone expires nothing."""
    s = make_settings(tmp_path, broker, partitions=partitions,
                      streams={"join_wait_s": 2.0, "allowed_lateness_s": 1.0, "debounce_s": 0})
    create_topics(s.kafka)
    proc = StreamsProcessor(s, item_index(ITEMS, s.encoder.collection))
    a, b = users_on(partitions, 2)
    own = partitions > 1  # a and b on different partitions
    # out of order: a2 is 2,900 ms past a1 and comes before a3
    produce(s, "recall", [recall("a1", a, [1, 2, 3], ts=10_000), recall("a2", a, [4, 5], ts=12_900),
                          recall("a3", a, [6, 7], ts=11_000), recall("b1", b, [1, 2], ts=10_000)])
    with running(proc, "streams"):
        wait_for(lambda: proc.accounting["recall_in"] == 4, 60, "the recalls")
        time.sleep(3.0)  # longer than join_wait_s on the wall clock: nothing expires without events
        produce(s, "exposure", [exposure("a1", a, [1], {1}, ts=10_500)])  # in time by event time
        wait_for(lambda: proc.accounting["joined"] == 2, 30, "a1 to join")
        assert proc.accounting["expired"] == 0 and proc.waiting == 3
        # both inputs of a's partition reach 14,001: watermark 13,001 passes a3 (11,000 + 2,000), not a2
        produce(s, "recall", [recall("a4", a, [8], ts=14_001)])
        produce(s, "exposure", [exposure("a5", a, [8], set(), ts=14_001)])
        wait_for(lambda: proc.accounting["expired"] == (1 if own else 2), 30,  # one partition: b1 too
                 lambda: f"a3 to expire: {proc.accounting.snapshot()}")
        time.sleep(1.0)
        assert proc.accounting["expired"] == (1 if own else 2), "b1 waits for its own partition's events"
        produce(s, "recall", [recall("b10", b, [3], ts=20_000)])
        produce(s, "exposure", [exposure("b9", b, [2], set(), ts=20_000)])
        wait_for(lambda: proc.accounting["expired"] == (2 if own else 4), 30,
                 lambda: f"b1 to expire: {proc.accounting.snapshot()}")
        time.sleep(1.0)
    acc = proc.accounting.snapshot()
    assert acc["expired"] == (2 if own else 4), "a's requests wait for a's own events"
    assert acc.get("exposure_only", 0) == (0 if own else 1) and proc.waiting == (5 if own else 2), acc
    assert acc["joined"] == 2 and not any(k.startswith("dlq:") for k in acc), acc


def test_downtime_restart_reread_and_duplicates(tmp_path: Path, broker: Broker,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped for longer than join_wait_s: nothing expires. The first worker never commits (a crash after
    processing), so the second re-reads every recall it already holds: re-reads, not duplicates. A real
    duplicate after the restart (same request, new offset) is still caught: the markers are durable."""
    s = make_settings(tmp_path, broker, partitions=2, streams={"join_wait_s": 1.0})
    create_topics(s.kafka)
    index = item_index(ITEMS, s.encoder.collection)
    first = StreamsProcessor(s, index)

    async def no_commit(self: Any, offsets: Any) -> bool:
        return True

    produce(s, "recall", [recall(f"q{i}", f"u{i % 5}", [1 + i, 2 + i, 3 + i], ts=1_000 + i) for i in range(20)])
    produce(s, "exposure", [exposure("q0", "u0", [1], set(), ts=1_050)])
    with monkeypatch.context() as mp:
        mp.setattr(faust_kafka.Consumer, "_commit", no_commit)
        with running(first, "streams-1"):
            wait_for(lambda: first.waiting == 19 and first.accounting["joined"] == 2, 60, "recalls to wait")
            time.sleep(1.0)  # let the changelog writes be acknowledged
    time.sleep(2.5)  # downtime longer than join_wait_s
    produce(s, "exposure", [exposure(f"q{i}", f"u{i % 5}", [1 + i], set(), ts=1_100 + i) for i in range(1, 20)])
    produce(s, "recall", [recall("q0", "u0", [1, 2], ts=1_200)])  # a real duplicate, after the restart
    second = StreamsProcessor(s, index)
    with running(second, "streams-2"):
        wait_for(lambda: second.accounting["joined"] == 38 and second.accounting["dlq:duplicate"] == 1, 60,
                 lambda: f"all to join after the restart: {second.accounting.snapshot()}")
    acc = second.accounting.snapshot()
    assert acc["reread"] == 21, acc  # 20 recalls + the exposure of q0, read again
    assert acc.get("expired", 0) == 0 and acc["dlq:duplicate"] == 1 and second.waiting == 0, acc
    dlq = drain(s, "recall.dlq", expect=1)
    assert [(d["reason"], d["offset"]) for d in dlq] == [("duplicate", 20)]


class FaultyIndex(MemoryIndex):
    """A vector index that fails for one item id: an exception inside the agent's processing."""

    def retrieve(self, name: str, ids: Sequence[int] | np.ndarray, *, with_payload: bool = False) -> Points:
        if 666 in list(ids):
            raise RuntimeError("index unavailable for item 666")
        return super().retrieve(name, ids, with_payload=with_payload)


def test_bad_input_and_failures_end_in_the_dlq(tmp_path: Path, broker: Broker) -> None:
    s = make_settings(tmp_path, broker, partitions=1,
                      streams={"max_candidates": 30, "join_wait_s": 5.0})
    create_topics(s.kafka)
    enc = HashEncoder()
    index = FaultyIndex()
    index.ensure_collection(s.encoder.collection, enc.dim)
    index.upsert(s.encoder.collection, Points(np.arange(1, 51, dtype=np.int64), enc.encode([i.text for i in ITEMS]),
                                              [{} for _ in ITEMS]))
    proc = StreamsProcessor(s, index)
    huge = orjson.dumps({"request_id": "big", "user_id": "u1", "ts": 1,
                         "candidates": [{"item_id": i} for i in range(100_000)]})
    bad = [orjson.dumps({"request_id": "t", "user_id": "u1", "ts": 2**63, "candidates": [{"item_id": 1}]}),
           orjson.dumps({"request_id": "l", "user_id": "u" * 70_000, "ts": 1, "candidates": [{"item_id": 1}]}),
           huge,
           orjson.dumps({"request_id": "f", "user_id": "u1", "ts": 1, "candidates": [{"item_id": 666}]})]
    produce(s, "recall", [*bad], keys=["u1", "u" * 70_000, "u1", "u1"])
    produce(s, "recall", [recall("ok", "u1", [1, 2, 3], ts=5)])
    produce(s, "exposure", [exposure("ok", "u1", [1], {1}, ts=6)])
    with running(proc, "streams"):
        wait_for(lambda: proc.accounting["joined"] == 2, 60, lambda: f"the join after: {proc.accounting.snapshot()}")
        dlq = drain(s, "recall.dlq", expect=4)
    # a producer without idempotence may reorder on a retry (a new topic's first produce): the letters
    # are matched to their inputs by the original bytes (the oversized one by its digest), not by order
    def which(d: dict[str, object]) -> int:
        if "sha256" in d:
            return next(i for i, b in enumerate(bad) if hashlib.sha256(b).hexdigest() == d["sha256"])
        return bad.index(base64.b64decode(str(d["value"])))

    by_input = sorted(dlq, key=which)
    assert [d["reason"] for d in by_input] == ["schema", "schema", "oversized", "processing_error"]
    assert sorted(d["offset"] for d in dlq) == [0, 1, 2, 3]
    assert "RuntimeError: index unavailable for item 666" in by_input[3]["error"]
    assert base64.b64decode(by_input[3]["value"]) == bad[3]
    big = by_input[2]
    assert big["original_size"] == len(huge) and big["sha256"] == hashlib.sha256(huge).hexdigest()
    assert huge.startswith(base64.b64decode(big["value"])) and len(orjson.dumps(big)) < 1_000_000
    assert "original_size" not in by_input[0]
    assert proc.accounting["dlq:processing_error"] == 1 and proc.waiting == 0


def test_unknown_items_dropped_by_default(tmp_path: Path, broker: Broker) -> None:
    s = make_settings(tmp_path, broker, partitions=2, streams={"join_wait_s": 30.0})
    create_topics(s.kafka)
    proc = StreamsProcessor(s, item_index(ITEMS, s.encoder.collection))
    produce(s, "recall", [recall("r1", "u1", [1, 998, 2, 3, 999], ts=10), recall("r2", "u2", [997], ts=10)])
    produce(s, "exposure", [exposure("r1", "u1", [1], set(), ts=11), exposure("r2", "u2", [], set(), ts=11)])
    with running(proc, "streams"):
        wait_for(lambda: proc.accounting["joined"] == 4, 60, lambda: f"joins: {proc.accounting.snapshot()}")
        unexposed = drain(s, "unexposed", expect=1)
    assert [(u["request_id"], u["item_ids"]) for u in unexposed] == [("r1", [2, 3])]
    acc = proc.accounting.snapshot()
    assert acc["unknown_candidates_dropped"] == 3 and acc["recalls_with_unknown"] == 2
    assert not any(k.startswith("dlq:") for k in acc), acc


def test_unknown_items_held_until_indexed_or_timeout(tmp_path: Path, broker: Broker) -> None:
    """hold: r1 waits until the indexer has item 60 and then joins with it; r2's item never comes, so at
    the end of its hold it goes on without it (counted); r3 comes when the hold is full: dropped at once."""
    s = make_settings(tmp_path, broker, partitions=2,
                      streams={"join_wait_s": 60.0, "unknown_items": "hold", "unknown_hold_s": 6.0,
                               "unknown_hold_max": 2})
    create_topics(s.kafka)
    index = item_index(ITEMS, s.encoder.collection)
    proc = StreamsProcessor(s, index)
    produce(s, "exposure", [exposure("r1", "u1", [1], {1}, ts=10)])  # the exposure may come first
    produce(s, "recall", [recall("r1", "u1", [1, 60, 2], ts=10), recall("r2", "u2", [3, 999], ts=10),
                          recall("r3", "u3", [4, 998], ts=10)])
    with running(proc, "streams"):
        wait_for(lambda: proc.accounting["unknown_held"] == 2 and proc.accounting["recall_in"] == 3, 60, "holds")
        assert proc.accounting["joined"] == 0 and len(proc.held) == 2
        late = ItemEvent(item_id=60, text="genre0 movie number 60")
        index.upsert(s.encoder.collection, Points(np.array([60], np.int64), HashEncoder().encode([late.text]),
                                                  [{"text": late.text}]))
        wait_for(lambda: proc.accounting["joined"] == 2, 30, lambda: f"r1 to join: {proc.accounting.snapshot()}")
        produce(s, "exposure", [exposure("r2", "u2", [3], set(), ts=11), exposure("r3", "u3", [4], set(), ts=11)])
        wait_for(lambda: proc.accounting["joined"] == 6, 30, lambda: f"r2 after its hold: {proc.accounting.snapshot()}")
        unexposed = drain(s, "unexposed", expect=1)
    assert sorted((u["request_id"], u["item_ids"]) for u in unexposed) == [("r1", [60, 2])]
    acc = proc.accounting.snapshot()
    assert acc["unknown_released"] == 1 and acc["unknown_hold_timeout"] == 1 and acc["unknown_hold_full"] == 1
    assert acc["unknown_candidates_dropped"] == 2 and proc.waiting == 0 and not proc.held


def test_stage_io_processing_errors_and_oversized_dead_letters(tmp_path: Path, broker: Broker) -> None:
    s = make_settings(tmp_path, broker, partitions=1, kafka={"max_message_bytes": 200_000})
    assert expiry_topic() in create_topics(s.kafka), "operators create the internal topic with the others"
    produce(s, "items", [ItemEvent(item_id=1, text="a"), ItemEvent(item_id=2, text="b")])
    acc = Accounting("test")
    with StageIO(s.kafka, "test", acc) as io:
        io.subscribe(["items"])
        got: list[Any] = []
        deadline = time.monotonic() + 30
        while len(got) < 2 and time.monotonic() < deadline:
            got += io.poll(10, 0.5)
        for m in got:
            with io.processing(m):
                if m.offset() == 1:
                    raise ValueError("a bug in the domain step")
                io.done(m)
        big = b"x" * 500_000  # over the producer's limit once base64-encoded
        io.dlq.send_raw("items", 0, 9, b"k", big, ValueError("too big"), reason="oversized")
        assert io.commit()
    dlq = drain(s, "items.dlq", expect=2)
    assert [(d["reason"], d["offset"]) for d in dlq] == [("processing_error", 1), ("oversized", 9)]
    assert "ValueError: a bug in the domain step" in dlq[0]["error"] and "original_size" not in dlq[0]
    assert dlq[1]["original_size"] == 500_000 and dlq[1]["sha256"] == hashlib.sha256(big).hexdigest()
    assert acc["dlq:processing_error"] == 1


def test_idle_partition_expires_the_last_requests(tmp_path: Path, broker: Broker) -> None:
    """The stream stops: no later event moves event time, so the idle advance (wall clock, while running)
    expires the last request instead of the memory guard."""
    s = make_settings(tmp_path, broker, partitions=2,
                      streams={"join_wait_s": 1.0, "allowed_lateness_s": 0.0, "idle_advance_s": 2.0})
    create_topics(s.kafka)
    proc = StreamsProcessor(s, item_index(ITEMS, s.encoder.collection))
    produce(s, "recall", [recall("last", "u1", [1, 2], ts=int(time.time() * 1000))])
    with running(proc, "streams"):
        wait_for(lambda: proc.accounting["recall_in"] == 1, 60, "the recall")
        time.sleep(1.5)
        assert proc.accounting["expired"] == 0, "not idle long enough yet"
        wait_for(lambda: proc.accounting["expired"] == 1, 30, lambda: f"idle expiry: {proc.accounting.snapshot()}")
    assert proc.accounting["expired_memory_guard"] == 0 and proc.waiting == 0


def test_memory_guard_expires_apart(tmp_path: Path, broker: Broker) -> None:
    """Event time never moves (idle advance off): the wall-clock memory guard bounds the state, counted
    apart from event-time expiry; an exposure that the guard expires still gives its real labels."""
    s = make_settings(tmp_path, broker, partitions=2,
                      streams={"join_wait_s": 1.0, "idle_advance_s": 0.0, "join_memory_guard_s": 3.0})
    create_topics(s.kafka)
    proc = StreamsProcessor(s, item_index(ITEMS, s.encoder.collection))
    produce(s, "recall", [recall("g1", "u1", [1, 2], ts=1_000)])
    produce(s, "exposure", [exposure("g2", "u2", [3], {3}, ts=1_000)])
    with running(proc, "streams"):
        wait_for(lambda: proc.accounting["expired_memory_guard"] == 1
                 and proc.accounting["exposure_only_memory_guard"] == 1, 60,
                 lambda: f"the guard: {proc.accounting.snapshot()}")
        samples = drain(s, "samples", expect=1)
    assert [(b["request_id"], [x["item_id"] for x in b["samples"]]) for b in samples] == [("g2", [3])]
    assert proc.accounting["expired"] == 0 and proc.waiting == 0
