"""The labeler loop on the real broker: anchors and unexposed batches in, SampleBatches out.

Items live in the numpy twin of the vector index (embedded with HashEncoder); the labeler's own work
is what is tested: the anchor cache kept by the ``anchors`` topic, deferral of batches whose user has
no anchors yet (labeled when they come, dropped and counted when they do not), refusal of anchors from
another encoder, dead letters, backpressure, offsets, and accounting that adds up exactly.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, TopicPartition

from runtime.encoder import HashEncoder
from runtime.kafka import consumer, producer
from runtime.settings import Settings
from runtime.vectors.index import VectorIndex
from schemas.codec import encode
from schemas.events import Anchor, AnchorSet, DeadLetter, ItemEvent, SampleBatch, UnexposedBatch
from tests.helpers import item_index, produce, running, wait_for
from workers.labeler.loop import STAGE, Labeler

pytestmark = pytest.mark.integration

TEXTS = [
    "trail running shoes lightweight", "gps running watch", "marathon energy gels", "running socks",
    "fantasy novel dragons", "dragon fantasy box set", "epic fantasy map poster", "wizard school novel",
    "cast iron skillet", "chef knife steel", "sourdough starter kit", "olive oil tasting set",
]
ITEMS = [ItemEvent(item_id=100 + i, text=t) for i, t in enumerate(TEXTS)]
ALL_IDS = [it.item_id for it in ITEMS]
ENC = HashEncoder()


def _index(s: Settings) -> VectorIndex:
    return item_index(ITEMS, s.encoder.collection, ENC)


def _anchors(s: Settings, user: str, texts: list[str], *, version: int = 1, encoder: str | None = None
             ) -> AnchorSet:
    vecs = ENC.encode(texts)
    return AnchorSet(user_id=user, version=version, model="memory", prompt_hash="ph-1",
                     encoder=encoder or s.encoder.model, generated_at=int(time.time() * 1000),
                     history=[100, 101], anchors=[Anchor(text=t, vector=v.tolist(), logprob=-0.3)
                                                  for t, v in zip(texts, vecs, strict=True)])


def _batch(user: str, request: str, ids: list[int] | None = None) -> UnexposedBatch:
    return UnexposedBatch(request_id=request, user_id=user, ts=int(time.time() * 1000),
                          item_ids=ids or ALL_IDS, recall_scores=[0.5] * len(ids or ALL_IDS))


def _produce_where(s: Settings, topic: str, msgs: list[UnexposedBatch]) -> dict[str, tuple[int, int]]:
    """Produce; returns request id -> (partition, offset) as the broker assigned them."""
    p = producer(s.kafka)
    where: dict[str, tuple[int, int]] = {}
    for m in msgs:
        def done(err: KafkaError | None, msg: Message, rid: str = m.request_id) -> None:
            assert err is None, err
            where[rid] = (msg.partition() or 0, msg.offset() or 0)
        p.produce(topic, encode(m), key=m.user_id.encode(), on_delivery=done)
    assert p.flush(10) == 0
    return where


def _read(s: Settings, topic: str, expect: int, timeout: float = 20.0) -> list[Any]:
    """Read a topic from the beginning by assignment (no group join: ~0.1 s instead of ~3.5 s here)."""
    c = consumer(s.kafka, f"read-{topic}-{time.monotonic_ns()}")
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(s.kafka.partitions)])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            got = c.consume(100, timeout=0.2)
            out.extend(orjson.loads(m.value() or b"null") for m in got if m.error() is None)
        extra = c.consume(100, timeout=0.3)  # anything beyond what was expected would show up here
        out.extend(orjson.loads(m.value() or b"null") for m in extra if m.error() is None)
    finally:
        c.close()
    return out


def _committed_everything(s: Settings) -> bool:
    """The labeler's group has committed the end of every ``unexposed`` partition."""
    c = consumer(s.kafka, STAGE)
    try:
        parts = [TopicPartition("unexposed", p) for p in range(s.kafka.partitions)]
        committed = c.committed(parts, timeout=10)
        for tp in committed:
            _, high = c.get_watermark_offsets(TopicPartition("unexposed", tp.partition), timeout=10)
            if high > 0 and tp.offset != high:
                return False
        return True
    finally:
        c.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # labeler.matrix_dtype: the same behaviour in both
