"""The vector index seam: one small interface, an embedded engine, a server client, an in-memory twin.

* :class:`MemoryIndex` — numpy, for unit tests of pure logic.
* ``EdgeIndex`` (gpl/vectors_edge.py) — qdrant-edge, Qdrant's embedded Rust engine, in a data dir:
  the embedded default (qdrant-client's pure-Python local mode is far too slow, DESIGN.md §5).
* ``ServerIndex`` (gpl/vectors_server.py) — qdrant-client against a Qdrant server (production).

Point ids are the contracts' non-negative int64 item ids (or, for anchors, ids derived from user and
slot). Vectors are float32 and L2-normalised by the caller; the distance is cosine (= dot product).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from gpl.settings import Settings


@dataclass
class Points:
    """A batch of points as arrays: ``ids`` int64 (n,), ``vectors`` float32 (n, dim), payload dicts."""

    ids: np.ndarray
    vectors: np.ndarray
    payloads: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


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


class MemoryIndex:
    """Exact in-memory index with the same semantics as the real engines (unit tests only)."""

    def __init__(self) -> None:
        self._cols: dict[str, dict[int, tuple[np.ndarray, dict[str, Any]]]] = {}
        self._dims: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> MemoryIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure_collection(self, name: str, dim: int) -> None:
        with self._lock:
            if name in self._dims and self._dims[name] != dim:
                raise ValueError(f"collection {name} has dim {self._dims[name]}, not {dim}")
            self._cols.setdefault(name, {})
            self._dims[name] = dim

    def _col(self, name: str) -> dict[int, tuple[np.ndarray, dict[str, Any]]]:
        if name not in self._cols:
            raise KeyError(f"no collection {name!r}")
        return self._cols[name]

    def upsert(self, name: str, points: Points) -> None:
        with self._lock:
            col = self._col(name)
            pls = points.payloads or [{}] * len(points)
            for i, v, p in zip(points.ids.tolist(), points.vectors, pls, strict=True):
                col[int(i)] = (np.asarray(v, dtype=np.float32).copy(), dict(p))

    def retrieve(self, name: str, ids: Sequence[int] | np.ndarray, *, with_payload: bool = False) -> Points:
        with self._lock:
            col = self._col(name)
            found = [int(i) for i in np.asarray(ids).tolist() if int(i) in col]
            dim = self._dims[name]
            vecs = np.stack([col[i][0] for i in found]) if found else np.zeros((0, dim), np.float32)
            pls = [col[i][1] for i in found] if with_payload else []
            return Points(np.asarray(found, dtype=np.int64), vecs, pls)

    def search(self, name: str, vector: np.ndarray, limit: int, *, ids: Sequence[int] | None = None
               ) -> list[tuple[int, float]]:
        pts = self.retrieve(name, list(ids) if ids is not None else list(self._col(name)))
        if not len(pts):
            return []
        scores = pts.vectors @ np.asarray(vector, dtype=np.float32)
        order = np.argsort(-scores)[:limit]
        return [(int(pts.ids[j]), float(scores[j])) for j in order]

    def count(self, name: str) -> int:
        with self._lock:
            return len(self._col(name))

    def scroll(self, name: str, batch: int = 1024, *, with_payload: bool = False) -> Iterator[Points]:
        keys = sorted(self._col(name))
        for s in range(0, len(keys), batch):
            yield self.retrieve(name, keys[s : s + batch], with_payload=with_payload)

    def delete(self, name: str, ids: Sequence[int]) -> None:
        with self._lock:
            col = self._col(name)
            for i in ids:
                col.pop(int(i), None)

    def close(self) -> None:
        pass


def open_index(settings: Settings) -> VectorIndex:
    """The index the settings ask for: a Qdrant server when ``qdrant.url`` is set, else the embedded engine."""
    if settings.qdrant.url:
        from gpl.vectors_server import ServerIndex

        return ServerIndex(settings.qdrant.url, api_key=settings.qdrant.api_key or None)
    from gpl.vectors_edge import EdgeIndex

    return EdgeIndex(settings.data_dir / "qdrant", hnsw=settings.qdrant.hnsw)
