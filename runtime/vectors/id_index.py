"""int64 item id → matrix row, for a thousand ids at once: a bucketed hash table probed in one pass.

Used by the labeler's item matrix (id → row) and by the streams stage's catalogue of known items.

Why buckets: the linear-probing table it replaced resolved collisions in vectorised *rounds*; at load
1/4 about a quarter of the ids collide, so nearly every batch paid 3-4 rounds of a dozen small numpy
calls (~90 µs per 1,000 ids on the development VM, most of it call overhead). Here an id's home is a
bucket of ``WAYS`` slots, 32 contiguous bytes of keys: one ``take`` of the (m, WAYS) key block, one
comparison and one ``argmax`` find every id that is in its home bucket (~20 µs per 1,000). The few ids
whose home bucket was full when they were inserted (at most ~0.4% at the load kept here) live in a sorted
overflow array that a ``searchsorted`` consults only for ids not found at home.
"""
from __future__ import annotations

import numpy as np

WAYS = 4  # slots per bucket: 4 int64 keys are 32 bytes, half a cache line (lookup relies on 4: one uint32)
_WAY_OF_BYTE = np.uint32(0x00010203)  # see IdIndex.lookup


class IdIndex:
    """Bucketed hash of non-negative int64 ids to int32 rows; no deletion (the item matrix only grows).

    Buckets are kept at least as many as ids (a power of two: load <= 1/WAYS of the slots), so a
    bucket overflows with at most Poisson(1) odds, P(X > 4) ~ 0.4%; :meth:`insert` rebuilds the table
    when it fills.
    """

    _EMPTY = -1  # ids are >= 0
    _MULT = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: spreads sequential ids too

    def __init__(self, buckets: int = 256) -> None:
        self._n = 0
        self._bits = 0
        self._keys = np.zeros((0, WAYS), np.int64)
        self._rows = np.zeros(0, np.int32)  # flat: bucket * WAYS + way
        self._over_ids = np.zeros(0, np.int64)  # overflow, sorted by id
        self._over_rows = np.zeros(0, np.int32)
        self._build(buckets)

    def __len__(self) -> int:
        return self._n

    @property
    def overflow(self) -> int:
        """How many ids live in the overflow array (their home bucket was full)."""
        return int(self._over_ids.size)

    def _home(self, ids: np.ndarray) -> np.ndarray:
        """Home bucket of each id: the top ``bits`` bits of id × 2^64/φ (wrapping uint64 arithmetic)."""
        # a view, not a copy: the shifted values are below 2^bits, the same bits read as int64
        return ((ids.view(np.uint64) * self._MULT) >> np.uint64(64 - self._bits)).view(np.int64)

    def _build(self, buckets: int) -> None:
        self._bits = max(8, int(buckets - 1).bit_length())
        self._keys = np.full((1 << self._bits, WAYS), self._EMPTY, np.int64)
        self._rows = np.zeros((1 << self._bits) * WAYS, np.int32)
        self._over_ids = np.zeros(0, np.int64)
        self._over_rows = np.zeros(0, np.int32)

    def rebuild(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Start over with room for ``len(ids)`` and more, holding exactly these ids."""
        self._n = 0
        self._build(max(256, int(ids.size)))
        self.insert(ids, rows)

    def insert(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Add ids that are not in the index yet (distinct), all at once.

        Per round each id takes the first free way of its home bucket; of several ids wanting the same
        way the first wins and the others try the next free way in the following round; an id whose
        bucket is full goes to the overflow array. At most WAYS + 1 rounds.
        """
        ids = np.asarray(ids, np.int64)
        rows = np.asarray(rows, np.int64)
        if self._n + ids.size > self._keys.shape[0]:  # keep buckets >= ids
            old = self._all()
            self.rebuild(np.concatenate([old[0], ids]), np.concatenate([old[1], rows]))
            return
        home = self._home(ids)
        todo = np.arange(ids.size)
        spill: list[np.ndarray] = []
        while todo.size:
            free = np.take(self._keys, home[todo], axis=0) == self._EMPTY
            full = ~free.any(axis=1)
            if full.any():
                spill.append(todo[full])
                todo, free = todo[~full], free[~full]
            flat = home[todo] * WAYS + free.argmax(axis=1)
            slots, first = np.unique(flat, return_index=True)
            won = todo[first]
            self._keys.reshape(-1)[slots] = ids[won]
            self._rows[slots] = rows[won]
            placed = np.zeros(ids.size, bool)
            placed[won] = True
            todo = todo[~placed[todo]]
        if spill:
            s = np.concatenate(spill)
            over_ids = np.concatenate([self._over_ids, ids[s]])
            over_rows = np.concatenate([self._over_rows, rows[s].astype(np.int32)])
            order = np.argsort(over_ids, kind="stable")
            self._over_ids, self._over_rows = over_ids[order], over_rows[order]
        self._n += int(ids.size)

    def _all(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of every entry, table then overflow."""
        used = np.flatnonzero(self._keys.reshape(-1) != self._EMPTY)
        return (np.concatenate([self._keys.reshape(-1)[used], self._over_ids]),
                np.concatenate([self._rows[used], self._over_rows]).astype(np.int64))

    def add(self, ids: np.ndarray) -> None:
        """Insert the ids not in the index yet (any order, repeats allowed), each with row = its position
        in the index's insertion order; for a set of ids (:meth:`contains`) rows do not matter."""
        ids = np.unique(np.asarray(ids, np.int64))
        new = ids[self.lookup(ids)[1]] if self._n else ids
        if new.size:
            self.insert(new, np.arange(self._n, self._n + new.size, dtype=np.int64))

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id is in the index (bool array)."""
        return ~self.lookup(ids)[1]

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, missing) of int64 ``ids``; rows of missing ids are meaningless (mask them out)."""
        ids = np.asarray(ids, dtype=np.int64)  # no copy when it already is (the hash reads the bits)
        home = self._home(ids)
        eq = self._keys.take(home, axis=0) == ids[:, None]  # (m, WAYS): at most one True per row
        hit = eq.view(np.uint32).ravel()  # the 4 bools of a row as one little-endian word: no short-axis reduce
        missing = hit == 0
        # which byte is set: hit is 1 << (8 * way), and the top byte of hit * 0x00010203 (mod 2^32) is `way`
        way = (hit * _WAY_OF_BYTE) >> np.uint32(24)
        rows = self._rows.take(home * WAYS + way)
        if self._over_ids.size and missing.any():
            todo = np.flatnonzero(missing)
            q = ids[todo]
            p = np.minimum(np.searchsorted(self._over_ids, q), self._over_ids.size - 1)
            found = self._over_ids[p] == q
            rows[todo[found]] = self._over_rows[p[found]]
            missing[todo[found]] = False
        return rows, missing
