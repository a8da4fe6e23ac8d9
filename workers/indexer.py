"""Indexer: ``items`` → frozen encoder → Qdrant collection ``items__<encoder>``.

Reads top to bottom: poll a batch of item events, dead-letter the bad ones, drop the ones already
indexed under this encoder (a vector is never recomputed under the same encoder), embed the rest in
one batch, upsert them with their text as payload, then commit the offsets the batch covered.

Accounting: every consumed message ends in exactly one outcome, so ``in`` equals the sum of
``indexed``, ``skipped_known`` (already in the collection), ``superseded`` (a later event of the same
item in the same batch won), ``tombstone`` (a compaction delete marker) and ``dlq:<reason>``.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
from tqdm import tqdm

from runtime.encoder import Encoder, encode_items
from runtime.kafka import Accounting
from runtime.settings import Settings
from runtime.stage_io import StageIO
from runtime.stage_port import StagePort
from runtime.vectors.index import Points, VectorIndex
from schemas.events import ItemEvent
from schemas.topics import ITEMS

log = logging.getLogger(__name__)
STAGE = "indexer"


class Indexer:
    """One consumer-group member of the indexer; several may run (items are partitioned by id)."""

    def __init__(self, settings: Settings, index: VectorIndex, encoder: Encoder, *,
                 progress: bool = True) -> None:
        self.settings = settings
        self.index = index
        self.encoder = encoder
        self.collection = settings.encoder.collection
        self.accounting = Accounting(STAGE)
        self.progress = progress
        self.index.ensure_collection(self.collection, encoder.dim)

    def run(self, stop: threading.Event, *, batch: int = 512, io: StagePort | None = None) -> None:
        """Index until ``stop``; ``io`` replaces the Kafka I/O (the in-memory twin of the unit tests)."""
        if io is None:
            io = StageIO(self.settings.kafka, STAGE, self.accounting, registry=self.settings.schema_registry)
        io.subscribe([ITEMS.name])
        bar = tqdm(desc="index items", unit="item", disable=not self.progress, leave=False)
        dirty = False  # points added since the last optimize
        with io:
            while not stop.is_set():
                msgs = io.poll(batch, 0.5)
                if not msgs:
                    if dirty:  # idle: let the engine merge segments / build HNSW (embedded engine only)
                        self._optimize()
                        dirty = False
                    continue
                # items: decode, dead-letter what does not parse
                items: dict[int, ItemEvent] = {}
                for m in msgs:
                    self.accounting.add("in")
                    if m.value() is None:
                        # a compaction delete marker, not bad input: the vector stays (labels already
                        # produced may reference the item; the frozen space never changes under them)
                        self.accounting.add("tombstone")
                        io.done(m)
                        continue
                    ev = io.decode(m, ItemEvent)
                    if ev is None:
                        continue
                    if ev.item_id in items:
                        self.accounting.add("superseded")  # the last event of an id in the batch wins
                    items[ev.item_id] = ev
                # new: never recompute a vector under the same encoder
                indexed = self.index_items(list(items.values()))
                self.accounting.add("skipped_known", len(items) - indexed)
                dirty |= indexed > 0
                for m in msgs:
                    io.done(m)
                # dead letters must be on the broker before the offsets that skip their input move on;
                # a failed commit only means a re-read, and re-indexing skips known items
                if not io.commit(stop, what="dead letters"):
                    break
                bar.update(len(msgs))
        bar.close()

    def _optimize(self) -> None:
        """Run the engine's optimizer if it has one (qdrant-edge never optimises on its own)."""
        optimize = getattr(self.index, "optimize", None)
        if callable(optimize):
            optimize(self.collection)

    def index_items(self, items: list[ItemEvent]) -> int:
        """Embed and upsert the items not yet in the collection; returns how many were embedded."""
        if not items:
            return 0
        ids = np.asarray([it.item_id for it in items], dtype=np.int64)
        known = set(self.index.retrieve(self.collection, ids).ids.tolist())
        new = [it for it in items if it.item_id not in known]
        if not new:
            return 0
        ids = np.asarray([it.item_id for it in new], np.int64)
        vectors = encode_items(self.encoder, ids, [it.text for it in new])
        payloads = [{"text": it.text, "category": it.category} for it in new]
        self.index.upsert(self.collection, Points(ids, vectors, payloads))
        self.accounting.add("indexed", len(new))
        return len(new)
