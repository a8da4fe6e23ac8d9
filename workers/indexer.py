"""Indexer: ``items`` → frozen encoder → Qdrant collection ``items__<encoder>``.

Reads top to bottom: poll a batch of item events, dead-letter the bad ones, drop the ones already
indexed under this encoder (a vector is never recomputed under the same encoder), embed the rest in
one batch, upsert them with their text as payload, then commit the offsets the batch covered.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
from tqdm import tqdm

from gpl.encoder import Encoder
from gpl.kafka import Accounting, DeadLetters, commit_offsets, consumer, producer
from gpl.settings import Settings
from gpl.vectors import Points, VectorIndex
from schemas.codec import DecodeError, decode
from schemas.events import ItemEvent
from schemas.topics import ITEMS

log = logging.getLogger(__name__)
STAGE = "indexer"


class Indexer:
    def __init__(self, settings: Settings, index: VectorIndex, encoder: Encoder, *, progress: bool = True) -> None:
        self.settings = settings
        self.index = index
        self.encoder = encoder
        self.collection = settings.encoder.collection
        self.accounting = Accounting(STAGE)
        self.progress = progress
        self.index.ensure_collection(self.collection, encoder.dim)

    def run(self, stop: threading.Event, *, batch: int = 512) -> None:
        kafka = self.settings.kafka
        c = consumer(kafka, STAGE)
        p = producer(kafka)
        dlq = DeadLetters(p, STAGE, self.accounting)
        c.subscribe([ITEMS.name])
        bar = tqdm(desc="index items", unit="item", disable=not self.progress, leave=False)
        try:
            while not stop.is_set():
                msgs = c.consume(num_messages=batch, timeout=0.5)
                if not msgs:
                    continue
                # items: decode, dead-letter what does not parse
                items: dict[int, ItemEvent] = {}
                offsets: dict[tuple[str, int], int] = {}
                for m in msgs:
                    if m.error():
                        log.error("consume error: %s", m.error())
                        continue
                    offsets[(m.topic() or ITEMS.name, m.partition() or 0)] = (m.offset() or 0) + 1
                    self.accounting.add("in")
                    try:
                        ev = decode(m.value(), ItemEvent)
                    except DecodeError as e:
                        dlq.send(m, e)
                        continue
                    items[ev.item_id] = ev  # the last event of an id in the batch wins (compaction)
                # new: never recompute a vector under the same encoder
                indexed = self.index_items(list(items.values()))
                self.accounting.add("skipped_known", len(items) - indexed)
                p.flush(10)
                commit_offsets(c, offsets)
                bar.update(len(msgs))
        finally:
            bar.close()
            p.flush(10)
            c.close()

    def index_items(self, items: list[ItemEvent]) -> int:
        """Embed and upsert the items not yet in the collection; returns how many were embedded."""
        if not items:
            return 0
        ids = np.asarray([it.item_id for it in items], dtype=np.int64)
        known = set(self.index.retrieve(self.collection, ids).ids.tolist())
        new = [it for it in items if it.item_id not in known]
        if not new:
            return 0
        vectors = self.encoder.encode([it.text for it in new])
        payloads = [{"text": it.text, "category": it.category} for it in new]
        self.index.upsert(self.collection, Points(np.asarray([it.item_id for it in new], np.int64), vectors, payloads))
        self.accounting.add("indexed", len(new))
        return len(new)
