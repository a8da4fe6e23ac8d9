"""Real worker loops driven end to end through the in-memory StageIO: no broker, milliseconds.

The indexer's and the anchors worker's ``run`` take the twin in place of their Kafka I/O; what is
checked is the loop's own bookkeeping — every message counted once, dead letters, commits that reach
the end of the input, backpressure, and a crash in the middle followed by a restart that finishes the
work. The Kafka loops keep their broker tests
(tests/integration/test_indexer.py, tests/integration/test_anchors_worker.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from runtime.encoder import HashEncoder
from runtime.settings import Settings, load
from runtime.stage_io_memory import ABORT, Aborted, MemoryStageIO, MemoryTopics
from runtime.vectors.memory import MemoryIndex
from schemas.events import AnchorRequest, AnchorSet, ItemEvent
from schemas.topics import ANCHOR_REQUESTS, ANCHORS, ITEMS
from workers.anchors import AnchorWorker
from workers.anchors.generators.memory import MemoryGenerator
from workers.indexer import Indexer

TEXTS = {1: "trail running shoes", 2: "gps running watch", 3: "energy gels", 4: "fantasy novel dragons",
         5: "dragon box set", 6: "cast iron skillet"}


def _item(i: int, text: str | None = None) -> tuple[bytes, bytes]:
    return str(i).encode(), ItemEvent(item_id=i, text=text or TEXTS[i]).model_dump_json().encode()


def _twin(topics: MemoryTopics, stage: str, accounting: object, stop: threading.Event) -> MemoryStageIO:
    return MemoryStageIO(topics, stage, accounting, stop=stop, idle_polls=3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ indexer

def test_indexer_loop_counts_every_message_once_and_commits_to_the_end(tmp_path: Path) -> None:
    s = load(env={}, data_dir=str(tmp_path))
    index = MemoryIndex()
    w = Indexer(s, index, HashEncoder(), progress=False)
    topics = MemoryTopics({ITEMS.name: 2})
    topics.script(ITEMS.name, {
        0: [_item(1, "old text"), _item(2), b"{not json", (b"3", None), _item(1)],  # None: a tombstone
        1: [_item(4)],
    })
    stop = threading.Event()
    w.run(stop, io=_twin(topics, "indexer", w.accounting, stop))
    got = w.accounting.snapshot()
    assert got == {"in": 6, "indexed": 3, "superseded": 1, "tombstone": 1, "dlq:malformed_json": 1}
    assert got["in"] == sum(v for k, v in got.items() if k != "in")
    pts = index.retrieve(s.encoder.collection, np.asarray([1, 2, 4]), with_payload=True)
    assert sorted(pts.ids.tolist()) == [1, 2, 4]
    assert {p["text"] for p in pts.payloads} >= {TEXTS[1]}  # the batch's last event of an id won
    assert topics.committed["indexer"] == {(ITEMS.name, 0): 5, (ITEMS.name, 1): 1}
    (dl,) = topics.dead_letters(ITEMS.name)
    assert (dl.partition, dl.offset, dl.reason, dl.stage) == (0, 2, "malformed_json", "indexer")


def test_indexer_restarted_reads_only_past_the_commit_and_never_recomputes(tmp_path: Path) -> None:
    s = load(env={}, data_dir=str(tmp_path))
    index = MemoryIndex()
    topics = MemoryTopics()
    topics.script(ITEMS.name, [_item(1), _item(2), ABORT, _item(2), _item(5)])
    first = Indexer(s, index, HashEncoder(), progress=False)
    stop = threading.Event()
    io = _twin(topics, "indexer", first.accounting, stop)
    with pytest.raises(Aborted):
        first.run(stop, io=io)
    assert topics.committed["indexer"] == {(ITEMS.name, 0): 2}
    again = Indexer(s, index, HashEncoder(), progress=False)
    stop = threading.Event()
    again.run(stop, io=_twin(topics, "indexer", again.accounting, stop))
    assert again.accounting.snapshot() == {"in": 2, "indexed": 1, "skipped_known": 1}
    assert topics.committed["indexer"] == {(ITEMS.name, 0): 4}


# ------------------------------------------------------------------------------------------ anchors

def _anchor_settings(tmp_path: Path, **anchors: object) -> Settings:
    cfg = {"backend": "memory", "k": 2, "history_items": 3, "cache": False} | anchors
    return load(env={}, data_dir=str(tmp_path), anchors=cfg)


def _anchor_worker(s: Settings) -> AnchorWorker:
    enc = HashEncoder()
    index = MemoryIndex()
    Indexer(s, index, enc, progress=False).index_items([ItemEvent(item_id=i, text=t) for i, t in TEXTS.items()])
    return AnchorWorker(s, index, enc, MemoryGenerator(s.anchors))


def _req(user: str, history: list[int], ts: int = 1000) -> tuple[bytes, bytes]:
    req = AnchorRequest(user_id=user, reason="new_positives", ts=ts, history=history)
    return user.encode(), req.model_dump_json().encode()


def test_anchors_loop_pauses_when_its_queue_is_full_and_serves_every_request(tmp_path: Path) -> None:
    """Backpressure: max_pending 2 and one user per batch, so the read-ahead queue fills and the
    partition is paused, then resumed at half; every request ends in exactly one outcome."""
    s = _anchor_settings(tmp_path, max_pending=2, batch_size=1)
    w = _anchor_worker(s)
    topics = MemoryTopics()
    topics.script(ANCHOR_REQUESTS.name, [
        _req("u1", [1, 2], ts=1000), _req("u1", [1, 2, 3], ts=2000),  # the newer one supersedes
        b"{not json", _req("u2", [4, 5]), _req("u3", [99]),  # 99: not in the item collection
        _req("u4", [6]), _req("u5", [1, 6]), _req("u6", [2, 4]),
    ])
    stop = threading.Event()
    io = _twin(topics, "anchors", w.accounting, stop)
    w.run(stop, io=io)
    got = w.accounting.snapshot()
    assert got["in"] == 8
    assert got["emitted"] == 5 and got["superseded"] == 1
    assert got["dlq:malformed_json"] == 1 and got["dlq:unknown_items"] == 1
    sets = topics.decoded(ANCHORS.name, AnchorSet)
    assert sorted(a.user_id for a in sets) == ["u1", "u2", "u4", "u5", "u6"]
    assert next(a for a in sets if a.user_id == "u1").history == [1, 2, 3]
    assert w.pauses >= 1 and io.pauses and io.resumes  # the backlog waited in the log
    assert topics.committed["anchors"] == {(ANCHOR_REQUESTS.name, 0): 8}
    assert sorted(d.reason for d in topics.dead_letters(ANCHOR_REQUESTS.name)) == ["malformed_json",
                                                                                  "unknown_items"]


def test_anchors_loop_crashed_mid_input_finishes_after_a_restart(tmp_path: Path) -> None:
    """A crash loses what was read but not committed; the restarted worker reads it again."""
    s = _anchor_settings(tmp_path, batch_size=2)
    w = _anchor_worker(s)
    users = [f"u{i}" for i in range(6)]
    topics = MemoryTopics()
    topics.script(ANCHOR_REQUESTS.name, [_req(u, [1 + i % 6, 1 + (i + 1) % 6]) for i, u in enumerate(users[:3])]
                  + [ABORT] + [_req(u, [1 + i % 6]) for i, u in enumerate(users[3:])])
    stop = threading.Event()
    with pytest.raises(Aborted):
        w.run(stop, io=_twin(topics, "anchors", w.accounting, stop))
    before = topics.committed.get("anchors", {}).get((ANCHOR_REQUESTS.name, 0), 0)
    assert before < 6
    again = _anchor_worker(s)
    stop = threading.Event()
    again.run(stop, io=_twin(topics, "anchors", again.accounting, stop))
    assert again.accounting.snapshot()["in"] == 6 - before  # the restart began at the commit
    assert {a.user_id for a in topics.decoded(ANCHORS.name, AnchorSet)} == set(users)
    assert topics.committed["anchors"] == {(ANCHOR_REQUESTS.name, 0): 6}
