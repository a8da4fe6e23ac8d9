"""An in-memory vector index (numpy): the twin of the Qdrant engines for unit tests of pure logic."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from runtime.vectors.index import MissingCollection, Points, exact_top


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
            raise MissingCollection(f"no collection {name!r}")
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
        return exact_top(self.retrieve(name, list(ids) if ids is not None else list(self._col(name))), vector, limit)

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
