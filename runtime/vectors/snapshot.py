"""Item vectors as append-only numpy segments on disk, readable by any process without the engine's lock.

Why: the embedded engine (qdrant-edge) holds a lock on its directory, so only one process can open it.
Item vectors never change under one encoder (docs/design.md §2: a vector is never recomputed), so the
indexer can also append every batch it indexes as a *segment* — ``seg-<n>.ids.npy`` (int64) and
``seg-<n>.vec.npy`` (float32, n × dim) — and the stages that only *read* item vectors (streams,
labeler, trainer) open a :class:`SnapshotIndex` over those files in their own processes: no lock, no
engine, and the vectors are memory-mapped, so the page cache holds them once for every process.

Atomicity: each file is written under a temporary name and renamed; the vectors are renamed before
the ids, and a reader only looks at segments whose ids file exists, so it never sees half a segment.
:func:`compact` merges segments into one (a reader that already holds an old segment keeps its
mapping; ids it already knows are skipped when it meets them again in the merged segment).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.vectors.index import MissingCollection, Points, VectorIndex, exact_top

log = logging.getLogger(__name__)
_SEG = re.compile(r"^seg-(\d{8})\.ids\.npy$")


def snapshot_dir(data_dir: Path, collection: str) -> Path:
    """Where the segments of ``collection`` live under a data directory."""
    return Path(data_dir) / "snapshots" / collection


def segments(directory: Path) -> list[int]:
    """Numbers of the complete segments, ascending."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _SEG.match(n)))


def _paths(directory: Path, n: int) -> tuple[Path, Path]:
    return directory / f"seg-{n:08d}.ids.npy", directory / f"seg-{n:08d}.vec.npy"


def _save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