def test_labeler_labels_defers_times_out_refuses_and_counts(settings: Settings, dtype: str) -> None:
    s = settings.with_overrides(labeler={"wait_for_anchors_s": 4.0, "top_n": 2, "random_n": 2, "cap": 3,
                                         "matrix_dtype": dtype})
    labeler = Labeler(s, _index(s))
    with running(labeler, "labeler"):
        produce(s, "anchors", [_anchors(s, "u1", ["running shoes", "energy gels"]),
                               _anchors(s, "u4", ["cast iron"], encoder="some-other-encoder")])
        produce(s, "anchors", [b"{not an anchor set"], keys=["u5"])
        produce(s, "unexposed", [_batch("u1", "r-u1"), _batch("u2", "r-u2"), _batch("u3", "r-u3"),
                                 _batch("u4", "r-u4")])
        produce(s, "unexposed", [b'{"request_id": "r-bad", "user_id": "u2"}'], keys=["u2"])
        # u1 is labeled; u2, u3 and u4 (whose anchors were refused) wait for anchors
        wait_for(lambda: labeler.accounting["labeled"] == 1 and labeler.deferred == 3, 30,
                 "u1 labeled, 3 waiting")
        produce(s, "anchors", [_anchors(s, "u2", ["fantasy dragons", "wizard novel"])])
        wait_for(lambda: labeler.accounting["labeled"] == 2, 20, "u2 labeled once its anchors came")
        wait_for(lambda: labeler.accounting["timed_out"] == 2, 20, "u3 and u4 timed out")
        wait_for(lambda: _committed_everything(s), 20, "offsets committed to the end")
        samples = [SampleBatch.model_validate(x) for x in _read(s, "samples", expect=2)]
        dead = [DeadLetter.model_validate(x) for x in _read(s, "unexposed.dlq", expect=1)]
        dead_anchors = [DeadLetter.model_validate(x) for x in _read(s, "anchors.dlq", expect=2)]

    # outputs: one SampleBatch per labeled request, with its lineage
    assert sorted(b.request_id for b in samples) == ["r-u1", "r-u2"]
    by_req = {b.request_id: b for b in samples}
    for b in samples:
        assert b.lineage is not None
        assert b.lineage.encoder == s.encoder.model and b.lineage.collection == s.encoder.collection
        assert b.lineage.anchor_model == "memory" and b.lineage.prompt_hash == "ph-1"
        assert b.lineage.label_map.startswith("p=sigmoid(")
        assert len(b.samples) == 3 and b.candidates_total == len(ALL_IDS)
        assert b.sampled_out == len(ALL_IDS) - 3
        for smp in b.samples:
            assert smp.source == "pseudo" and smp.sample_id.startswith(f"{b.request_id}:")
            assert smp.similarity is not None and smp.matched_anchor in (0, 1) and smp.confidence
    # the top candidates follow each user's interests
    assert {smp.item_id for smp in by_req["r-u1"].samples[:2]} <= {100, 101, 102, 103}
    assert {smp.item_id for smp in by_req["r-u2"].samples[:2]} <= {104, 105, 106, 107}

    assert [d.reason for d in dead] == ["schema"] and dead[0].topic == "unexposed" and dead[0].stage == STAGE
    assert sorted(d.reason for d in dead_anchors) == ["encoder_mismatch", "malformed_json"]
    assert all(d.topic == "anchors" for d in dead_anchors)

    # accounting adds up exactly
    acc = labeler.accounting.snapshot()
    assert acc["in"] == 5
    assert (acc["labeled"], acc["timed_out"], acc["dlq:schema"]) == (2, 2, 1)
    assert acc.get("deferred_at_stop", 0) == 0
    assert acc["candidates"] == 4 * len(ALL_IDS)
    assert acc["pseudo"] == 6 and acc["sampled_out"] == 2 * (len(ALL_IDS) - 3)
    assert acc["candidates_timed_out"] == 2 * len(ALL_IDS)
    anchors = labeler.anchor_accounting.snapshot()
    assert anchors["in"] == 4 and anchors["accepted"] == 2 and anchors["anchors_refused"] == 1
    assert anchors["dlq:encoder_mismatch"] == 1 and anchors["dlq:malformed_json"] == 1
    assert labeler.balance() == {"batches": 0, "candidates": 0, "anchors": 0}
    assert labeler.deferred == 0
    assert labeler.items.dtype == dtype and len(labeler.items) == len(ALL_IDS)


