"""Matching in the frozen space: ``s(u,i) = max_k cos(a_k, v_i)`` and which anchor explained the candidate.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------- scoring and labels

def _row_max(s: np.ndarray) -> np.ndarray:
    """Max of each row of an (m, K) array with K small: K-1 vectorised column maximums.

    numpy's ``max(axis=1)`` pays a per-row setup on a short contiguous axis (~45 µs for 1,000 x 8);
    this is ~10 µs. It is also why the hot path multiplies (m, dim) x (dim, K): BLAS does that shape
    ~15% faster than (K, dim) x (dim, m), which would allow a contiguous reduction instead.
    """
    out = s[:, 0].copy()
    for k in range(1, s.shape[1]):
        np.maximum(out, s[:, k], out=out)
    return out


def score(anchors: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sim, matched): max cosine of each vector over the anchors and the index of that anchor.

    Both inputs normalised: (K, dim) and (N, dim). The same arithmetic as the hot path of
    :func:`label_decoded` (one (N, K) matmul, see :func:`_row_max`), so its values match the labels'.
    """
    s = vectors @ anchors.T
    return _row_max(s), s.argmax(axis=1)


# ------------------------------------------------------------------ storage dtype of the item matrix

MatrixDtype = Literal["auto", "float32", "bfloat16"]
StorageDtype = Literal["float32", "bfloat16"]


def to_bf16(vectors: np.ndarray) -> np.ndarray:
    """float32 rows → bfloat16 bit patterns (uint16; round to nearest even, by torch).

    numpy has no bfloat16, so the item matrix keeps the bits in a uint16 array: numpy then does the
    row bookkeeping (append, replace, ``take``) and torch reads the same buffer as bfloat16, no copy.
    """
    import torch

    t = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32, exactly (a bfloat16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def bf16_view(bits: np.ndarray) -> Any:
    """A torch bfloat16 tensor sharing the uint16 array's memory (writes through numpy show in it)."""
    import torch

    return torch.from_numpy(bits).view(torch.bfloat16)


def bf16_columns(anchors: np.ndarray) -> Any:
    """(K, dim) float32 anchors → the contiguous (dim, K) bfloat16 tensor the GEMM multiplies by."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(anchors.T, dtype=np.float32)).to(torch.bfloat16)


def bf16_similarities(matrix: Any, rows: np.ndarray, columns: Any) -> np.ndarray:
    """(m, K) cosines of the bfloat16 matrix rows ``rows`` with ``columns`` (:func:`bf16_columns`), as float32.

    One ``index_select`` of contiguous 2-byte rows (half the bytes of float32: the gather is
    memory-bound) and one (m, dim) x (dim, K) bfloat16 GEMM; oneDNN accumulates in float32 and rounds
    the (m, K) result to bfloat16 (|error| <= ~2^-9 of a cosine near 1, see tests/unit/workers/test_matrix_dtype.py).
    """
    import torch

    idx = torch.from_numpy(rows.astype(np.int64, copy=False))
    out: np.ndarray = (matrix.index_select(0, idx) @ columns).float().numpy()
    return out


def bf16_best(matrix: Any, rows: np.ndarray, columns: Any) -> np.ndarray:
    """Gather + product + max alone, in bfloat16 (the benchmark's limit proxy)."""
    import torch

    idx = torch.from_numpy(rows.astype(np.int64, copy=False))
    out: np.ndarray = (matrix.index_select(0, idx) @ columns).amax(1).float().numpy()
    return out


def choose_dtype(requested: MatrixDtype, dim: int, *, k: int = 8, n: int = 1000,
                 timings: tuple[float, float] | None = None) -> StorageDtype:
    """The matrix dtype to use: ``requested`` unless it is ``auto``, then a short self-test decides.

    Why a self-test: bfloat16 halves the bytes the gather moves, but is only faster where the CPU has
    bfloat16 arithmetic (AVX512-BF16/AMX); elsewhere oneDNN emulates it and float32 BLAS wins.
    bfloat16 is chosen only when its median (:func:`time_dtypes`, or ``timings`` already measured) is
    at least 10% below float32's; float32 when torch is missing.
    """
    if requested != "auto":
        return requested
    try:
        import torch  # noqa: F401
    except ImportError:
        return "float32"
    f32, b16 = timings or time_dtypes(dim, k=k, n=n)
    choice: StorageDtype = "bfloat16" if b16 < 0.9 * f32 else "float32"
    log.info("item matrix dtype %s (self-test, %d x %d x %d: float32 %.0f us, bfloat16 %.0f us)",
             choice, n, dim, k, f32 * 1e6, b16 * 1e6)
    return choice


def time_dtypes(dim: int, *, k: int = 8, n: int = 1000, repeats: int = 15) -> tuple[float, float]:
    """Median seconds (the thread's CPU time) of gather + product + max in float32 and in bfloat16.

    Both kernels run on the same random (n x dim) rows of a 16n-row matrix (~25 MB in float32 at
    n = 1,000, dim = 384: larger than the CPU's private caches, as a catalogue is; a matrix that fits
    in cache hides what bfloat16 saves), interleaved ``repeats`` times (~60 ms in all, set-up
    included); the first round only warms them up. CPU time, so that time descheduled on a busy host
    does not count.
    """
    rng = np.random.default_rng(0)
    mat = rng.random((16 * n, dim), dtype=np.float32) - np.float32(0.5)
    anchors = rng.random((k, dim), dtype=np.float32) - np.float32(0.5)
    tmat = bf16_view(to_bf16(mat))
    cols = bf16_columns(anchors)
    t32: list[float] = []
    t16: list[float] = []
    for r in range(repeats):
        rows = rng.choice(16 * n, n, replace=False)
        t0 = time.thread_time()
        _row_max(np.take(mat, rows, axis=0) @ anchors.T)
        t1 = time.thread_time()
        _row_max(bf16_similarities(tmat, rows, cols))
        t2 = time.thread_time()
        if r:
            t32.append(t1 - t0)
            t16.append(t2 - t1)
    return float(np.median(t32)), float(np.median(t16))
