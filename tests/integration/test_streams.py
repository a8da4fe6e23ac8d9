"""The streams processor on the real broker: join, unexposed, real labels, expiry, DLQ, interest.

Run with 1 and 3 partitions; events arrive out of order (an exposure before its recall).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import faust.transport.consumer
import pytest

from runtime.broker import Broker
from runtime.kafka import create_topics
from schemas.events import Candidate, ExposedItem, ExposureEvent, ItemEvent, RecallEvent
from streams.app import StreamsProcessor
from tests.fixtures.settings import make_settings
from tests.helpers import drain, drain_raw, item_index, produce, running, wait_for

pytestmark = pytest.mark.integration

ITEMS = [ItemEvent(item_id=i, text=f"genre{i % 5} movie number {i}", category=f"g{i % 5}") for i in range(1, 51)]


def recall(rid: str, user: str, ids: list[int], ts: int = 1_000) -> RecallEvent:
    return RecallEvent(request_id=rid, user_id=user, ts=ts,
                       candidates=[Candidate(item_id=i, score=1.0 / (n + 1), source="test") for n, i in enumerate(ids)])


def exposure(rid: str, user: str, shown: list[int], clicked: set[int], ts: int = 2_000) -> ExposureEvent:
    return ExposureEvent(request_id=rid, user_id=user, ts=ts,
                         items=[ExposedItem(item_id=i, position=p, clicked=i in clicked) for p, i in enumerate(shown)])


@pytest.mark.parametrize("partitions", [1, 3])
def test_join_unexposed_expiry_dlq(tmp_path: Path, broker: Broker, partitions: int) -> None:
    s = make_settings(tmp_path, broker, partitions=partitions,
                      streams={"join_wait_s": 2.0, "allowed_lateness_s": 0.0, "max_candidates": 30, "debounce_s": 0,
                               "unknown_items": "dlq"})
    create_topics(s.kafka)
    index = item_index(ITEMS, s.encoder.collection)
    proc = StreamsProcessor(s, index)

    produce(s, "exposure", [exposure("r2", "u2", [5, 6], {6})])  # exposure first
    produce(s, "recall", [recall("r1", "u1", list(range(1, 21))), recall("r2", "u2", list(range(5, 16))),
                          recall("r3", "u3", list(range(1, 11)))])
    produce(s, "exposure", [exposure("r1", "u1", [1, 2, 3], {1})])
    # bad input, each must reach the DLQ with its reason
    produce(s, "recall", [b"{not json", recall("r1", "u1", [1, 2]),  # malformed, duplicate
                          recall("r4", "u4", [1, 999]),  # unknown item id
                          RecallEvent(request_id="r5", user_id="u5", ts=1, candidates=[]),  # empty
                          recall("r6", "u6", list(range(1, 41)))],  # oversized (> 30)
            keys=["x", "u1", "u4", "u5", "u6"])
    produce(s, "exposure", [b'{"request_id": "r7", "user_id": "u7", "ts": 1}'], keys=["u7"])  # no items

    with running(proc, "streams"):
        wait_for(lambda: proc.accounting["joined"] == 4, 60, "r1 and r2 to join")
        # r3 expires by event time: a later request of u3 (same partition) moves the watermark past 1,000 + 2,000
        produce(s, "recall", [recall("r8", "u3", [1, 2], ts=3_500)])
        produce(s, "exposure", [exposure("r8", "u3", [2], set(), ts=3_600)])
        wait_for(lambda: proc.accounting["expired"] == 1, 60, "r3 to expire")
        produce(s, "exposure", [exposure("r3", "u3", [1], {1}, ts=3_000)])  # late: after expiry
        wait_for(lambda: proc.accounting["late_exposure"] == 1, 30, "late exposure")
        unexposed = drain(s, "unexposed", expect=3)
        raw_unexposed = drain_raw(s, "unexposed", expect=3)
        samples = drain(s, "samples", expect=4)
        dlq_r = drain(s, "recall.dlq", expect=5)
        dlq_e = drain(s, "exposure.dlq", expect=1)
        requests = drain(s, "anchor-requests", expect=3)

    by_req = {u["request_id"]: u for u in unexposed}
    assert set(by_req) == {"r1", "r2", "r8"}
    assert by_req["r1"]["item_ids"] == list(range(4, 21))
    assert by_req["r2"]["item_ids"] == list(range(7, 16))
    # on the wire: schema_version 2, the small ids packed as uint32 (streams.unexposed_schema_version)
    assert all(b'"item_ids_le32"' in v and b'"item_ids"' not in v and b'"schema_version":2' in v
               for v in raw_unexposed)
    # every exposed item gets exactly one real label
    labels = [(b["request_id"], x["item_id"], x["label"], x["source"]) for b in samples for x in b["samples"]]
    assert sorted(labels) == sorted([
        ("r1", 1, 1.0, "click"), ("r1", 2, 0.0, "exposed-negative"), ("r1", 3, 0.0, "exposed-negative"),
        ("r2", 5, 0.0, "exposed-negative"), ("r2", 6, 1.0, "click"), ("r3", 1, 1.0, "click"),
        ("r8", 2, 0.0, "exposed-negative")])
    assert sorted(d["reason"] for d in dlq_r) == ["duplicate", "empty_candidates", "malformed_json", "oversized",
                                                  "unknown_items"]
    assert all(d["topic"] == "recall" and d["offset"] >= 0 and d["value"] for d in dlq_r)
    assert [d["reason"] for d in dlq_e] == ["schema"]
    assert sorted((r["user_id"], r["reason"]) for r in requests) == [
        ("u1", "cold_start"), ("u2", "cold_start"), ("u3", "cold_start")]
    acc = proc.accounting.snapshot()
    # accounting: 10 recall messages + 6 exposure messages in, each in one outcome
    assert acc["joined"] == 6 and acc["expired"] == 1 and acc["late_exposure"] == 1
    assert sum(v for k, v in acc.items() if k.startswith("dlq:")) == 6
    assert proc.waiting == 0
    assert acc["unexposed_candidates"] == 17 + 9 + 1


def test_exposure_only_expires_and_app_keeps_going(tmp_path: Path, broker: Broker) -> None:
    """A clicked exposure whose recall never comes: at expiry its real labels are still produced and the
    user's interest is updated (a table write: it must happen inside stream iteration, not in the timer,
    where faust raised and killed the agent), and the app keeps processing later messages."""
    s = make_settings(tmp_path, broker, partitions=2,
                      streams={"join_wait_s": 1.0, "allowed_lateness_s": 0.0, "debounce_s": 0})
    create_topics(s.kafka)
    proc = StreamsProcessor(s, item_index(ITEMS, s.encoder.collection))
    produce(s, "exposure", [exposure("lonely", "u1", [1, 2], {2})])
    # a later request of u1 (same partition, both inputs) moves event time past the lonely exposure's wait
    produce(s, "recall", [recall("later", "u1", [4], ts=9_000)])
    produce(s, "exposure", [exposure("later", "u1", [4], set(), ts=9_100)])
    with running(proc, "streams"):
        wait_for(lambda: proc.accounting["exposure_only"] == 1, 30,
                 lambda: f"the exposure to expire alone: {proc.accounting.snapshot()}")
        # later messages are still processed: a normal join after the expiry
        produce(s, "recall", [recall("after", "u2", [3, 4, 5], ts=9_000)])
        produce(s, "exposure", [exposure("after", "u2", [3], {3}, ts=9_050)])
        wait_for(lambda: proc.accounting["joined"] == 4, 30,
                 lambda: f"a join after the expiry: {proc.accounting.snapshot()}")
        samples = drain(s, "samples", expect=3)
        requests = drain(s, "anchor-requests", expect=2)
    labels = sorted((b["request_id"], x["item_id"], x["label"]) for b in samples for x in b["samples"])
    assert labels == [("after", 3, 1.0), ("later", 4, 0.0), ("lonely", 1, 0.0), ("lonely", 2, 1.0)]
    assert sorted((r["user_id"], r["reason"]) for r in requests) == [("u1", "cold_start"), ("u2", "cold_start")]
    assert proc.waiting == 0
    acc = proc.accounting.snapshot()
    assert not any(k.startswith("dlq:") for k in acc), acc


def fetch_before_seek(monkeypatch: pytest.MonkeyPatch, proc: StreamsProcessor) -> list[int]:
    """Make the race behind lost joins happen every time instead of ~1 run in 3.

    At the end of table recovery faust resumes the stream partitions, then seeks them to their committed
    offsets. A fetch of faust's fetch loop landing there drained stream records that faust then dropped (flow
    still stopped, or the partition paused again), and the seek did not rewind a partition without a commit.
    This hook fetches exactly there, the way faust's fetch loop does (``consumer._getmany`` with the live set
    of active partitions), and throws the records away as faust did. Returns the number of stream records each
    forced fetch got (0 once the transport refuses to fetch stream partitions during a rebalance).

    Patched on the class: touching ``proc.app.consumer`` here would build the consumer on the wrong event loop.
    """
    fetched: list[int] = []
    original = faust.transport.consumer.Consumer.perform_seek

    async def perform_seek(self: Any) -> None:
        if self.app is proc.app:
            records = await self._getmany(self._get_active_partitions(), timeout=2.0)
            fetched.append(sum(len(v) for tp, v in records.items() if tp.topic in ("recall", "exposure")))
        await original(self)

    monkeypatch.setattr(faust.transport.consumer.Consumer, "perform_seek", perform_seek)
    return fetched


def test_pending_table_survives_restart(tmp_path: Path, any_broker: Broker) -> None:
    """A recall waiting in the changelogged table is joined by an exposure that comes after a restart (on
    Kafka with the product's batched producers: table recovery reads up to exact watermarks)."""
    restart_and_join(tmp_path, any_broker, partitions=2)


def test_restart_loses_nothing_fetched_during_rebalance(tmp_path: Path, broker: Broker,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with the race of the test above forced (DESIGN.md §5.1, streams/transport.py)."""
    fetched = restart_and_join(tmp_path, broker, partitions=3, force_race=monkeypatch)
    assert fetched, "the hook ran"


def restart_and_join(tmp_path: Path, broker: Broker, partitions: int,
                     force_race: pytest.MonkeyPatch | None = None) -> list[int]:
    """60 recalls wait in the table of a first worker; 60 exposures are produced while no worker runs, so they
    sit in partitions without a committed offset while the second worker rebalances and recovers: every
    request must be joined by the second worker, once."""
    s = make_settings(tmp_path, broker, partitions=partitions, streams={"join_wait_s": 120.0})
    create_topics(s.kafka)
    index = item_index(ITEMS, s.encoder.collection)
    first = StreamsProcessor(s, index)
    produce(s, "recall", [recall(f"q{i}", f"u{i % 7}", [1 + i % 40, 2 + i % 40, 3 + i % 40]) for i in range(60)])
    with running(first, "streams-1"):
        wait_for(lambda: first.waiting == 60, 60, "recalls to wait")
        time.sleep(1.0)  # let the changelog writes be acknowledged
    second = StreamsProcessor(s, index)
    fetched = fetch_before_seek(force_race, second) if force_race else []
    produce(s, "exposure", [exposure(f"q{i}", f"u{i % 7}", [1 + i % 40], set()) for i in range(60)])
    with running(second, "streams-2"):
        # a lost exposure never comes back: 60 s is ample for the join itself (it takes a few seconds)
        wait_for(lambda: second.accounting["joined"] == 120, 60,
                 lambda: f"all 60 requests to join after restart: {second.accounting.snapshot()}")
    assert second.accounting["dlq:duplicate"] == 0
    assert second.accounting["exposure_in"] == 60
    return fetched
