"""One contract for every vector index: the in-memory twin, the embedded engine, the server client.

The labeler and indexer are written against :class:`runtime.vectors.index.VectorIndex`; these tests pin the
semantics they rely on (order of ``retrieve``, missing ids skipped, cosine ranking, id restriction,
scroll covering everything) on all three implementations, so a test passing on the twin means the
same on the real engines. ``ServerIndex`` runs on qdrant-client's local mode, the stand-in for a server.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from runtime.vectors.edge import EdgeIndex
from runtime.vectors.index import Points, VectorIndex
from runtime.vectors.memory import MemoryIndex
from runtime.vectors.server import ServerIndex

DIM = 16
COL = "items__test"


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def make_points(ids: list[int], seed: int = 0, payload: bool = True) -> Points:
    rng = np.random.default_rng(seed)
    vecs = unit(rng.standard_normal((len(ids), DIM)))
    pls = [{"text": f"item {i}", "category": f"c{i % 3}"} for i in ids] if payload else []
    return Points(np.asarray(ids, dtype=np.int64), vecs, pls)


@pytest.fixture(params=["memory", "edge", "server"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorIndex]:
    idx: VectorIndex
    if request.param == "memory":
        idx = MemoryIndex()
    elif request.param == "edge":
        idx = EdgeIndex(tmp_path / "qdrant")
    else:
        idx = ServerIndex("", client=QdrantClient(":memory:"))
    with idx:
        yield idx


@pytest.fixture
def filled(index: VectorIndex) -> tuple[VectorIndex, Points]:
    pts = make_points(list(range(100, 150)))
    index.ensure_collection(COL, DIM)
    index.upsert(COL, pts)
    return index, pts


def test_ensure_collection_idempotent_and_dim_checked(index: VectorIndex) -> None:
    index.ensure_collection(COL, DIM)
    index.upsert(COL, make_points([1, 2]))
    index.ensure_collection(COL, DIM)  # again: no error, data kept
    assert index.count(COL) == 2
    with pytest.raises(ValueError):
        index.ensure_collection(COL, DIM + 1)
    assert index.count(COL) == 2


def test_unknown_collection_is_a_key_error(index: VectorIndex) -> None:
    with pytest.raises(KeyError):
        index.count("nope")
    with pytest.raises(KeyError):
        index.retrieve("nope", [1])


def test_retrieve_keeps_order_and_skips_missing(filled: tuple[VectorIndex, Points]) -> None:
    index, pts = filled
    ask = [120, 9999, 101, 149, 100, 5]
    got = index.retrieve(COL, np.asarray(ask))
    assert got.ids.tolist() == [120, 101, 149, 100]
    assert got.ids.dtype == np.int64 and got.vectors.dtype == np.float32
    assert got.vectors.shape == (4, DIM)
    row = {int(i): k for k, i in enumerate(pts.ids.tolist())}
    np.testing.assert_allclose(got.vectors, pts.vectors[[row[i] for i in [120, 101, 149, 100]]], atol=1e-6)
    assert got.payloads == []  # not asked for
    assert len(index.retrieve(COL, [])) == 0
    assert len(index.retrieve(COL, [7, 8])) == 0
    assert index.retrieve(COL, [7, 8]).vectors.shape == (0, DIM)


def test_payloads_and_overwrite(filled: tuple[VectorIndex, Points]) -> None:
    index, _ = filled
    got = index.retrieve(COL, [102, 103], with_payload=True)
    assert got.payloads == [{"text": "item 102", "category": "c0"}, {"text": "item 103", "category": "c1"}]
    new = make_points([102], seed=9)
    new.payloads = [{"text": "changed", "n": 3, "tags": ["a", "b"]}]
    index.upsert(COL, new)
    got = index.retrieve(COL, [102], with_payload=True)
    assert got.payloads == [{"text": "changed", "n": 3, "tags": ["a", "b"]}]
    np.testing.assert_allclose(got.vectors[0], new.vectors[0], atol=1e-6)
    assert index.count(COL) == 50
    index.upsert(COL, make_points([500], payload=False))  # no payload given: an empty dict back
    assert index.retrieve(COL, [500], with_payload=True).payloads == [{}]


def test_search_ranks_by_cosine_and_restricts_to_ids(filled: tuple[VectorIndex, Points]) -> None:
    index, pts = filled
    q = pts.vectors[7]  # id 107
    hits = index.search(COL, q, 5)
    assert hits[0][0] == 107 and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True) and len(hits) == 5
    expected = pts.ids[np.argsort(-(pts.vectors @ q))[:5]].tolist()
    assert [i for i, _ in hits] == expected
    allowed = [110, 111, 112, 113, 9999]
    hits = index.search(COL, q, 10, ids=allowed)
    assert {i for i, _ in hits} == {110, 111, 112, 113}
    exact = {int(i): float(v @ q) for i, v in zip(pts.ids, pts.vectors, strict=True)}
    for i, s in hits:
        assert s == pytest.approx(exact[i], abs=1e-5)
    assert index.search(COL, q, 10, ids=[]) == []
    assert len(index.search(COL, q, 2, ids=allowed)) == 2


def test_count_scroll_and_delete(filled: tuple[VectorIndex, Points]) -> None:
    index, pts = filled
    assert index.count(COL) == 50
    batches = list(index.scroll(COL, batch=7, with_payload=True))
    assert all(len(b) <= 7 for b in batches)
    ids = np.concatenate([b.ids for b in batches])
    assert sorted(ids.tolist()) == list(range(100, 150)) and len(ids) == 50
    assert all(len(b.payloads) == len(b) for b in batches)
    assert all(b.vectors.shape == (len(b), DIM) for b in batches)
    assert sum(len(b) for b in index.scroll(COL)) == 50
    index.delete(COL, [100, 101, 12345])
    assert index.count(COL) == 48
    assert index.retrieve(COL, [100, 101, 102]).ids.tolist() == [102]
    assert 100 not in {i for b in index.scroll(COL) for i in b.ids.tolist()}
    index.delete(COL, [])
    assert index.count(COL) == 48


def test_collections_are_separate(index: VectorIndex) -> None:
    index.ensure_collection("a", DIM)
    index.ensure_collection("b", DIM * 2)
    index.upsert("a", make_points([1, 2, 3]))
    assert index.count("a") == 3 and index.count("b") == 0


# -- embedded engine only -------------------------------------------------------------------------


def test_edge_reloads_from_disk(tmp_path: Path) -> None:
    pts = make_points(list(range(200)))
    with EdgeIndex(tmp_path / "q") as idx:
        idx.ensure_collection(COL, DIM)
        idx.upsert(COL, pts)
        idx.delete(COL, [0])
        before = idx.search(COL, pts.vectors[3], 5)
    with pytest.raises(RuntimeError):
        idx.count(COL)  # closed
    with EdgeIndex(tmp_path / "q") as idx:
        assert idx.collections() == [COL]
        assert idx.count(COL) == 199  # no ensure_collection needed to read after a restart
        got = idx.retrieve(COL, [5, 0, 6], with_payload=True)
        assert got.ids.tolist() == [5, 6]
        assert got.payloads[0] == {"text": "item 5", "category": "c2"}
        np.testing.assert_allclose(got.vectors[0], pts.vectors[5], atol=1e-6)
        after = idx.search(COL, pts.vectors[3], 5)
        assert [i for i, _ in after] == [i for i, _ in before]
        assert [s for _, s in after] == pytest.approx([s for _, s in before])
        with pytest.raises(ValueError):
            idx.ensure_collection("other", 0)
    with EdgeIndex(tmp_path / "q") as idx, pytest.raises(ValueError):  # the engine checks the stored dim
        idx.ensure_collection(COL, DIM + 1)
    with EdgeIndex(tmp_path / "q") as idx:
        assert idx.count(COL) == 199  # opened lazily: the dim comes from the shard's config file
        with pytest.raises(ValueError):
            idx.ensure_collection(COL, DIM + 1)
    with EdgeIndex(tmp_path / "q") as idx:
        idx.ensure_collection(COL, DIM)
        idx.upsert(COL, make_points([1000]))
        assert idx.count(COL) == 200


def test_edge_one_open_shard_per_directory(tmp_path: Path) -> None:
    with EdgeIndex(tmp_path / "q") as a:
        a.ensure_collection(COL, DIM)
        with EdgeIndex(tmp_path / "q") as b, pytest.raises(RuntimeError, match="open elsewhere"):
            b.count(COL)


def test_edge_rejects_unsafe_names(tmp_path: Path) -> None:
    with EdgeIndex(tmp_path / "q") as idx:
        for bad in ["../x", "a/b", "", ".hidden"]:
            with pytest.raises(ValueError):
                idx.ensure_collection(bad, DIM)


def test_edge_hnsw_builds_and_searches(tmp_path: Path) -> None:
    pts = make_points(list(range(1500)), seed=3)
    with EdgeIndex(tmp_path / "q", hnsw=True, hnsw_threshold_kb=1) as idx:
        idx.ensure_collection(COL, DIM)
        idx.upsert(COL, pts)
        assert idx.stats(COL)["indexed_vectors"] == 0  # nothing is built until optimize()
        assert idx.optimize(COL)
        assert idx.stats(COL)["indexed_vectors"] == 1500
        hits = idx.search(COL, pts.vectors[42], 3)
        assert hits[0][0] == 42
        assert {i for i, _ in idx.search(COL, pts.vectors[42], 10, ids=[1, 2, 3])} == {1, 2, 3}
    with EdgeIndex(tmp_path / "q2") as idx:  # plain: optimize merges but never builds a graph
        idx.ensure_collection(COL, DIM)
        idx.upsert(COL, pts)
        idx.optimize()
        assert idx.stats(COL)["indexed_vectors"] == 0


def test_edge_threads_share_one_index(tmp_path: Path) -> None:
    idx = EdgeIndex(tmp_path / "q")
    idx.ensure_collection(COL, DIM)
    idx.upsert(COL, make_points(list(range(1000))))
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for b in range(5):
                base = 10_000 * (k + 1) + 100 * b
                idx.upsert(COL, make_points(list(range(base, base + 100)), seed=b))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader() -> None:
        try:
            q = make_points([0]).vectors[0]
            for _ in range(30):
                idx.search(COL, q, 5, ids=list(range(0, 1000, 3)))
                assert len(idx.retrieve(COL, list(range(100)))) == 100
                sum(len(b) for b in idx.scroll(COL, batch=500))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    threads += [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    idx.close()
    assert errors == []
    with EdgeIndex(tmp_path / "q") as again:
        assert again.count(COL) == 1000 + 3 * 500
