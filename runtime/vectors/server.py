"""ServerIndex: the :class:`~runtime.vectors.index.VectorIndex` on a Qdrant server, through qdrant-client.

Production runs several worker processes against one Qdrant server; the embedded engine
(:mod:`runtime.vectors.edge`) allows only one process per data directory. The semantics are the same
(cosine, int64 ids, payload dicts), which the shared contract tests check by running this class on
qdrant-client's local mode (``QdrantClient(":memory:")``), the stand-in where no server runs.

What the server API does not promise and this class adds:

* ``retrieve`` answers in no particular order: points are put back in the order of the ids.
* writes are sent in bounded batches with ``wait=True``: the indexer commits its offsets after an
  upsert returns, so the upsert must be applied (visible to ``retrieve``) by then.
* an unknown collection raises ``MissingCollection`` (a ``KeyError``) like the other engines (checked
  once per name, then remembered), instead of a transport-specific error.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any, cast

import numpy as np
from qdrant_client import QdrantClient, models

from runtime.vectors.index import MissingCollection, Points


class ServerIndex:
    """qdrant-client over a server (``url``), or over an injected client (tests: ``":memory:"``)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        client: QdrantClient | None = None,
        batch: int = 512,
        timeout: int = 30,
    ) -> None:
        self._owns_client = client is None
        self.client = client if client is not None else QdrantClient(url=url, api_key=api_key,
                                                                      timeout=timeout)
        self.batch = max(1, batch)
        self._dims: dict[str, int] = {}
        self._lock = threading.Lock()  # guards _dims only; the client handles its own concurrency

    def __enter__(self) -> ServerIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- collections ----------------------------------------------------------------------------

    def _server_dim(self, name: str) -> int:
        params = self.client.get_collection(name).config.params.vectors
        if not isinstance(params, models.VectorParams):
            raise ValueError(f"collection {name} uses named vectors; GPL expects one unnamed vector")
        if params.distance != models.Distance.COSINE:
            raise ValueError(f"collection {name} uses {params.distance}, not cosine")
        return int(params.size)

    def ensure_collection(self, name: str, dim: int) -> None:
        """Create the collection (cosine) if missing; ValueError when it exists with another dim."""
        with self._lock:
            have = self._dims.get(name)
        if have is None:
            if not self.client.collection_exists(name):
                try:
                    self.client.create_collection(
                        name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
                    )
                except Exception:
                    # another worker may have created it in the meantime: only that case is fine
                    if not self.client.collection_exists(name):
                        raise
            have = self._server_dim(name)
        if have != dim:
            raise ValueError(f"collection {name} has dim {have}, not {dim}")
        with self._lock:
            self._dims[name] = have

    def _known(self, name: str) -> None:
        """Raise KeyError for a collection the server does not have (asked once per name)."""
        with self._lock:
            if name in self._dims:
                return
        if not self.client.collection_exists(name):
            raise MissingCollection(f"no collection {name!r}")
        dim = self._server_dim(name)
        with self._lock:
            self._dims[name] = dim

    # -- points -----------------------------------------------------------------------------------

    def upsert(self, name: str, points: Points) -> None:
        n = len(points)
        if n == 0:
            return
        self._known(name)
        vectors = np.asarray(points.vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != n:
            raise ValueError(f"vectors shape {vectors.shape} does not match {n} ids")
        dim = self._dims[name]
        if vectors.shape[1] != dim:
            raise ValueError(f"collection {name} has dim {dim}, got vectors of dim {vectors.shape[1]}")
        if points.payloads and len(points.payloads) != n:
            raise ValueError(f"{len(points.payloads)} payloads for {n} ids")
        ids = np.asarray(points.ids, dtype=np.int64).tolist()
        for s in range(0, n, self.batch):
            e = min(n, s + self.batch)
            payloads = [dict(p) for p in points.payloads[s:e]] if points.payloads else None
            self.client.upsert(
                name,
                points=models.Batch(ids=ids[s:e], vectors=vectors[s:e].tolist(), payloads=payloads),
                wait=True,
            )

    def _to_points(self, name: str, records: Sequence[Any], with_payload: bool) -> Points:
        if not records:
            return Points(np.zeros(0, np.int64), np.zeros((0, self._dims.get(name, 0)), np.float32), [])
        ids = np.fromiter((int(r.id) for r in records), dtype=np.int64, count=len(records))
        vectors = np.asarray([cast(list[float], r.vector) for r in records], dtype=np.float32)
        payloads = [dict(r.payload or {}) for r in records] if with_payload else []
        return Points(ids, vectors, payloads)

    def retrieve(self, name: str, ids: Sequence[int] | np.ndarray, *, with_payload: bool = False) -> Points:
        """The points among ``ids`` that exist, in the order of ``ids`` (duplicates kept), with vectors."""
        self._known(name)
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64).ravel().tolist()]
        by_id: dict[int, Any] = {}
        unique = list(dict.fromkeys(wanted))
        for s in range(0, len(unique), self.batch * 4):
            for r in self.client.retrieve(name, unique[s : s + self.batch * 4], with_payload=with_payload,
                                          with_vectors=True):
                by_id[int(cast(int, r.id))] = r
        return self._to_points(name, [by_id[i] for i in wanted if i in by_id], with_payload)

    def search(self, name: str, vector: np.ndarray, limit: int, *, ids: Sequence[int] | None = None
               ) -> list[tuple[int, float]]:
        """Nearest points by cosine, best first; ``ids`` restricts the candidates (HasId filter)."""
        self._known(name)
        if limit <= 0 or (ids is not None and len(ids) == 0):
            return []
        flt = None
        if ids is not None:
            flt = models.Filter(must=[models.HasIdCondition(has_id=[int(i) for i in ids])])
        res = self.client.query_points(
            name, query=np.asarray(vector, dtype=np.float32).ravel().tolist(), limit=int(limit),
            query_filter=flt, with_payload=False, with_vectors=False,
        )
        return [(int(cast(int, p.id)), float(p.score)) for p in res.points]

    def count(self, name: str) -> int:
        self._known(name)
        return int(self.client.count(name, exact=True).count)

    def scroll(self, name: str, batch: int = 1024, *, with_payload: bool = False) -> Iterator[Points]:
        self._known(name)
        offset: Any = None
        while True:
            records, offset = self.client.scroll(name, limit=max(1, batch), offset=offset,
                                                 with_payload=with_payload, with_vectors=True)
            if records:
                yield self._to_points(name, records, with_payload)
            if offset is None:
                return

    def delete(self, name: str, ids: Sequence[int]) -> None:
        self._known(name)
        todo = [int(i) for i in ids]
        step = self.batch * 4
        for s in range(0, len(todo), step):
            chunk: list[Any] = todo[s : s + step]
            self.client.delete(name, points_selector=models.PointIdsList(points=chunk), wait=True)

    def close(self) -> None:
        """Close the client if this index made it; an injected client belongs to its caller."""
        if self._owns_client:
            self.client.close()
