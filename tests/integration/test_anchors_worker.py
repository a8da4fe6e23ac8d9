"""The anchors worker: requests in, anchor sets out (on the real broker), stored in the vector index.

The generator is MemoryGenerator and the encoder HashEncoder: what is tested here is the worker's own
work (batching, newest-per-user, history lookup, Qdrant slots and versions, DLQ, accounting, commits),
not the LLM.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from runtime.encoder import HashEncoder
from runtime.kafka import consumer, producer
from runtime.settings import LabelerSettings, Settings, load
from runtime.vectors.edge import EdgeIndex
from runtime.vectors.index import VectorIndex
from runtime.vectors.memory import MemoryIndex
from schemas.codec import decode, encode
from schemas.events import AnchorRequest, AnchorSet, DeadLetter, ItemEvent, SampleBatch, UnexposedBatch
from tests.helpers import drain_raw
from workers.anchors import AnchorWorker
from workers.anchors.generators.memory import MemoryGenerator
from workers.anchors.policy import anchor_point_id, newest_per_user
from workers.anchors.sets import MAX_SLOTS
from workers.indexer import Indexer
from workers.labeler.anchor_book import AnchorBook
from workers.labeler.assemble import label_batch
from workers.labeler.item_matrix import ItemMatrix


@pytest.fixture
def settings(broker_settings: Settings) -> Settings:
    """This file's integration tests on the suite's broker (tests/fixtures/brokers.py: Apache Kafka by default)."""
    return broker_settings


ITEMS = {
    1: "trail running shoes lightweight",
    2: "gps running watch",
    3: "marathon energy gels",
    4: "fantasy novel dragons",
    5: "dragon fantasy box set",
    6: "cast iron skillet",
    7: "chef knife steel",
}


@pytest.fixture(params=["memory", "edge"])
def index_kind(request: pytest.FixtureRequest) -> str:
    """Each storage test runs on the numpy twin and on the real embedded engine (qdrant-edge)."""
    return str(request.param)


def _index_with_items(settings: Settings, encoder: HashEncoder, kind: str = "memory") -> VectorIndex:
    index: VectorIndex = MemoryIndex() if kind == "memory" else EdgeIndex(settings.data_dir / "qdrant")
    Indexer(settings, index, encoder, progress=False).index_items(
        [ItemEvent(item_id=i, text=t) for i, t in ITEMS.items()]
    )
    return index


def _req(user: str, history: list[int], ts: int = 1000) -> AnchorRequest:
    return AnchorRequest(user_id=user, reason="new_positives", ts=ts, history=history)


# ------------------------------------------------------------------------------------------- pure

def test_point_ids_are_deterministic_63_bit_and_per_slot() -> None:
    a = anchor_point_id("user-1", 0)
    assert a == anchor_point_id("user-1", 0)
    ids = {anchor_point_id("user-1", s) for s in range(MAX_SLOTS)} | {anchor_point_id("user-2", 0)}
    assert len(ids) == MAX_SLOTS + 1
    assert all(0 <= i < 2**63 for i in ids)


def test_newest_per_user_keeps_latest_event_time() -> None:
    reqs = [(_req("a", [1], ts=5), "m1"), (_req("b", [2], ts=1), "m2"), (_req("a", [3], ts=9), "m3"),
            (_req("a", [4], ts=7), "m4"), (_req("b", [5], ts=1), "m5")]
    newest, superseded = newest_per_user(reqs)
    assert superseded == 3
    assert newest["a"][1] == "m3"
    assert newest["b"][1] == "m5"  # tie on event time: the later one in the batch


# ------------------------------------------------------------------------------ generate_for (no broker)

def test_generate_for_stores_slots_and_versions(tmp_path: Path, index_kind: str) -> None:
    s = load(env={}, data_dir=str(tmp_path), anchors={"backend": "memory", "k": 3, "history_items": 3})
    enc = HashEncoder()
    index = _index_with_items(s, enc, index_kind)
    w = AnchorWorker(s, index, enc, MemoryGenerator(s.anchors))

    sets = w.generate_for([_req("runner", [1, 2, 3, 1]), _req("reader", [4, 5]), _req("ghost", [999])])
    by_user = {x.user_id: x for x in sets}
    assert set(by_user) == {"runner", "reader"}  # no known history item: left out
    runner = by_user["runner"]
    assert runner.history == [2, 3, 1]  # last 3 distinct, most recent last
    assert [a.text for a in runner.anchors] == ["running", "lightweight", "shoes"]  # count, recency, a-z
    assert runner.encoder == enc.id and runner.model == "memory"
    assert runner.prompt_hash == w.generator.prompt_hash
    for a in runner.anchors:
        assert np.linalg.norm(a.vector) == pytest.approx(1.0, abs=1e-5)
        assert a.logprob < 0
    # stored in the anchors collection, slot by slot, with the lineage payload
    pts = index.retrieve(s.qdrant.anchors_collection, [anchor_point_id("runner", i) for i in range(3)],
                         with_payload=True)
    assert [p["slot"] for p in pts.payloads] == [0, 1, 2]
    assert {p["version"] for p in pts.payloads} == {runner.version}
    assert pts.payloads[0]["text"] == "running" and pts.payloads[0]["encoder"] == enc.id
    assert set(pts.payloads[0]) >= {"user_id", "version", "slot", "text", "logprob", "model", "encoder",
                                    "prompt_hash"}
    np.testing.assert_allclose(pts.vectors[0], runner.anchors[0].vector, atol=1e-6)
    assert index.count(s.qdrant.anchors_collection) == 3 + 3

    # a smaller set replaces the slots in place and deletes the stale ones; generated_at only goes up
    fewer = MemoryGenerator(s.anchors, script=lambda p, attempt: '{"interests": ["ultra running"]}')
    again = AnchorWorker(s, index, enc, fewer).generate_for([_req("runner", [1])])  # a "restarted" worker
    assert len(again) == 1 and again[0].generated_at > runner.generated_at
    assert again[0].version != runner.version  # other history: other content
    assert [a.text for a in again[0].anchors] == ["ultra running"]
    left = index.retrieve(s.qdrant.anchors_collection, [anchor_point_id("runner", i) for i in range(3)])
    assert left.ids.tolist() == [anchor_point_id("runner", 0)]
    third = AnchorWorker(s, index, enc, fewer).generate_for([_req("runner", [1])])
    assert third[0].generated_at > again[0].generated_at  # monotonic even within one millisecond
    assert third[0].version == again[0].version  # same inputs: same version
    index.close()


def test_regenerated_after_restart_gives_identical_sample_ids(tmp_path: Path) -> None:
    """The anchors worker restarts and regenerates for re-read requests: the versions, and so the
    labeler's sample ids, are those of the first run, so the trainer's dedup by sample id holds.
    The first worker's generator answers at random; the restarted one is answered by the replay cache."""
    s = load(env={}, data_dir=str(tmp_path), anchors={"backend": "memory", "k": 2, "history_items": 3})
    enc = HashEncoder()
    index = _index_with_items(s, enc)
    rng = np.random.default_rng()
    words = ["trail", "dragon", "skillet", "marathon", "novel", "knife", "watch", "gels"]

    def sampled(p: object, attempt: int) -> str:  # an LLM that samples: another answer every call
        return orjson.dumps({"interests": [str(w) for w in rng.choice(words, 2, replace=False)]}).decode()

    reqs = [_req("runner", [1, 2, 3], ts=10), _req("reader", [4, 5], ts=10)]
    first = AnchorWorker(s, index, enc, MemoryGenerator(s.anchors, script=sampled)).generate_for(reqs)
    time.sleep(0.01)
    second = AnchorWorker(s, index, enc, MemoryGenerator(s.anchors, script=sampled)).generate_for(reqs)

    def sample_ids(sets: list[AnchorSet]) -> list[str]:
        items = ItemMatrix(collection=s.encoder.collection, encoder=enc.id)
        pts = index.retrieve(s.encoder.collection, list(ITEMS))
        items.add(pts.ids, pts.vectors)
        book = AnchorBook(enc.id, items)
        ids: list[str] = []
        for aset in sets:
            assert book.put(aset) == "accepted"
            batch = UnexposedBatch(request_id=f"req-{aset.user_id}", user_id=aset.user_id, ts=20,
                                   item_ids=[6, 7, 2], recall_scores=[0.5] * 3)
            raw, _ = label_batch(encode(batch), book, items, LabelerSettings(label_source="map"))
            ids.extend(x.sample_id for x in decode(raw, SampleBatch).samples)
        return ids

    assert [x.generated_at for x in second] > [x.generated_at for x in first]  # really regenerated
    assert [x.version for x in second] == [x.version for x in first]
    assert [[a.text for a in x.anchors] for x in second] == [[a.text for a in x.anchors] for x in first]
    ids = sample_ids(first)
    assert ids and sample_ids(second) == ids
    index.close()


