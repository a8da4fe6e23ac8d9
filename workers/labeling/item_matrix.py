"""The frozen item vectors in process: a hash index of int64 ids over one float32 matrix.

A retrieve from the vector engine costs ~12 ms per 1,000 vectors, a lookup + gather from this matrix
~0.1 ms: the labeler's hot path reads item vectors only from here, fetching misses from the index.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np

from gpl.runtime.vectors.index import VectorIndex
from gpl.runtime.vectors.normalize import normalize

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- item vectors

class ItemMatrix:
    """Dense cache of the item collection: int64 ids → rows of one float32 matrix (normalised).

    Why: a vector-engine retrieve turns every record into a Python list (~12 ms per 1,000 vectors);
    a vectorised id → row lookup plus one ``take`` on this matrix is ~0.1 ms. Rows are appended
    (capacity doubling), so adding items never re-sorts or copies the matrix per call.

    The id → row index is an open-addressing hash table (linear probing, Fibonacci hashing, load
    ≤ 1/4) probed for all candidates at once, a few vectorised rounds per batch. It replaced a
    ``searchsorted`` over the sorted ids: on a 20k-item catalogue and fresh random candidates, the
    binary search's unpredictable branches cost ~90 µs per 1,000 ids, the hash ~30 µs (measured with
    ``gpl.bench``; with the same ids repeated the branch predictor hides this, so micro-benchmarks that
    reuse one query array mislead).

    ``load`` scrolls the collection once at start; ``fetch`` retrieves misses from the index later
    (items indexed after the labeler started). An id that the index did not have is not asked for
    again within ``retry_s`` seconds, so a stream of unknown items does not turn every request into a
    12 ms round trip.
    """

    _EMPTY = -1  # item ids are >= 0
    _MULT = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: spreads sequential ids too

    def __init__(self, index: VectorIndex | None = None, collection: str = "", encoder: str = "", *,
                 retry_s: float = 30.0) -> None:
        self.index = index
        self.collection = collection
        self.encoder = encoder
        self.retry_s = retry_s
        self._row_ids = np.zeros(0, np.int64)  # id of each matrix row (capacity)
        self._mat = np.zeros((0, 0), np.float32)  # capacity rows; the first _n are used
        self._n = 0
        self._dim: int | None = None
        self._bits = 0
        self._keys = np.zeros(0, np.int64)  # hash slots: item id or _EMPTY
        self._slot_rows = np.zeros(0, np.int32)  # hash slots: matrix row
        self._rehash(1024)
        self._absent: dict[int, float] = {}  # id -> monotonic time the index last did not have it

    def __len__(self) -> int:
        return self._n

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def matrix(self) -> np.ndarray:
        """The used rows (a view); row numbers are those :meth:`lookup` returns."""
        return self._mat[: self._n]

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
                    self._rehash(4 * total)
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
            self._mat = np.zeros((0, self._dim), np.float32)
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
            new_rows = np.arange(self._n, self._n + m, dtype=np.int64)
            self._n += m
            if 4 * self._n > self._keys.size:
                self._rehash(4 * self._n)  # re-inserts every row, the new ones included
            else:
                self._insert(new_ids, new_rows)
            if self._absent:
                for i in new_ids.tolist():
                    self._absent.pop(i, None)
        return m

    def _reserve(self, n: int, *, exact: bool = False) -> None:
        if n <= self._mat.shape[0]:
            return
        cap = n if exact else max(n, 2 * self._mat.shape[0], 1024)
        grown = np.zeros((cap, self._dim or 0), np.float32)
        grown[: self._n] = self._mat[: self._n]
        self._mat = grown
        row_ids = np.zeros(cap, np.int64)
        row_ids[: self._n] = self._row_ids[: self._n]
        self._row_ids = row_ids

    def _slot(self, ids: np.ndarray) -> np.ndarray:
        """Home slot of each id: the top ``bits`` bits of id × 2^64/φ (wrapping uint64 arithmetic)."""
        return ((ids.view(np.uint64) * self._MULT) >> np.uint64(64 - self._bits)).astype(np.int64)

    def _rehash(self, min_slots: int) -> None:
        self._bits = max(10, int(min_slots - 1).bit_length())
        self._keys = np.full(1 << self._bits, self._EMPTY, np.int64)
        self._slot_rows = np.zeros(1 << self._bits, np.int32)
        if self._n:
            self._insert(self._row_ids[: self._n].copy(), np.arange(self._n, dtype=np.int64))

    def _insert(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Place ids that are not in the table yet, all at once: per round, each id tries its current
        slot; of several wanting one free slot the first wins; the rest move one slot on."""
        mask = self._keys.size - 1
        pos = self._slot(ids)
        todo = np.arange(ids.size)
        while todo.size:
            p = pos[todo]
            free = self._keys[p] == self._EMPTY
            slots, first = np.unique(p[free], return_index=True)
            winners = todo[free][first]
            self._keys[slots] = ids[winners]
            self._slot_rows[slots] = rows[winners]
            placed = np.zeros(ids.size, bool)
            placed[winners] = True
            todo = todo[~placed[todo]]
            pos[todo] = (pos[todo] + 1) & mask

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, missing): vectorised id → row. Rows of missing ids are meaningless; mask them out."""
        ids = np.asarray(ids, dtype=np.int64)  # no copy when it already is (the hash reads the bits)
        keys, slot_rows = self._keys, self._slot_rows
        pos = self._slot(ids)
        k = keys[pos]
        rows = slot_rows[pos]
        hit = k == ids
        missing = ~hit
        if hit.all():
            return rows, missing
        mask = keys.size - 1
        todo = np.flatnonzero(missing & (k != self._EMPTY))  # slot taken by another id: probe on
        while todo.size:
            p = (pos[todo] + 1) & mask
            pos[todo] = p
            kt = keys[p]
            found = kt == ids[todo]
            rows[todo[found]] = slot_rows[p[found]]
            missing[todo[found]] = False
            todo = todo[~found & (kt != self._EMPTY)]
        return rows, missing

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` (one copy; ``take`` is faster than fancy indexing)."""
        return np.take(self._mat, rows, axis=0)

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
