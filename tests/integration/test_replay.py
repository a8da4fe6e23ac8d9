"""Replays on the real embedded broker: a JSONL file, a time range of a topic, and paced replays."""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from gpl.replay import replay_jsonl, replay_topic
from gpl.simulate import SimConfig, load_movielens, simulate, write_jsonl
from runtime.broker import Broker, EmbeddedBroker
from runtime.kafka import create_topics, producer
from runtime.settings import Settings
from schemas.jsonl import read_events
from tests.fixtures.settings import make_settings

pytestmark = pytest.mark.integration

Record = tuple[int, bytes | None, bytes | None, int, object]  # partition, key, value, timestamp, headers


def _read_all(settings: Settings, topic: str, timeout: float = 30.0) -> list[Record]:
    """Every record of a topic, partition by partition in offset order, up to the high watermarks."""
    c = Consumer(settings.kafka.client_config() | {
        "group.id": f"test-{uuid.uuid4().hex}", "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        parts = sorted(c.list_topics(topic, timeout=timeout).topics[topic].partitions)
        high = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1] for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        got: dict[int, list[tuple[int, Record]]] = defaultdict(list)
        deadline = time.monotonic() + timeout
        while any(len(got[p]) < high[p] for p in parts) and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.2):
                assert m.error() is None, m.error()
                p = m.partition()
                assert p is not None
                got[p].append((m.offset() or 0, (p, m.key(), m.value(), m.timestamp()[1], m.headers())))
        assert all(len(got[p]) == high[p] for p in parts), "did not reach the high watermarks"
        return [rec for p in parts for _, rec in sorted(got[p], key=lambda x: x[0])]
    finally:
        c.close()


def _small_file(tmp_path: Path) -> Path:
    sim = simulate(load_movielens(), SimConfig(users=3, candidates=30, exposed=5, max_requests_per_user=4,
                                               exposure_first_fraction=0.3, seed=5))
    path = tmp_path / "small.jsonl"
    write_jsonl(sim, path)
    return path


def test_replay_jsonl_delivers_exactly_the_file(settings: Settings, tmp_path: Path) -> None:
    path = _small_file(tmp_path)
    expected = list(read_events(path))
    counts = replay_jsonl(settings, path, progress=False, index_wait_s=0)  # no indexer here to wait for
    assert counts == dict(Counter(ev.topic for ev in expected))
    for topic in counts:
        want = [ev for ev in expected if ev.topic == topic]
        got = _read_all(settings, topic)
        assert len(got) == len(want)
        assert Counter((k, v) for _, k, v, _, _ in got) == Counter((ev.key, ev.value) for ev in want)
        # per key: same order, same timestamps as the file
        by_key_got: dict[bytes | None, list[tuple[bytes | None, int]]] = defaultdict(list)
        by_key_want: dict[bytes | None, list[tuple[bytes | None, int]]] = defaultdict(list)
        for _, k, v, ts, _ in got:
            by_key_got[k].append((v, ts))
        for ev in want:
            by_key_want[ev.key].append((ev.value, ev.ts))
        assert by_key_got == by_key_want
        # and a key lives in one partition (user-keyed topics are co-partitioned)
        parts_of: dict[bytes | None, set[int]] = defaultdict(set)
        for p, k, _, _, _ in got:
            parts_of[k].add(p)
        assert all(len(ps) == 1 for ps in parts_of.values())


def test_replay_jsonl_topic_filter(settings: Settings, tmp_path: Path) -> None:
    path = _small_file(tmp_path)
    counts = replay_jsonl(settings, path, topics={"exposure"}, progress=False)
    assert set(counts) == {"exposure"}
    assert counts["exposure"] == sum(ev.topic == "exposure" for ev in read_events(path))
    assert len(_read_all(settings, "recall")) == 0