def test_fallback_sets_are_flagged_and_counted(tmp_path: Path) -> None:
    s = load(env={}, data_dir=str(tmp_path), anchors={"backend": "memory", "k": 2, "retries": 1})
    enc = HashEncoder()
    index = _index_with_items(s, enc)
    gen = MemoryGenerator(s.anchors, script=lambda p, attempt: "As an AI I cannot know what they like.")
    w = AnchorWorker(s, index, enc, gen)
    (out,) = w.generate_for([_req("cook", [6, 7])])
    assert out.fallback
    assert [a.text for a in out.anchors] == ["chef knife steel", "cast iron skillet"]
    assert w.accounting["fallback"] == 1


# ----------------------------------------------------------------------------- the loop, real broker


@pytest.mark.integration
def test_worker_loop_requests_to_anchor_sets(settings: Settings) -> None:
    s = settings.with_overrides(anchors={"backend": "memory", "k": 2, "batch_size": 8, "batch_wait_ms": 500})
    enc = HashEncoder()
    index = _index_with_items(s, enc, "edge")
    worker = AnchorWorker(s, index, enc, MemoryGenerator(s.anchors))

    p = producer(s.kafka)
    good = [_req("runner", [1, 2], ts=10), _req("reader", [4, 5], ts=10), _req("cook", [6, 7], ts=10),
            _req("runner", [3], ts=20)]  # newer request of the same user
    for r in good:
        p.produce("anchor-requests", encode(r), key=r.user_id.encode())
    p.produce("anchor-requests", b"{not json", key=b"broken")
    p.produce("anchor-requests", orjson.dumps({"user_id": "x", "reason": "nope", "ts": 1, "history": []}),
              key=b"x")
    p.produce("anchor-requests", encode(_req("ghost", [404, 405])), key=b"ghost")
    assert p.flush(10) == 0

    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    t.start()
    try:
        dlq = [decode(v, DeadLetter) for v in drain_raw(s, "anchor-requests.dlq", 3, timeout=60)]
        deadline = time.monotonic() + 60
        while worker.accounting["in"] < 7 and time.monotonic() < deadline:
            time.sleep(0.1)
        acc = worker.accounting.snapshot()
        sets = [decode(v, AnchorSet) for v in drain_raw(s, "anchors", acc.get("emitted", 0), timeout=60)]
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()

    assert sorted(d.reason for d in dlq) == ["malformed_json", "schema", "unknown_items"]
    assert all(d.topic == "anchor-requests" and d.stage == "anchors" for d in dlq)
    # every request ends somewhere: emitted, superseded (same user later in the batch) or DLQ
    acc = worker.accounting.snapshot()
    assert acc["in"] == 7
    assert acc.get("emitted", 0) + acc.get("superseded", 0) == 4
    assert sum(v for k, v in acc.items() if k.startswith("dlq:")) == 3
    latest = {x.user_id: x for x in sorted(sets, key=lambda x: x.generated_at)}
    assert set(latest) == {"runner", "reader", "cook"}
    assert latest["runner"].history == [3]  # the newer request won
    assert all(len(x.anchors) == 2 and not x.fallback for x in latest.values())
    assert index.count(s.qdrant.anchors_collection) == 2 * 3
    index.close()

    # offsets were committed: the worker's group has nothing left to read
    c = consumer(s.kafka, "anchors")
    c.subscribe(["anchor-requests"])
    leftover = [m for _ in range(12) for m in c.consume(50, timeout=0.5) if m.error() is None]
    c.close()
    assert leftover == []
