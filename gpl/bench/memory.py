"""``gpl bench memory``: peak resident memory of each stage process, for catalogues of several sizes.

Real parts: an embedded stack per size (Tansu, qdrant-edge, the item snapshot), ``items`` random unit
vectors of ``dim`` float32 upserted through the stack's index as the indexer would, then the reader
stages (streams, labeler, trainer, calibration) started in their own processes (gpl/stage_process.py),
left to load what they load at start (the labeler its whole item matrix) and idle for ``settle_s``,
and stopped; each child reports its peak RSS (``ru_maxrss``). The parent's figure is the process that
holds the engine and writes the snapshot (indexer and anchors run there). Bytes per item is the slope
between the smallest and the largest size, so the interpreter's and libraries' fixed cost drops out.

Peak RSS counts mapped snapshot pages a process touched; those are page cache, shared by every
process that maps the same file, so the sum over stages overstates the machine's total.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import numpy as np

from gpl.stack import Stack, Stages
from gpl.stage_process import READERS, ProcessStage, peak_rss_bytes
from runtime.settings import Settings
from runtime.vectors.index import Points
from runtime.vectors.normalize import normalize


def bench_memory(settings: Settings, *, sizes: tuple[int, ...] = (20_000, 1_000_000), dim: int = 384,
                 chunk: int = 50_000, settle_s: float = 5.0, seed: int = 0) -> dict[str, Any]:
    rows: dict[str, dict[str, int]] = {}
    for n in sizes:
        rows[str(n)] = _one(settings, n, dim, chunk, settle_s, seed)
    lo, hi = str(min(sizes)), str(max(sizes))
    per_item = {stage: round((rows[hi][stage] - rows[lo][stage]) / (int(hi) - int(lo)), 1)
                for stage in rows[hi] if int(hi) > int(lo)}
    return {"dim": dim, "matrix_bytes_per_item": 4 * dim, "peak_rss_bytes": rows,
            "bytes_per_item": per_item}


def _one(settings: Settings, n: int, dim: int, chunk: int, settle_s: float, seed: int) -> dict[str, int]:
    s = settings.with_overrides(kafka={"bootstrap_servers": ""}, qdrant={"url": ""}, stack={"processes": True},
                                data_dir=str(settings.data_dir / f"bench-memory-{n}"))
    shutil.rmtree(s.data_dir, ignore_errors=True)
    rng = np.random.default_rng(seed)
    try:
        with Stack(s) as stack:
            s = stack.settings
            col = s.encoder.collection
            stack.index.ensure_collection(col, dim)
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                vecs = normalize(rng.standard_normal((m, dim)).astype(np.float32))
                stack.index.upsert(col, Points(np.arange(start + 1, start + m + 1, dtype=np.int64), vecs,
                                               [{}] * m))
            stages = Stages({name: ProcessStage(name, s, **({"progress": False} if name == "trainer" else {}))
                             for name in READERS})
            with stages:
                _settle(stages, settle_s)
            out = {name: int(getattr(st, "peak_rss_bytes", 0)) for name, st in stages.stages.items()}
            out["engine+snapshot writer (parent)"] = peak_rss_bytes()
            return out
    finally:
        shutil.rmtree(s.data_dir, ignore_errors=True)


def _settle(stages: Stages, settle_s: float, timeout: float = 300.0) -> None:
    """Wait until every child has reported and no peak has grown for ``settle_s``."""
    deadline = time.monotonic() + timeout
    last: tuple[int, ...] = ()
    since = time.monotonic()
    while time.monotonic() < deadline:
        now = tuple(int(getattr(st, "peak_rss_bytes", 0)) for st in stages.stages.values())
        if now != last or 0 in now:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle_s:
            return
        time.sleep(0.5)
