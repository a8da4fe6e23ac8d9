"""A reader stage in its own process (gpl/stage_process.py) over the real broker and the item snapshot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gpl.stack import Stack, Stages
from gpl.stage_process import ProcessStage
from runtime.broker import Broker
from runtime.vectors.index import Points
from runtime.vectors.normalize import normalize
from schemas.events import Anchor, AnchorSet, UnexposedBatch
from tests.fixtures.settings import make_settings
from tests.helpers import drain, produce, wait_for

DIM = 64


def test_labeler_in_its_own_process_labels_from_the_snapshot(tmp_path: Path, broker: Broker) -> None:
    s = make_settings(tmp_path, broker, encoder={"model": "hash-bow-64"},
                      labeler={"random_n": 5, "cap": 5})
    rng = np.random.default_rng(0)
    vecs = normalize(rng.standard_normal((50, DIM)).astype(np.float32))
    with Stack(s) as stack:
        s = stack.settings
        stack.index.ensure_collection(s.encoder.collection, DIM)
        stack.index.upsert(s.encoder.collection, Points(np.arange(1, 51, dtype=np.int64), vecs, [{}] * 50))
        assert not isinstance(stack.make("indexer", progress=False), ProcessStage)  # writers stay with the engine
        labeler = stack.make("labeler")
        assert isinstance(labeler, ProcessStage)
        with Stages({"labeler": labeler}) as stages:
            produce(s, "anchors", [AnchorSet(user_id="u1", version=1, model="m", prompt_hash="h",
                                             encoder="hash-bow-64", generated_at=1,
                                             anchors=[Anchor(text="a", vector=vecs[0].tolist())])])
            produce(s, "unexposed", [UnexposedBatch(request_id="r1", user_id="u1", ts=1,
                                                    item_ids=list(range(1, 21)), recall_scores=[0.5] * 20)])
            wait_for(lambda: labeler.accounting["labeled"] == 1, 90,
                     lambda: f"the child to label the batch: {labeler.accounting.snapshot()}")
            assert labeler.deferred == 0  # a public counter, mirrored from the child
        assert not stages.errors
        assert labeler.pid is not None and labeler.pid != os.getpid()
        assert labeler.peak_rss_bytes > 0
        batches = [b for b in drain(s, "samples") if b.get("lineage")]
        assert [b["request_id"] for b in batches] == ["r1"] and len(batches[0]["samples"]) == 5


def test_a_failing_child_is_reported_like_a_crashed_thread(tmp_path: Path, broker: Broker) -> None:
    s = make_settings(tmp_path, broker)
    with Stages({"nope": ProcessStage("no-such-stage", s)}) as stages:
        wait_for(lambda: not stages.alive()["nope"], 60, "the child to fail")
    assert "unknown stage" in repr(stages.errors["nope"])


def test_a_child_takes_the_stages_own_name_keyword(tmp_path: Path, broker: Broker) -> None:
    """The demo's exposed-only trainer: ``name`` and ``directory`` go to the Trainer, not to the wrapper."""
    s = make_settings(tmp_path, broker)
    trainer = ProcessStage("trainer", s, progress=False, name="trainer-b", directory=tmp_path / "ckpt-b")
    with Stages({"b": trainer}) as stages:
        wait_for(lambda: "counts" in trainer._mirror, 90, "the child to report")
    assert not stages.errors
    assert trainer.counts["messages"] == 0
