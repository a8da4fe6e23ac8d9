"""The frozen item vectors in process: a hash index of int64 ids over one float32 or bfloat16 matrix.

A retrieve from the vector engine costs ~12 ms per 1,000 vectors, a lookup + gather from this matrix
~0.1 ms: the labeler's hot path reads item vectors only from here, fetching misses from the index.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from runtime.vectors.id_index import IdIndex
from runtime.vectors.index import VectorIndex
from runtime.vectors.normalize import normalize
from workers.labeler.matching import (
    MatrixDtype,
    StorageDtype,
    _row_max,
    bf16_best,
    bf16_columns,
    bf16_similarities,
    bf16_view,
    choose_dtype,
    from_bf16,
    to_bf16,
)

log = logging.getLogger(__name__)

SMALL_GATHER = 128  # at most this many rows: bfloat16 rows are widened and multiplied in float32 (similarities)


# --------------------------------------------------------------------------------------- item vectors

class ItemMatrix:
    """Dense cache of the item collection: int64 ids → rows of one float32 matrix (normalised).

    Why: a vector-engine retrieve turns every record into a Python list (~12 ms per 1,000 vectors);
    a vectorised id → row lookup plus one ``take`` on this matrix is ~0.1 ms. Rows are appended
    (capacity doubling), so adding items never re-sorts or copies the matrix per call.

    The id → row index is a bucketed hash table probed for all candidates in one pass
    (:class:`~runtime.vectors.id_index.IdIndex`). It replaced a ``searchsorted`` over the sorted ids:
    on a 20k-item catalogue and fresh random candidates, the binary search's unpredictable branches
    cost ~180 µs per 1,000 ids, the hash ~45 µs (with the same ids repeated the branch predictor hides
    this, so micro-benchmarks that reuse one query array mislead).

    ``load`` scrolls the collection once at start; ``fetch`` retrieves misses from the index later
    (items indexed after the labeler started). An id that the index did not have is not asked for
    again within ``retry_s`` seconds, so a stream of unknown items does not turn every request into a
    12 ms round trip.

    Storage dtype (``dtype``; ``labeler.matrix_dtype``): ``float32``, or ``bfloat16`` (the bits in a
    uint16 array that torch reads in place): half the bytes per row, so the gather, which is
    memory-bound, moves half as much, and the product runs on the CPU's bfloat16 units with float32
    accumulation. ``auto`` lets :func:`~workers.labeler.matching.choose_dtype` time both on a small
    batch when the first vectors arrive (their dimension is known then). :meth:`gather` and
    :attr:`matrix` always return float32; :meth:`similarities` is the hot path in either dtype.
    """

    def __init__(self, index: VectorIndex | None = None, collection: str = "", encoder: str = "", *,
                 retry_s: float = 30.0, dtype: MatrixDtype = "float32") -> None:
        self.index = index
        self.requested_dtype: MatrixDtype = dtype
        self._dtype: StorageDtype | None = None if dtype == "auto" else dtype  # auto: settled on the first add
        self._tmat: Any = None  # bfloat16: a torch view of _mat
        self._anchor_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None, Any]] = {}
        self.collection = collection
        self.encoder = encoder
        self.retry_s = retry_s
        self._row_ids = np.zeros(0, np.int64)  # id of each matrix row (capacity)
        self._mat = np.zeros((0, 0), np.float32)  # capacity rows; the first _n are used
        self._n = 0
        self._dim: int | None = None
        self._index = IdIndex()  # item id -> row
        self._absent: dict[int, float] = {}  # id -> monotonic time the index last did not have it

    def __len__(self) -> int:
        return self._n

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def dtype(self) -> StorageDtype:
        """``float32`` or ``bfloat16``; ``auto`` reads as float32 until the first vectors settle it."""
        return self._dtype or "float32"

    @property
    def matrix(self) -> np.ndarray:
        """The used rows as float32 (a view; a copy for bfloat16); row numbers are those of :meth:`lookup`."""
        return self._mat[: self._n] if self.dtype == "float32" else from_bf16(self._mat[: self._n])

    @property
    def ids(self) -> np.ndarray:
        """The item id of each matrix row (a view)."""
        return self._row_ids[: self._n]

    def load(self, batch: int = 4096) -> int:
        """Scroll the whole collection into the matrix; a missing collection leaves it empty."""
        if self.index is None:
            return 0
        n = 0
        try:
            total = self.index.count(self.collection)
            for pts in self.index.scroll(self.collection, batch):
                n += self.add(pts.ids, pts.vectors)
                if self._mat.shape[0] < total:  # the final size at once: no doubling copies on the way
                    self._reserve(total, exact=True)
        except KeyError:
            log.warning("item collection %s does not exist yet; vectors will be fetched on demand",
                        self.collection)
        return n

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Insert or replace vectors (normalised here); rows with non-finite values are skipped.

        Returns how many ids were new.
        """
        ids = np.asarray(ids, dtype=np.int64).ravel()
        vecs = np.asarray(vectors, dtype=np.float32)
        if ids.size == 0:
            return 0
        if vecs.ndim != 2 or vecs.shape[0] != ids.size:
            raise ValueError(f"vectors of shape {vecs.shape} for {ids.size} ids")
        if (ids < 0).any():
            raise ValueError("item ids must be >= 0")
        if self._dim is None:
            self._dim = int(vecs.shape[1])
            self._dtype = choose_dtype(self.requested_dtype, self._dim)
            self._mat = np.zeros((0, self._dim), np.float32 if self._dtype == "float32" else np.uint16)
        elif vecs.shape[1] != self._dim:
            raise ValueError(f"item vectors have dim {self._dim}, got {vecs.shape[1]}")
        ok = np.isfinite(vecs).all(axis=1)
        if not ok.all():
            log.warning("%d item vectors with non-finite values skipped", int((~ok).sum()))
            ids, vecs = ids[ok], vecs[ok]
        # the last occurrence of an id wins (as in an upsert)
        uniq, first_in_reversed = np.unique(ids[::-1], return_index=True)
        keep = ids.size - 1 - first_in_reversed
        ids, vecs = uniq, normalize(vecs[keep])
        if self._dtype == "bfloat16":
            vecs = to_bf16(vecs)
        rows, missing = self.lookup(ids)
        known = ~missing
        if known.any():
            self._mat[rows[known]] = vecs[known]
        new_ids = ids[missing]
        m = int(new_ids.size)
        if m:
            self._reserve(self._n + m)
            self._mat[self._n : self._n + m] = vecs[missing]
            self._row_ids[self._n : self._n + m] = new_ids
            self._index.insert(new_ids, np.arange(self._n, self._n + m, dtype=np.int64))
            self._n += m
            if self._absent:
                for i in new_ids.tolist():
                    self._absent.pop(i, None)
        return m

    def _reserve(self, n: int, *, exact: bool = False) -> None:
        if n <= self._mat.shape[0]:
            return
        cap = n if exact else max(n, 2 * self._mat.shape[0], 1024)
        grown = np.zeros((cap, self._dim or 0), self._mat.dtype)
        grown[: self._n] = self._mat[: self._n]
        self._mat = grown
        if self._dtype == "bfloat16":
            self._tmat = bf16_view(self._mat)
        row_ids = np.zeros(cap, np.int64)
        row_ids[: self._n] = self._row_ids[: self._n]
        self._row_ids = row_ids

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, missing): vectorised id → row. Rows of missing ids are meaningless; mask them out."""
        return self._index.lookup(ids)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The float32 vectors of ``rows`` (one copy; ``take`` is faster than fancy indexing)."""
        got = self._mat.take(rows, axis=0)  # the method: np.take's Python wrapper costs ~1 µs a call
        return got if self.dtype == "float32" else from_bf16(got)

    def similarities(self, rows: np.ndarray, anchors: np.ndarray, centroid: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        """(m, K) float32 cosines of the rows with unit ``anchors`` (K, dim), and with ``centroid``.

        The (m, dim) x (dim, K) shape keeps each gathered row contiguous and is the one BLAS runs
        fastest (see :func:`~workers.labeler.matching._row_max`). float32: exactly the arithmetic of
        ``v = gather(rows); v @ anchors.T, v @ centroid`` (bit-identical labels); bfloat16: the
        centroid is one more column of the same GEMM
        (:func:`~workers.labeler.matching.bf16_similarities`), its anchors converted once per set;
        up to ``SMALL_GATHER`` rows (the drawn candidates of the shipped policy) are widened to float32
        and multiplied by BLAS instead: a oneDNN bfloat16 GEMM costs ~50 µs to set up whatever its size,
        the widening ~1 µs per 100 rows.
        """
        if self.dtype == "float32" or rows.shape[0] <= SMALL_GATHER:
            v = self.gather(rows)  # bfloat16 rows widen exactly to float32
            return v @ anchors.T, (v @ centroid if centroid is not None else None)
        s = bf16_similarities(self._tmat, rows, self._prepared(anchors, centroid))
        return (s[:, :-1], s[:, -1]) if centroid is not None else (s, None)

    def best(self, rows: np.ndarray, anchors: np.ndarray) -> np.ndarray:
        """max_k cos(a_k, v) of each row: gather + product + max and nothing else (the benchmark's
        limit proxy, in the matrix's own dtype)."""
        if self.dtype == "float32":
            return _row_max(np.take(self._mat, rows, axis=0) @ anchors.T)
        return bf16_best(self._tmat, rows, self._prepared(anchors, None))

    def _prepared(self, anchors: np.ndarray, centroid: np.ndarray | None) -> Any:
        """The (dim, K[+1]) bfloat16 tensor of an anchor set (and centroid), kept while the same arrays
        come back: a user's anchors serve many requests, and converting them costs ~30 µs a request."""
        key = (id(anchors), id(centroid))
        hit = self._anchor_cache.get(key)
        if hit is not None and hit[0] is anchors and hit[1] is centroid:
            return hit[2]
        if len(self._anchor_cache) >= 4096:  # bounded: the arrays it holds keep their ids valid
            self._anchor_cache.clear()
        cols = anchors if centroid is None else np.vstack([anchors, centroid[None, :].astype(anchors.dtype)])
        t = bf16_columns(cols)
        self._anchor_cache[key] = (anchors, centroid, t)
        return t

    def fetch(self, ids: np.ndarray) -> int:
        """Retrieve ids from the index, except those it lacked in the last ``retry_s``; returns how many."""
        if self.index is None or ids.size == 0:
            return 0
        now = time.monotonic()
        absent = self._absent
        wanted = [i for i in dict.fromkeys(ids.tolist()) if now - absent.get(i, -math.inf) >= self.retry_s]
        if not wanted:
            return 0
        try:
            pts = self.index.retrieve(self.collection, wanted)
        except KeyError:
            pts = None
        found = set(pts.ids.tolist()) if pts is not None and len(pts) else set()
        for i in wanted:
            if i not in found:
                self._absent[i] = now
        if len(self._absent) > 1_000_000:  # bound the negative cache; worst case we ask again
            self._absent.clear()
        if pts is not None and len(pts):
            self.add(pts.ids, pts.vectors)
        return len(found)

    def vectors_of(self, ids: np.ndarray, *, fetch: bool = True) -> np.ndarray:
        """The vectors of the ids that have one (fetching misses first when ``fetch``)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        rows, missing = self.lookup(ids)
        if fetch and missing.any():
            self.fetch(ids[missing])
            rows, missing = self.lookup(ids)
        return self.gather(rows[~missing])
