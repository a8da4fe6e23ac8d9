"""The item id → row index of the item matrix (runtime/vectors/id_index.py): pure logic.

Pinned: every inserted id is found with its row, absent ids are reported missing, ids whose home
bucket is full overflow and are still found, and growth (rebuilds) loses nothing.
"""

from __future__ import annotations

import numpy as np

from runtime.vectors.id_index import WAYS, IdIndex


def test_ids_found_across_rebuilds_and_misses_reported() -> None:
    rng = np.random.default_rng(1)
    ids = np.unique(rng.integers(0, 2**63 - 1, size=30_000, dtype=np.int64))
    rng.shuffle(ids)
    ix = IdIndex()
    start = 0
    for size in (10, 300, 5_000, 20_000):  # several inserts, each past the table's room: rebuilds
        ix.insert(ids[start : start + size], np.arange(start, start + size))
        start += size
    assert len(ix) == start
    rows, missing = ix.lookup(ids[:start][::-1])
    assert not missing.any()
    np.testing.assert_array_equal(rows, np.arange(start)[::-1])
    absent = ids[start:]
    rows, missing = ix.lookup(np.concatenate([absent[:100], ids[:3], [0, 2**63 - 1]]))
    assert missing[:100].all() and not missing[100:103].any() and rows[100:103].tolist() == [0, 1, 2]
    assert ix.lookup(np.zeros(0, np.int64))[0].size == 0


def test_full_buckets_overflow_and_stay_findable() -> None:
    ix = IdIndex()
    pool = np.arange(1, 200_000, dtype=np.int64)
    home = ix._home(pool)
    same = pool[home == np.bincount(home).argmax()][: WAYS + 5]  # more ids for one bucket than it has ways
    assert same.size == WAYS + 5
    ix.insert(same, np.arange(100, 100 + same.size))
    assert ix.overflow == 5
    rows, missing = ix.lookup(same[::-1])
    assert not missing.any()
    np.testing.assert_array_equal(rows, np.arange(100, 100 + same.size)[::-1])
    other = pool[home == home[np.isin(pool, same)][0]][WAYS + 5 : WAYS + 8]  # same bucket, never inserted
    assert ix.lookup(other)[1].all()


def test_add_and_contains_behave_as_a_set() -> None:
    """The streams catalogue's use: add ids in any order with repeats, ask membership of many at once."""
    rng = np.random.default_rng(3)
    idx = IdIndex()
    seen: set[int] = set()
    for _ in range(20):
        batch = rng.integers(0, 2**62, 700)
        batch = np.concatenate([batch, batch[:50], rng.choice(np.fromiter(seen, np.int64), 30) if seen else batch[:0]])
        idx.add(batch)
        seen.update(batch.tolist())
        probe = np.concatenate([rng.choice(np.fromiter(seen, np.int64), 500), rng.integers(0, 2**62, 500)])
        assert idx.contains(probe).tolist() == [int(x) in seen for x in probe]
    assert len(idx) == len(seen)
