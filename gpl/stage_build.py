"""Build one stage from settings, an index and an encoder: shared by the stack (threads) and by a stage's
own process (gpl/stage_process.py), so both run exactly the same construction.

The stages that only look item vectors up (streams, labeler, trainer) see the index through
:class:`~runtime.vectors.index.MissingAsEmpty`: before the indexer's first item snapshot, or before it
created its collection on a Qdrant server, no item is known yet — the ``streams.unknown_items`` policy's
case (the labeler waits for unknown items, the trainer skips them), never a dead-lettered message."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from runtime.encoder import Encoder
from runtime.settings import Settings
from runtime.vectors.index import MissingAsEmpty, VectorIndex

STAGES = ("streams", "indexer", "anchors", "labeler", "trainer", "calibration")
ITEM_READERS = ("streams", "labeler", "trainer")  # look item vectors up, never write them


def build_stage(stage: str, s: Settings, idx: VectorIndex, encoder: Callable[[], Encoder], **kw: Any) -> Any:
    """One stage over the given settings and index; ``encoder`` is called only by stages that embed."""
    if stage in ITEM_READERS:
        idx = cast(VectorIndex, MissingAsEmpty(idx))
    if stage == "streams":
        from streams.app import StreamsProcessor

        return StreamsProcessor(s, idx)
    if stage == "indexer":
        from workers.indexer import Indexer

        return Indexer(s, idx, encoder(), **kw)
    if stage == "anchors":
        from gpl.backends import make_generator
        from workers.anchors import AnchorWorker

        enc = encoder()
        gen = kw.pop("generator", None) or make_generator(s, index=idx, encoder_dim=enc.dim)
        return AnchorWorker(s, idx, enc, gen, **kw)
    if stage == "labeler":
        from workers.labeler import Labeler

        return Labeler(s, idx, **kw)
    if stage == "trainer":
        from workers.trainer import Trainer

        return Trainer(s, idx, **kw)
    if stage == "calibration":
        from workers.calibration import CalibrationMonitor

        return CalibrationMonitor(s, **kw)
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