class SnapshotWriter:
    """Appends segments (the indexer's side). One writer per collection directory at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        segs = segments(self.directory)
        self._next = (segs[-1] + 1) if segs else 1

    def append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Write one segment: vectors first, then the ids that make it visible."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).ravel()
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if ids.size == 0:
            return
        if vecs.ndim != 2 or vecs.shape[0] != ids.size:
            raise ValueError(f"vectors of shape {vecs.shape} for {ids.size} ids")
        ids_path, vec_path = _paths(self.directory, self._next)
        _save(vec_path, vecs)
        _save(ids_path, ids)
        self._next += 1

    def segment_count(self) -> int:
        return len(segments(self.directory))

    def count(self) -> int:
        """Distinct ids over all segments (reads the id files only)."""
        all_ids = [np.load(_paths(self.directory, n)[0]) for n in segments(self.directory)]
        return int(np.unique(np.concatenate(all_ids)).size) if all_ids else 0

    def compact(self) -> int:
        """Merge every segment into one (the last occurrence of an id wins); returns the point count."""
        segs = segments(self.directory)
        if len(segs) <= 1:
            return self.count()
        ids = np.concatenate([np.load(_paths(self.directory, n)[0]) for n in segs])
        vecs = np.concatenate([np.load(_paths(self.directory, n)[1]) for n in segs])
        uniq, first_rev = np.unique(ids[::-1], return_index=True)
        self.append(uniq, vecs[ids.size - 1 - first_rev])
        for n in segs:
            for p in _paths(self.directory, n)[::-1]:  # ids first: the segment disappears whole
                p.unlink(missing_ok=True)
        return int(uniq.size)

    def rewrite(self, chunks: Iterator[Points]) -> int:
        """Replace every segment by the points of ``chunks`` (a scroll of the engine); returns the count."""
        old = segments(self.directory)
        n = 0
        for pts in chunks:
            self.append(pts.ids, pts.vectors)
            n += len(pts)
        for s in old:
            for p in _paths(self.directory, s)[::-1]:
                p.unlink(missing_ok=True)
        self.compact()
        return n


class SnapshotIndex:
    """A read-only :class:`~runtime.vectors.index.VectorIndex` over the segments of collections.

    Each collection's segments are memory-mapped; the id index (ids sorted, with segment and row) costs
    16 bytes per item in this process. New segments are picked up when a lookup misses an id or the
    last look is older than ``refresh_s``. Collections it has no directory for raise
    ``MissingCollection``, a ``KeyError`` (as the engines do for a missing collection; readers see it
    as empty through ``MissingAsEmpty``); writes raise ``PermissionError``: stages that write
    vectors (indexer, anchors) need the engine itself.
    """

    def __init__(self, root: Path, *, refresh_s: float = 1.0) -> None:
        self.root = Path(root)
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._cols: dict[str, _Collection] = {}

    def __enter__(self) -> SnapshotIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _col(self, name: str, *, refresh: bool = False) -> _Collection:
        with self._lock:
            col = self._cols.get(name)
            if col is None:
                if not (self.root / name).is_dir():
                    raise MissingCollection(f"no snapshot of collection {name!r} under {self.root}")
                col = self._cols[name] = _Collection(self.root / name)
                refresh = True
            if refresh or time.monotonic() - col.looked >= self.refresh_s:
                col.refresh()
            return col

    def ensure_collection(self, name: str, dim: int) -> None:
        """Nothing to create: the indexer's snapshot is the collection (a missing one is a KeyError later)."""

    def upsert(self, name: str, points: Points) -> None:
        raise PermissionError(f"{name}: a snapshot is read-only; this stage needs the vector engine")

    def delete(self, name: str, ids: Sequence[int]) -> None:
        raise PermissionError(f"{name}: a snapshot is read-only; this stage needs the vector engine")

    def retrieve(self, name: str, ids: Sequence[int] | np.ndarray, *, with_payload: bool = False) -> Points:
        """The points among ``ids`` that exist, in the order of ``ids`` (repeats kept); no payloads."""
        want = np.asarray(ids, dtype=np.int64).ravel()
        col = self._col(name)
        pts = col.take(want)
        if len(pts) < want.size:  # a miss: maybe a segment appeared since (a listdir, ~20 µs)
            pts = self._col(name, refresh=True).take(want)
        return pts

    def search(self, name: str, vector: np.ndarray, limit: int, *, ids: Sequence[int] | None = None
               ) -> list[tuple[int, float]]:
        """Exact search (a scan): snapshots serve lookups; similarity search belongs to the engine."""
        pts = self.retrieve(name, ids) if ids is not None else _concat(list(self.scroll(name, 65536)))
        return exact_top(pts, vector, limit)

    def count(self, name: str) -> int:
        return self._col(name, refresh=True).size

    def scroll(self, name: str, batch: int = 1024, *, with_payload: bool = False) -> Iterator[Points]:
        """Every point, segment by segment (each id once), straight from the mapped files."""
        col = self._col(name, refresh=True)
        for ids, vecs, keep in col.parts():
            sel = np.flatnonzero(keep)
            for s in range(0, sel.size, max(1, batch)):
                rows = sel[s : s + batch]
                yield Points(ids[rows], np.asarray(vecs[rows], dtype=np.float32))

    def close(self) -> None:
        with self._lock:
            self._cols.clear()


