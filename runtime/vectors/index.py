"""The vector index seam: one small interface, an embedded engine, a server client, an in-memory twin.

* :class:`MemoryIndex` — numpy, for unit tests of pure logic.
* ``EdgeIndex`` (runtime/vectors/edge.py) — qdrant-edge, Qdrant's embedded Rust engine, in a data dir:
  the embedded default (qdrant-client's pure-Python local mode is far too slow, docs/design.md §5).
* ``ServerIndex`` (runtime/vectors/server.py) — qdrant-client against a Qdrant server (production).

Point ids are the contracts' non-negative int64 item ids (or, for anchors, ids derived from user and
slot). Vectors are float32 and L2-normalised by the caller; the distance is cosine (= dot product).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class Points:
    """A batch of points as arrays: ``ids`` int64 (n,), ``vectors`` float32 (n, dim), payload dicts."""

    ids: np.ndarray
    vectors: np.ndarray
    payloads: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def exact_top(pts: Points, vector: np.ndarray, limit: int) -> list[tuple[int, float]]:
    """The ``limit`` best of ``pts`` by dot product with ``vector`` (a scan): for the adapters without an
    ANN index of their own (the in-memory twin, the read-only snapshot)."""
    if not len(pts):
        return []
    scores = pts.vectors @ np.asarray(vector, dtype=np.float32)
    order = np.argsort(-scores)[:limit]
    return [(int(pts.ids[j]), float(scores[j])) for j in order]


class MissingCollection(KeyError):
    """The collection does not exist (yet): no snapshot of it, or the server or engine lacks it.

    A ``KeyError`` (what every adapter raised before), of its own type so that a reader can tell "the
    indexer has not created it yet" from any other lookup failure.
    """


class VectorIndex(AbstractContextManager["VectorIndex"], Protocol):
    def ensure_collection(self, name: str, dim: int) -> None:
        """Create the collection (cosine distance) if it does not exist."""

    def upsert(self, name: str, points: Points) -> None: ...

    def retrieve(self, name: str, ids: Sequence[int] | np.ndarray, *, with_payload: bool = False) -> Points:
        """The points among ``ids`` that exist, in the order of ``ids``; missing ids are skipped."""

    def search(self, name: str, vector: np.ndarray, limit: int, *, ids: Sequence[int] | None = None
               ) -> list[tuple[int, float]]:
        """Nearest points by cosine, optionally restricted to ``ids``: [(id, score)] best first."""

    def count(self, name: str) -> int: ...

    def scroll(self, name: str, batch: int = 1024, *, with_payload: bool = False) -> Iterator[Points]:
        """Every point of the collection, in batches."""

    def delete(self, name: str, ids: Sequence[int]) -> None: ...

    def close(self) -> None: ...


class MissingAsEmpty:
    """A reader's view of an index in which a missing collection (:class:`MissingCollection`) reads as an
    empty one: ``retrieve`` finds nothing, ``search`` nothing, ``count`` 0, ``scroll`` no batch.

    For the stages that only look item vectors up (streams, trainer): before the indexer's first item
    snapshot, or before it created the collection on a Qdrant server, no item is known yet; that is the
    ``streams.unknown_items`` policy's case (or the stage's own wait for unknown items), never an error
    that dead-letters a valid message. Writes and every other failure pass through unchanged.
    """

    def __init__(self, inner: VectorIndex) -> None:
        self.inner = inner

    def __enter__(self) -> MissingAsEmpty:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.inner.__exit__(*exc)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def retrieve(self, name: str, ids: Sequence[int] | np.ndarray, *, with_payload: bool = False) -> Points:
        try:
            return self.inner.retrieve(name, ids, with_payload=with_payload)
        except MissingCollection:
            return Points(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), [])

    def search(self, name: str, vector: np.ndarray, limit: int, *, ids: Sequence[int] | None = None
               ) -> list[tuple[int, float]]:
        try:
            return self.inner.search(name, vector, limit, ids=ids)
        except MissingCollection:
            return []

    def count(self, name: str) -> int:
        try:
            return self.inner.count(name)
        except MissingCollection:
            return 0

    def scroll(self, name: str, batch: int = 1024, *, with_payload: bool = False) -> Iterator[Points]:
        try:
            yield from self.inner.scroll(name, batch, with_payload=with_payload)
        except MissingCollection:
            return
