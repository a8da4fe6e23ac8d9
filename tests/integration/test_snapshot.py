"""The item snapshot: segments written through the real embedded engine, read without its lock.

Also the labeler's item-matrix loading over a snapshot, and a stage run in its own process
(gpl/stage_process.py) against the real broker.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from runtime.vectors.edge import EdgeIndex
from runtime.vectors.index import Points
from runtime.vectors.normalize import normalize
from runtime.vectors.snapshot import SnapshotIndex, SnapshottingIndex, SnapshotWriter, segments
from workers.labeler.item_matrix import ItemMatrix

COL = "items__test"
DIM = 8


def pts(ids: list[int], seed: int = 0) -> Points:
    rng = np.random.default_rng(seed)
    return Points(np.asarray(ids, np.int64), normalize(rng.standard_normal((len(ids), DIM)).astype(np.float32)))


def test_reader_sees_appended_segments_in_order_with_repeats(tmp_path: Path) -> None:
    w = SnapshotWriter(tmp_path / COL)
    a, b = pts([5, 1, 9], 1), pts([20, 7], 2)
    w.append(a.ids, a.vectors)
    r = SnapshotIndex(tmp_path, refresh_s=3600)
    got = r.retrieve(COL, [9, 42, 5, 9])
    assert got.ids.tolist() == [9, 5, 9]
    np.testing.assert_array_equal(got.vectors, a.vectors[[2, 0, 2]])
    w.append(b.ids, b.vectors)  # a miss makes the reader look again, even before refresh_s
    got = r.retrieve(COL, [7, 1])
    assert got.ids.tolist() == [7, 1]
    np.testing.assert_array_equal(got.vectors, np.stack([b.vectors[1], a.vectors[1]]))
    assert r.count(COL) == 5
    assert sorted(np.concatenate([p.ids for p in r.scroll(COL, 2)]).tolist()) == [1, 5, 7, 9, 20]


def test_half_written_segment_is_invisible_and_compaction_keeps_readers_right(tmp_path: Path) -> None:
    w = SnapshotWriter(tmp_path / COL)
    a = pts([1, 2, 3], 1)
    w.append(a.ids, a.vectors)
    np.save(tmp_path / COL / "seg-00000002.vec.npy", np.ones((2, DIM), np.float32))  # no ids file yet
    r = SnapshotIndex(tmp_path)
    assert r.count(COL) == 3
    (tmp_path / COL / "seg-00000002.vec.npy").unlink()
    b = pts([4], 2)
    w.append(b.ids, b.vectors)
    assert r.count(COL) == 4
    assert w.compact() == 4
    assert len(segments(tmp_path / COL)) == 1
    fresh = SnapshotIndex(tmp_path)
    for reader in (r, fresh):  # the old reader keeps its mappings and skips the ids it knows
        assert reader.count(COL) == 4
        got = reader.retrieve(COL, [4, 1])
        np.testing.assert_array_equal(got.vectors, np.stack([b.vectors[0], a.vectors[0]]))
    with pytest.raises(PermissionError):
        r.upsert(COL, b)
    with pytest.raises(KeyError):
        r.retrieve("items__other", [1])


def test_engine_writes_through_and_a_stale_snapshot_is_rewritten(tmp_path: Path) -> None:
    snap = tmp_path / "snapshots" / COL
    with EdgeIndex(tmp_path / "qdrant") as edge:
        idx = SnapshottingIndex(edge, snap, COL)
        idx.ensure_collection(COL, DIM)
        a = pts(list(range(100, 160)), 3)
        idx.upsert(COL, Points(a.ids[:30], a.vectors[:30], [{}] * 30))
        idx.upsert(COL, Points(a.ids[30:], a.vectors[30:], [{}] * 30))
        idx.ensure_collection("anchors", DIM)
        idx.upsert("anchors", pts([1], 4))  # other collections are not snapshotted
        assert len(segments(snap)) == 2
        r = SnapshotIndex(snap.parent)
        got = r.retrieve(COL, a.ids[::-1])
        np.testing.assert_allclose(got.vectors, edge.retrieve(COL, a.ids[::-1]).vectors, atol=1e-6)
        with pytest.raises(KeyError):
            r.retrieve("anchors", [1])
    for f in snap.iterdir():  # lose the snapshot: reopening rewrites it from the engine
        f.unlink()
    with EdgeIndex(tmp_path / "qdrant") as edge:
        SnapshottingIndex(edge, snap, COL)
        assert SnapshotIndex(snap.parent).count(COL) == 60
        assert len(segments(snap)) == 1


def test_labeler_item_matrix_loads_from_the_snapshot(tmp_path: Path) -> None:
    """The labeler's loading path in its own process: scroll the snapshot, then fetch later items."""
    w = SnapshotWriter(tmp_path / COL)
    a, b = pts(list(range(1, 2001)), 5), pts([5000, 5001], 6)
    w.append(a.ids[:1000], a.vectors[:1000])
    w.append(a.ids[1000:], a.vectors[1000:])
    m = ItemMatrix(SnapshotIndex(tmp_path), COL, "test", retry_s=0.0)
    assert m.load(batch=300) == 2000
    assert m._mat.shape[0] == 2000  # sized once from the count: no doubling copy while loading
    rows, missing = m.lookup(np.asarray([1500, 3], np.int64))
    assert not missing.any()
    np.testing.assert_allclose(m.gather(rows), a.vectors[[1499, 2]], atol=1e-6)
    w.append(b.ids, b.vectors)  # indexed after the labeler started: fetched on the first miss
    np.testing.assert_allclose(m.vectors_of(np.asarray([5001, 99_999], np.int64)), b.vectors[[1]], atol=1e-6)
    assert len(m) == 2001


def _read_in_child(root: str, q: mp.Queue) -> None:  # type: ignore[type-arg]
    r = SnapshotIndex(Path(root))
    q.put(r.retrieve(COL, [3, 1]).vectors.tolist())


def test_another_process_reads_while_the_engine_is_open(tmp_path: Path) -> None:
    """The point of the snapshot: the engine's directory lock stays with its owner."""
    with EdgeIndex(tmp_path / "qdrant") as edge:
        idx = SnapshottingIndex(edge, tmp_path / "snapshots" / COL, COL)
        idx.ensure_collection(COL, DIM)
        a = pts([1, 2, 3], 7)
        idx.upsert(COL, Points(a.ids, a.vectors, [{}] * 3))
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_read_in_child, args=(str(tmp_path / "snapshots"), q))
        p.start()
        got = np.asarray(q.get(timeout=60), np.float32)
        p.join(30)
        assert p.exitcode == 0
        np.testing.assert_allclose(got, a.vectors[[2, 0]], atol=1e-6)
