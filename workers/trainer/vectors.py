"""The trainer's cache of frozen item vectors, and the history profile it builds from them.

Split out of ``workers/trainer/loop.py``: a content vector is never recomputed under one encoder, so the
trainer asks the vector index once per item and keeps the answer (bounded: cleared when full, keeping
the items asked for). Items missing from the index are simply absent here; the trainer's vector wait
(workers/trainer/vector_wait.py) decides what happens to their samples.
"""

from __future__ import annotations

import numpy as np

from runtime.vectors.index import VectorIndex
from workers.history import profile_of

VECTOR_CACHE_MAX = 200_000  # item vectors kept in memory (~300 MB at 384 dims); cleared when full


class VectorCache:
    """Item id → content vector, filled from ``collection`` of the index."""

    def __init__(self, index: VectorIndex, collection: str, capacity: int = VECTOR_CACHE_MAX) -> None:
        self.index = index
        self.collection = collection
        self.capacity = capacity
        self.vectors: dict[int, np.ndarray] = {}

    def __contains__(self, item_id: int) -> bool:
        return item_id in self.vectors

    def __getitem__(self, item_id: int) -> np.ndarray:
        return self.vectors[item_id]

    def get(self, item_id: int) -> np.ndarray | None:
        return self.vectors.get(item_id)

    def fetch(self, item_ids: set[int]) -> None:
        """Fill the cache with the vectors of ``item_ids`` (never recomputed under one encoder)."""
        missing = [i for i in item_ids if i not in self.vectors]
        if not missing:
            return
        if len(self.vectors) + len(missing) > self.capacity:  # start over, keeping this poll's items
            self.vectors.clear()
            missing = list(item_ids)
        pts = self.index.retrieve(self.collection, np.asarray(missing, np.int64))
        for i, v in zip(pts.ids.tolist(), pts.vectors, strict=True):
            self.vectors[int(i)] = np.asarray(v, np.float32)

    def profile(self, items: list[int], model_dim: int | None) -> np.ndarray | None:
        """The history profile of ``items`` (None while neither a model nor a vector tells its size)."""
        if any(i not in self.vectors for i in items):
            self.fetch(set(items))
        known = [i for i in items if i in self.vectors]
        dim = model_dim if model_dim is not None else (len(self.vectors[known[0]]) if known else 0)
        if not dim:  # no model and no vector yet: the profile's size is not known, and it would be zeros
            return None
        return profile_of(items, self.vectors, dim)