def test_full_deferred_queue_pauses_and_rewinds_the_partition(settings: Settings) -> None:
    s = settings.with_overrides(labeler={"max_deferred": 1, "wait_for_anchors_s": 60.0})
    labeler = Labeler(s, _index(s))
    with running(labeler, "labeler"):
        produce(s, "unexposed", [_batch("u5", f"r{i}") for i in range(3)])
        # the first waits; the second does not fit: its partition is paused and rewound to it
        wait_for(lambda: labeler.deferred == 1 and labeler.accounting["paused"] >= 1, 30,
                 "a paused partition")
        time.sleep(0.5)
        assert labeler.accounting["in"] == 1  # nothing beyond the bound was taken
        produce(s, "anchors", [_anchors(s, "u5", ["running watch"])])
        wait_for(lambda: labeler.accounting["labeled"] == 3, 30, "all three labeled after the resume")
        samples = [SampleBatch.model_validate(x) for x in _read(s, "samples", expect=3)]
    assert sorted(b.request_id for b in samples) == ["r0", "r1", "r2"]  # each exactly once
    acc = labeler.accounting.snapshot()
    assert acc["in"] == 3 and acc["deferred"] == 1 and acc.get("timed_out", 0) == 0
    assert labeler.balance() == {"batches": 0, "candidates": 0, "anchors": 0}


def test_deferred_batches_are_not_committed_and_survive_a_restart(settings: Settings) -> None:
    s = settings.with_overrides(labeler={"wait_for_anchors_s": 60.0})
    first = Labeler(s, _index(s))
    with running(first, "labeler-1"):
        produce(s, "anchors", [_anchors(s, "u1", ["running shoes"])])
        where = _produce_where(s, "unexposed", [_batch("u7", "r-wait"), _batch("u1", "r-now")])
        wait_for(lambda: first.deferred == 1 and first.accounting["labeled"] == 1, 30,
                 "one waiting, one labeled")
    acc = first.accounting.snapshot()
    assert acc["deferred_at_stop"] == 1 and acc["candidates_deferred_at_stop"] == len(ALL_IDS)
    assert first.balance() == {"batches": 0, "candidates": 0, "anchors": 0}

    behind = where["r-now"][0] == where["r-wait"][0] and where["r-now"][1] > where["r-wait"][1]
    second = Labeler(s, _index(s))  # a restart: re-reads the waiting batch and the whole anchors table
    with running(second, "labeler-2"):
        wait_for(lambda: second.deferred == 1, 30, "the waiting batch read again")
        assert "u1" in second.cache  # anchors rebuilt from the beginning of the topic
        produce(s, "anchors", [_anchors(s, "u7", ["fantasy novel"])])
        wait_for(lambda: second.accounting["labeled"] == 1 + behind, 30, "labeled after the restart")
        samples = [SampleBatch.model_validate(x) for x in _read(s, "samples", expect=2 + behind)]
    # commits stop at the oldest waiting batch of its partition: r-now is read again only if it is behind
    # r-wait in the same partition (and then labeled again, with the same sample ids)
    assert second.accounting["in"] == 1 + behind
    assert {b.request_id for b in samples} == {"r-now", "r-wait"}
    assert second.balance() == {"batches": 0, "candidates": 0, "anchors": 0}
    assert np.isfinite([smp.weight for b in samples for smp in b.samples]).all()
