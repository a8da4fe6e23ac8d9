"""``gpl replay FILE`` on a foreign file: items first, events in event-time order, and a bounded wait for
the indexer in between (gpl/replay_order.py). Pure logic on files first, then on the real embedded broker
with the real indexer (a user-ordered file once made the streams expire almost every candidate)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import orjson
import pytest

from gpl.replay import replay_jsonl
from gpl.replay_order import INDEXER_GROUP, ordered_events, scan
from runtime.encoder import HashEncoder
from runtime.settings import Settings
from runtime.vectors.memory import MemoryIndex
from tests.integration.test_replay import _read_all
from workers import indexer as indexer_module
from workers.indexer import Indexer

BASE = 1_700_000_000_000


def recall(user: int, n: int, ts: int) -> bytes:
    ev = {"request_id": f"r{user}-{n}", "user_id": f"u{user}", "ts": ts, "item_ids": [1, 2], "scores": [0.5, 0.4],
          "schema_version": 2}
    return orjson.dumps({"topic": "recall", "value": ev})


def item(i: int) -> bytes:
    return orjson.dumps({"topic": "items", "value": {"item_id": i, "text": f"item {i} red shoes", "category": "c"}})


def user_ordered_file(path: Path, users: int = 3, per_user: int = 3) -> Path:
    """Each user's requests together (user 0's all, then user 1's...), the items after user 0's, and a raw
    line (no timestamp) after user 1's first request: the shape a converted public data set has."""
    lines = []
    for u in range(users):
        for n in range(per_user):
            lines.append(recall(u, n, BASE + 1000 * n + u))
            if (u, n) == (1, 0):
                lines.append(orjson.dumps({"topic": "recall", "value": "{not json", "key": "u1"}))
        if u == 0:
            lines += [item(i) for i in (1, 2, 3)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_user_ordered_file_is_found_out_and_replayed_items_first_in_time_order(tmp_path: Path) -> None:
    path = user_ordered_file(tmp_path / "users.jsonl")
    order = scan(path)
    assert (order.items, order.events, order.topics) == (3, 10, {"items", "recall"})
    assert order.disorder == (7, BASE + 1, 3, BASE + 2000)  # u1's first request, after u0's last
    items, rest = ordered_events(order)
    assert [ev.line for ev in items] == [4, 5, 6]
    sent = list(rest)
    assert [ev.ts for ev in sent if ev.ts > 0] == sorted(ev.ts for ev in sent if ev.ts > 0)
    lines = [ev.line for ev in sent]
    assert lines[lines.index(7) + 1] == 8  # the raw line stays right after the timed line before it
    order.check()  # small: sorted in memory
    with pytest.raises(ValueError, match=r"^\S+ is not in event-time order \(line 7: .* sort its lines by value\.ts"):
        order.check(max_sort_bytes=100)

    in_time = tmp_path / "time.jsonl"
    in_time.write_bytes(b"".join(x + b"\n" for x in (recall(0, 0, BASE), item(1), recall(1, 0, BASE + 5))))
    order = scan(in_time)
    assert order.sorted and order.disorder is None
    order.check(max_sort_bytes=1)  # nothing to sort: no limit applies
    items, rest = ordered_events(order)
    assert [ev.line for ev in items] == [2] and [ev.line for ev in rest] == [1, 3]
    assert scan(in_time, topics={"recall"}).items == 0


def test_replay_waits_for_the_indexer_before_the_events_and_sends_them_in_time_order(
        settings: Settings, tmp_path: Path) -> None:
    """The indexer starts late (a stack still loading its encoder): the replay holds the events until it has
    indexed every item, and the events reach their topic sorted by event time."""
    assert INDEXER_GROUP == indexer_module.STAGE
    path = user_ordered_file(tmp_path / "users.jsonl")
    index = MemoryIndex()
    indexer = Indexer(settings, index, HashEncoder(), progress=False)
    stop = threading.Event()
    late = threading.Timer(1.5, lambda: indexer.run(stop))
    late.start()
    try:
        t0 = time.monotonic()
        counts = replay_jsonl(settings, path, progress=False, index_wait_s=60)
        assert counts == {"items": 3, "recall": 10}
        assert time.monotonic() - t0 >= 1.5 and index.count(settings.encoder.collection) == 3
    finally:
        stop.set()
        late.join(30)
    got = _read_all(settings, "recall")
    for part in {r[0] for r in got}:
        stamps = [r[3] for r in got if r[0] == part and r[2] != b"{not json"]
        assert stamps == sorted(stamps)


def test_without_an_indexer_the_wait_is_bounded_and_says_why(settings: Settings, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    path = user_ordered_file(tmp_path / "users.jsonl")
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="gpl"):
        counts = replay_jsonl(settings, path, progress=False, index_wait_s=1.0)
    assert counts == {"items": 3, "recall": 10} and 1.0 <= time.monotonic() - t0 < 30
    text = [r.getMessage() for r in caplog.records]
    assert any("not in event-time order (line 7" in m for m in text)
    assert any("has not indexed 3 of the 3 item records" in m and "replaying the events anyway" in m for m in text)
