"""Issue 20's done-when for the anchor cross feature, through a real broker: the labeler's SampleBatch carries it,
the trainer trains a model that reads it (real labels get it from the anchors collection), and ``gpl export``
writes it into the feature spec and the ONNX graph (parity checked by the export itself)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pytest

from gpl.cli import main
from runtime.settings import LabelerSettings, Settings
from runtime.vectors.index import Points
from runtime.vectors.memory import MemoryIndex
from schemas.events import Anchor, AnchorSet, Sample, SampleBatch
from schemas.ids import sample_id
from tests.integration.test_trainer import produce, reached, running, wait_for
from workers.anchor_cross import anchor_cross
from workers.anchors.policy import anchor_point_id
from workers.labeler.anchor_book import AnchorBook
from workers.labeler.assemble import label_batch
from workers.labeler.item_matrix import ItemMatrix
from workers.trainer import Trainer
from workers.trainer.checkpoints import load_checkpoint

pytestmark = pytest.mark.integration

DIM, ITEMS, ENC = 16, 60, "hash-bow-64"


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_the_feature_rides_the_samples_topic_into_the_model_and_the_export(settings: Settings,
                                                                           tmp_path: Path) -> None:
    s = settings.with_overrides(trainer={"anchor_cross": True, "batch_size": 16, "checkpoint_every": 10_000,
                                         "hash_buckets": 1024, "id_dim": 8, "hidden": 16, "holdout_fraction": 0.0})
    rng = np.random.default_rng(3)
    ids = np.arange(1, ITEMS + 1, dtype=np.int64)
    vectors = unit(rng, ITEMS)
    index = MemoryIndex()
    index.ensure_collection(s.encoder.collection, DIM)
    index.upsert(s.encoder.collection, Points(ids, vectors))
    # user u0's anchors, where the anchors worker puts them (the trainer and a server read them there) and in
    # the labeler's book
    anchors = unit(rng, 3)
    index.ensure_collection(s.qdrant.anchors_collection, DIM)
    index.upsert(s.qdrant.anchors_collection, Points(np.asarray([anchor_point_id("u0", k) for k in range(3)]),
                                                     anchors, [{"generated_at": 5} for _ in range(3)]))
    items = ItemMatrix(collection=s.encoder.collection, encoder=ENC)
    items.add(ids, vectors)
    book = AnchorBook(ENC, items)
    assert book.put(AnchorSet(user_id="u0", version=1, model="m", prompt_hash="p", encoder=ENC, generated_at=5,
                              anchors=[Anchor(text=f"a{k}", vector=a.tolist(), logprob=-0.5)
                                       for k, a in enumerate(anchors)])) == "accepted"

    cfg = LabelerSettings(label_source="map", top_n=0, random_n=12, cap=12, send_anchor_cross=True)
    batches: list[SampleBatch] = []
    for r in range(12):
        cand = ids[(np.arange(30) + 3 * r) % ITEMS]
        raw = orjson.dumps({"schema_version": 1, "request_id": f"r{r}", "user_id": "u0", "ts": 1000 + r,
                            "item_ids": cand.tolist()})
        pseudo = SampleBatch.model_validate_json(label_batch(raw, book, items, cfg)[0])
        for x in pseudo.samples:  # the labeler's SampleBatch carries the feature, from the anchors that labeled it
            assert x.anchor_cross == pytest.approx(anchor_cross(vectors[x.item_id - 1][None] @ anchors.T)[0], abs=2e-6)
        shown = cand[~np.isin(cand, [x.item_id for x in pseudo.samples])][:4]
        real = SampleBatch(request_id=f"r{r}", user_id="u0", ts=1000 + r, samples=[
            Sample(sample_id=sample_id(f"r{r}", int(i)), item_id=int(i), label=float(k == 0), weight=1.0,
                   source="click" if k == 0 else "exposed-negative") for k, i in enumerate(shown)])
        batches += [real, pseudo]
    produce(s, batches)
    trainer = Trainer(s, index, progress=False)
    with running(trainer):
        wait_for(reached(trainer, samples=sum(len(b.samples) for b in batches), steps=1))
    model, meta = load_checkpoint(s.checkpoints_dir)
    assert model.cfg.anchor_cross == 1 and meta["trainer_settings"]["anchor_cross"] is True

    out = tmp_path / "export"
    assert main(["--data-dir", str(s.data_dir), "export", str(s.checkpoints_dir), "--format", "onnx",
                 "--out", str(out)]) == 0
    spec = json.loads((out / "feature_spec.json").read_text())
    assert list(spec["inputs"])[-1] == "anchor_cross" and spec["inputs"]["anchor_cross"]["shape"] == ["n", 2]
    assert "anchors collection" in spec["inputs"]["anchor_cross"]["source"]
    assert spec["parity"]["max_abs_diff"] < 1e-5
