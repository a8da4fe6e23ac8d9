"""The anchors stage without its Kafka loop: the set maker and the policy engine a worker holds.

Why apart: workers/anchors/loop.py only polls and performs (done, pause, resume, produce, commit); what a
worker *is* — its :class:`~workers.anchors.sets.AnchorMaker` (history lookup, generation with the replay
cache, embedding, index slots) and its :class:`~workers.anchors.engine.AnchorsEngine` (which request is served
when) — lives here, so eval, the bench and the unit tests make anchor sets with no broker involved
(:meth:`AnchorStage.generate_for`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.encoder import Encoder
from runtime.kafka import Accounting
from runtime.offsets import TP
from runtime.settings import Settings
from runtime.vectors.index import VectorIndex
from schemas.events import AnchorRequest, AnchorSet
from workers.anchors.engine import AnchorsEngine
from workers.anchors.generation_cache import GenerationCache
from workers.anchors.generators.base import AnchorGenerator
from workers.anchors.sets import AnchorMaker
from workers.anchors.vector_anchors import VectorAnchorSource

STAGE = "anchors"


@dataclass
class Origin:
    """Where a pending request came from: its message (for the DLQ) and its partition/offset."""

    msg: Any
    tp: TP
    offset: int


class AnchorStage:
    """A worker's maker and policy engine; the broker side is :class:`~workers.anchors.AnchorWorker`."""

    def __init__(self, settings: Settings, index: VectorIndex, encoder: Encoder,
                 generator: AnchorGenerator | VectorAnchorSource, *, progress: bool = False,
                 cache: GenerationCache | None = None) -> None:
        self.settings = settings
        self.index = index
        self.encoder = encoder
        self.generator = generator
        self.accounting = Accounting(STAGE)
        self.maker = AnchorMaker(settings, index, encoder, generator, self.accounting, cache=cache)
        self.items, self.collection = self.maker.items, self.maker.collection
        self.vector_source, self.cache = self.maker.vector_source, self.maker.cache
        self.progress = progress
        self.engine: AnchorsEngine[Origin] = AnchorsEngine(settings.anchors, self.accounting)

    @property
    def max_queued(self) -> int:
        """The pending queue's high-water mark (tests, logs)."""
        return self.engine.max_queued

    @property
    def pauses(self) -> int:
        """How often backpressure paused the partitions."""
        return self.engine.pauses

    def generate_for(self, requests: list[AnchorRequest]) -> list[AnchorSet]:
        """Anchor sets for the requests, stored in the vector index, no broker involved (:class:`AnchorMaker`)."""
        return self.maker.generate_for(requests)

    def _generate(self, requests: list[AnchorRequest]) -> tuple[list[AnchorSet], dict[str, tuple[str, str]]]:
        """(anchor sets, {user_id: (reason, detail)} of the requests that got none)."""
        return self.maker.generate(requests)

    def history_items(self, requests: list[AnchorRequest], *, need_text: bool = True
                      ) -> dict[str, tuple[list[int], list[str], np.ndarray]]:
        """Per user: the recent history ids found in the item collection, their texts and their vectors."""
        return self.maker.history_items(requests, need_text=need_text)
