"""A small learnable world for the pre-ranker's serving tests: a real Trainer fed without a broker.

Items have unit content vectors; a user clicks an exposed item when its vector leans towards a hidden
direction (plus a per-user offset), so a trained pre-ranker ranks clearly better than chance and a
sabotaged one clearly worse. The trainer's Kafka loop is covered by tests/integration/test_trainer.py; these tests
exercise what happens at a checkpoint (holdout, gate, publication, export) with the real model and files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.settings import Settings
from runtime.vectors.index import Points
from runtime.vectors.memory import MemoryIndex
from schemas.events import Lineage, Sample, SampleBatch
from schemas.ids import sample_id
from workers.anchors.policy import anchor_point_id
from workers.trainer import Trainer

DIM = 16
ITEMS = 80
LINEAGE = Lineage(anchor_version=1, anchor_model="test", prompt_hash="h", encoder="hash-bow-64",
                  collection="items__hash-bow-64")


def world_settings(tmp_path: Path, **trainer: object) -> Settings:
    return Settings(data_dir=tmp_path / "data").with_overrides(trainer={
        "batch_size": 32, "lr": 1e-2, "checkpoint_every": 10_000, "hash_buckets": 1024, "id_dim": 8, "hidden": 16,
        "holdout_fraction": 0.2, "publish_min_holdout": 50, "publish_margin": 0.01, **trainer,
    })


def item_vectors(seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(ITEMS, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def world_index(settings: Settings) -> MemoryIndex:
    idx = MemoryIndex()
    idx.ensure_collection(settings.encoder.collection, DIM)
    idx.upsert(settings.encoder.collection, Points(np.arange(1, ITEMS + 1, dtype=np.int64), item_vectors()))
    return idx


def put_anchors(settings: Settings, index: MemoryIndex, users: list[str], k: int = 3) -> None:
    """``k`` anchors for each of ``users`` in the anchors collection, as the anchors worker writes them (point ids
    from (user, slot), ``generated_at`` in the payload): what the trainer reads for the anchor cross feature."""
    name = settings.qdrant.anchors_collection
    index.ensure_collection(name, DIM)
    vec = item_vectors()
    for n, u in enumerate(users):
        rows = vec[[(n * 7 + j * 11) % ITEMS for j in range(k)]]
        index.upsert(name, Points(np.asarray([anchor_point_id(u, j) for j in range(k)], np.int64), rows,
                                  [{"user_id": u, "slot": j, "generated_at": 1000 + n} for j in range(k)]))


def requests(first: int, n: int, seed: int = 1) -> list[SampleBatch]:
    """Requests ``first..first+n-1``: 12 exposed items each, clicked when the item leans the hidden way."""
    vec = item_vectors()
    direction = np.zeros(DIM, np.float32)
    direction[0] = 1.0
    out = []
    for r in range(first, first + n):
        rng = np.random.default_rng([seed, r])
        user = f"u{r % 40}"
        offset = 0.3 * ((r % 40) / 40.0 - 0.5)
        items = rng.choice(ITEMS, 12, replace=False) + 1
        samples = [
            Sample(sample_id=sample_id(f"r{r}", int(i)), item_id=int(i), label=float(click), weight=1.0,
                   source="click" if click else "exposed-negative")
            for i in items
            for click in [bool(vec[i - 1] @ direction > 0.15 + offset)]
        ]
        out.append(SampleBatch(request_id=f"r{r}", user_id=user, ts=1_700_000_000_000 + r, samples=samples,
                               lineage=LINEAGE))
    return out


def feed(trainer: Trainer, batches: list[SampleBatch]) -> Path | None:
    """What the run loop does with these messages, then a checkpoint (and its gate)."""
    trainer._fetch_vectors({s.item_id for b in batches for s in b.samples})
    for b in batches:
        trainer._admit(b)
        trainer._dirty = True
        while len(trainer._pending) >= trainer.cfg.batch_size:
            trainer._train(trainer.cfg.batch_size)
    return trainer.checkpoint()