class _Collection:
    """One collection's mapped segments and its sorted id index."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: set[int] = set()
        self.seg_ids: list[np.ndarray] = []
        self.seg_vecs: list[np.ndarray] = []
        self.seg_keep: list[np.ndarray] = []  # rows whose id is first met in this segment
        self.sorted_ids = np.zeros(0, np.int64)
        self.where = np.zeros(0, np.int64)  # segment << 32 | row, aligned with sorted_ids
        self.looked = 0.0
        self.dim = 0

    @property
    def size(self) -> int:
        return int(self.sorted_ids.size)

    def refresh(self) -> None:
        self.looked = time.monotonic()
        new_ids, new_where = [], []
        for n in segments(self.directory):
            if n in self.seen:
                continue
            ids_path, vec_path = _paths(self.directory, n)
            try:
                ids = np.load(ids_path)
                vecs = np.load(vec_path, mmap_mode="r")
            except FileNotFoundError:  # compacted away between listing and opening: in the merged one
                continue
            self.seen.add(n)
            known = np.isin(ids, self.sorted_ids) if self.sorted_ids.size else np.zeros(ids.size, bool)
            _, first = np.unique(ids, return_index=True)  # one row per id within the segment
            keep = np.zeros(ids.size, bool)
            keep[first] = True
            keep &= ~known
            seg = len(self.seg_ids)
            self.seg_ids.append(ids)
            self.seg_vecs.append(vecs)
            self.seg_keep.append(keep)
            self.dim = int(vecs.shape[1])
            rows = np.flatnonzero(keep)
            new_ids.append(ids[rows])
            new_where.append((np.int64(seg) << np.int64(32)) | rows.astype(np.int64))
        if new_ids:
            ids = np.concatenate([self.sorted_ids, *new_ids])
            where = np.concatenate([self.where, *new_where])
            order = np.argsort(ids, kind="stable")
            self.sorted_ids, self.where = ids[order], where[order]

    def take(self, want: np.ndarray) -> Points:
        if self.sorted_ids.size == 0 or want.size == 0:
            return Points(np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32))
        pos = np.minimum(np.searchsorted(self.sorted_ids, want), self.sorted_ids.size - 1)
        hit = self.sorted_ids[pos] == want
        found, where = want[hit], self.where[pos[hit]]
        out = np.empty((found.size, self.dim), np.float32)
        segs, rows = where >> np.int64(32), where & np.int64(0xFFFFFFFF)
        for s in np.unique(segs).tolist():
            m = segs == s
            out[m] = self.seg_vecs[s][rows[m]]
        return Points(found, out)

    def parts(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        yield from zip(self.seg_ids, self.seg_vecs, self.seg_keep, strict=True)


def _concat(parts: list[Points]) -> Points:
    if not parts:
        return Points(np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
    return Points(np.concatenate([p.ids for p in parts]), np.concatenate([p.vectors for p in parts]))


class SnapshottingIndex:
    """The engine, plus a snapshot of one collection written through on every upsert (the writer's side).

    Wraps the embedded engine in the process that owns it: whoever upserts item vectors (the indexer, a
    benchmark, a test) also appends them as a segment, so readers in other processes see what the engine
    holds. On opening, a snapshot that does not match the engine's count is rewritten from the engine
    (a data directory from before snapshots, or a crash between an upsert and its segment); otherwise
    its segments are merged into one. ``optimize`` (the indexer calls it when idle) also merges the
    segments once there are more than ``max_segments``.
    """

    def __init__(self, inner: VectorIndex, directory: Path, collection: str, *, max_segments: int = 32) -> None:
        self.inner = inner
        self.collection = collection
        self.writer = SnapshotWriter(directory)
        self.max_segments = max_segments
        self._lock = threading.Lock()
        try:
            engine = inner.count(collection)
        except KeyError:
            engine = 0
        if self.writer.count() != engine:
            n = self.writer.rewrite(inner.scroll(collection, 4096)) if engine else self.writer.rewrite(iter(()))
            log.info("item snapshot of %s rewritten from the engine (%d vectors)", collection, n)
        else:
            self.writer.compact()

    def __enter__(self) -> SnapshottingIndex:
        return self

    def __getattr__(self, attr: str) -> Any:
        """The engine's extras (``stats``, ``flush``, …) pass through."""
        if attr.startswith("_") or attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure_collection(self, name: str, dim: int) -> None:
        self.inner.ensure_collection(name, dim)

    def upsert(self, name: str, points: Points) -> None:
        self.inner.upsert(name, points)
        if name == self.collection:
            with self._lock:
                self.writer.append(points.ids, points.vectors)

    def retrieve(self, name: str, ids: Sequence[int] | np.ndarray, *, with_payload: bool = False) -> Points:
        return self.inner.retrieve(name, ids, with_payload=with_payload)

    def search(self, name: str, vector: np.ndarray, limit: int, *, ids: Sequence[int] | None = None
               ) -> list[tuple[int, float]]:
        return self.inner.search(name, vector, limit, ids=ids)

    def count(self, name: str) -> int:
        return self.inner.count(name)

    def scroll(self, name: str, batch: int = 1024, *, with_payload: bool = False) -> Iterator[Points]:
        return self.inner.scroll(name, batch, with_payload=with_payload)

    def delete(self, name: str, ids: Sequence[int]) -> None:
        if name == self.collection:  # item vectors are never deleted (docs/design.md §2); keep files true
            raise PermissionError(f"{name}: item vectors are append-only while a snapshot is written")
        self.inner.delete(name, ids)

    def optimize(self, name: str | None = None) -> bool:
        """The engine's optimizer, then a merge of the snapshot's segments when there are many."""
        optimize = getattr(self.inner, "optimize", None)
        done = bool(optimize(name)) if callable(optimize) else False
        if name in (None, self.collection):
            with self._lock:
                if self.writer.segment_count() > self.max_segments:
                    self.writer.compact()
        return done

    def close(self) -> None:
        self.inner.close()
