"""The yardstick of ``gpl bench e2e --baseline``: the same work as the pipeline in one bare consumer loop.

One process, one confluent-kafka consumer on two input topics, no framework: decode each recall with
the streams stage's own decoder (so it follows whatever contract the recall producer emits), decode the
exposure with the contract, join them per request in a dict, take recall − exposure, gather the
candidates' vectors from an :class:`~workers.labeler.item_matrix.ItemMatrix` (loaded from the same
item snapshot as the labeler), score them against the user's anchors (max cosine), sample ``cap`` of
them with a per-request seed, and produce one orjson ``SampleBatch`` per request. What it skips is
what the pipeline adds on purpose: the ``unexposed`` hop between two stages, changelogged join state,
real-label batches, dead letters, offset ledgers, calibrated features and lineage. The ratio
pipeline / bare loop is the price of those, measured on the same broker in the same run.
"""

from __future__ import annotations

import hashlib
import threading
import time
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

import numpy as np
import orjson

from runtime.kafka import consumer, producer, take, use_topic_names
from runtime.settings import Settings
from schemas.codec import DecodeError, decode
from schemas.events import AnchorSet, ExposureEvent
from schemas.topics import ANCHORS, under_prefix
from streams.join import decode_recall, unexposed
from workers.labeler.item_matrix import ItemMatrix


def bare_topics() -> tuple[str, str, str]:
    """The bare loop's recall, exposure and output topics: its own (the pipeline's stages must not read its
    traffic), under ``kafka.topic_prefix`` like every topic the product creates."""
    return under_prefix("bench-bare.recall"), under_prefix("bench-bare.exposure"), under_prefix("bench-bare.samples")


def bare_loop(settings_json: str, users: int, cap: int, ready: MpEvent, stop: MpEvent) -> None:
    """Run until ``stop``; ``ready`` is set once anchors and item vectors are loaded and partitions assigned."""
    from gpl.stage_process import open_reader_index

    s = Settings.model_validate_json(settings_json)
    use_topic_names(s.kafka)  # a spawned process starts with the logical names: the anchors and ours, prefixed
    recall_topic, exposure_topic, out_topic = bare_topics()
    with open_reader_index(s) as index:
        items = ItemMatrix(index, s.encoder.collection, s.encoder.model)
        items.load()
        anchors = _read_anchors(s, users)
        c = consumer(s.kafka, f"bench-bare-{time.monotonic_ns()}")
        p = producer(s.kafka)
        assigned = threading.Event()
        c.subscribe([recall_topic, exposure_topic], on_assign=lambda _c, _parts: assigned.set())
        recalls: dict[str, Any] = {}
        exposures: dict[str, ExposureEvent] = {}
        center, temp = s.labeler.label_center, s.labeler.label_temperature
        try:
            while not stop.is_set():
                msgs = take(c, 256, 0.1)
                if assigned.is_set():
                    ready.set()
                for m in msgs:
                    raw = m.value()
                    if m.error() is not None or raw is None:
                        continue
                    try:
                        if m.topic() == recall_topic:
                            r = decode_recall(raw, s.streams.max_candidates)
                            rid = r.request_id
                            recalls[rid] = r
                        else:
                            e = decode(raw, ExposureEvent)
                            rid = e.request_id
                            exposures[rid] = e
                    except DecodeError:
                        continue
                    if rid in recalls and rid in exposures:
                        rec = recalls.pop(rid)
                        out = _label(rec, exposures.pop(rid), items, anchors, cap, center, temp)
                        if out is not None:
                            p.produce(out_topic, out, key=rec.user_id.encode())
                p.poll(0)
        finally:
            p.flush(30)
            c.close()


def _label(r: Any, e: ExposureEvent, items: ItemMatrix, anchors: dict[str, np.ndarray], cap: int,
           center: float, temp: float) -> bytes | None:
    left = unexposed(r.item_ids, r.scores, e)
    a = anchors.get(r.user_id)
    if a is None or left is None:
        return None
    rest = left[0]
    rows, missing = items.lookup(rest)
    ids, rows = rest[~missing], rows[~missing]
    sims = (items.gather(rows) @ a.T).max(axis=1)
    seed = int.from_bytes(hashlib.blake2b(r.request_id.encode(), digest_size=8).digest(), "little")
    pick = np.random.default_rng(seed).choice(ids.size, size=min(cap, ids.size), replace=False)
    labels = 1.0 / (1.0 + np.exp(-(sims[pick] - center) / temp))
    samples = [{"sample_id": f"{r.request_id}:{i}", "item_id": i, "label": round(y, 6),
                "weight": round(abs(2 * y - 1), 6), "source": "pseudo", "similarity": round(sv, 6)}
               for i, y, sv in zip(ids[pick].tolist(), labels.tolist(), sims[pick].tolist(), strict=True)]
    return orjson.dumps({"schema_version": 1, "request_id": r.request_id, "user_id": r.user_id, "ts": e.ts,
                         "samples": samples, "candidates_total": int(rest.size), "lineage": {"bench": "bare"}})


def _read_anchors(s: Settings, users: int, timeout: float = 60.0) -> dict[str, np.ndarray]:
    """The users' anchor matrices from the compacted ``anchors`` topic, as the labeler reads them."""
    c = consumer(s.kafka, f"bench-bare-anchors-{time.monotonic_ns()}")
    c.subscribe([ANCHORS.name])
    out: dict[str, np.ndarray] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < users and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.2):
                if m.error() is None and m.value() is not None:
                    aset = decode(m.value(), AnchorSet)
                    out[aset.user_id] = np.asarray([a.vector for a in aset.anchors], np.float32)
    finally:
        c.close()
    return out