def test_replay_refuses_a_missing_topic(fresh_broker: EmbeddedBroker, tmp_path: Path) -> None:
    bare = make_settings(tmp_path, fresh_broker)  # no topics created
    path = _small_file(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        replay_jsonl(bare, path, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        replay_topic(bare, "recall", "replay-target", progress=False)


def test_replay_topic_copies_only_the_time_range(any_broker: Broker, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, any_broker)
    create_topics(settings.kafka)
    create_topics(settings.kafka, ["replay-target"])
    p = producer(settings.kafka)
    # event times with out-of-order records: an in-range record after out-of-range ones in every key
    base = 1_700_000_000_000
    offsets_ms = [0, 10, 20, 500, 30, 1500, 1000, 1100, 40, 1200,
                  990, 1999, 2000, 2500, 1001, 50, 3000, 1400, 5, 1300]
    plan = [(f"u{i % 5}", base + t) for i, t in enumerate(offsets_ms)]
    for n, (key, ts) in enumerate(plan):
        p.produce("recall", f"v{n}".encode(), key=key.encode(), timestamp=ts, headers=[("n", b"%d" % n)])
    assert p.flush(10) == 0
    source = _read_all(settings, "recall")
    assert len(source) == len(plan)

    start, end = base + 1000, base + 2000
    stats = replay_topic(settings, "recall", "replay-target", start_ms=start, end_ms=end, progress=False)
    want = [r for r in source if start <= r[3] < end]
    got = _read_all(settings, "replay-target")
    assert stats["copied"] == len(want) == len(got) == 8
    if any_broker.name == "embedded":  # Tansu answers offsets_for_times with 0: not trusted, a full scan
        assert stats["fallback_scans"] >= 1 and stats["scanned"] == len(source)
    else:  # Kafka's answer is taken: each partition read from its first record at or after start_ms
        assert stats["fallback_scans"] == 0 and len(want) <= stats["scanned"] < len(source)
    # same records, same partitions, same per-partition order, timestamps and headers kept
    assert got == want
    assert got[0][4] is not None

    # a tiny buffer bound pauses and resumes partitions during the merge: same result
    create_topics(settings.kafka, ["replay-paused"])
    replay_topic(settings, "recall", "replay-paused", start_ms=start, end_ms=end, max_buffered=1,
                 progress=False)
    assert _read_all(settings, "replay-paused") == want

    # no range: the whole topic, into a fresh target
    create_topics(settings.kafka, ["replay-all"])
    everything = replay_topic(settings, "recall", "replay-all", progress=False)
    assert everything["copied"] == len(plan) and everything["fallback_scans"] == 0
    assert _read_all(settings, "replay-all") == source


def test_paced_replay_keeps_the_order(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "tiny.jsonl"
    base = 1_700_000_000_000
    lines = []
    for n in range(8):  # 30 ms gaps, one step back in time, two users
        ts = base + 30 * n - (45 if n == 5 else 0)
        ev = {"request_id": f"r{n}", "user_id": f"u{n % 2}", "ts": ts, "candidates": [{"item_id": n}]}
        lines.append(orjson.dumps({"topic": "recall", "value": ev}))
    path.write_bytes(b"\n".join(lines) + b"\n")

    replay_jsonl(settings, path, progress=False)
    fast = _read_all(settings, "recall")
    t = time.monotonic()
    counts = replay_jsonl(settings, path, speed=2.0, progress=False)
    elapsed = time.monotonic() - t
    both = _read_all(settings, "recall")
    assert counts == {"recall": 8}
    # version 1 recall lines go out as schema_version 2 columns (gpl replay emits v2)
    sent = [orjson.loads(r[2]) for r in fast]
    assert all(v["schema_version"] == 2 and "candidates" not in v for v in sent)
    assert sorted(v["item_ids"][0] for v in sent) == list(range(8))
    # per partition, the second (paced) replay repeated the first one's order exactly
    for part in {r[0] for r in both}:
        rows = [r for r in both if r[0] == part]
        assert rows[: len(rows) // 2] == rows[len(rows) // 2:]
    assert len(both) == 2 * len(fast) == 16
    # pacing happened: 210 ms of event time at speed 2 is >= ~105 ms of wall time
    assert elapsed >= 0.09
