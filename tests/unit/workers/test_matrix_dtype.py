"""The item matrix in bfloat16 (``labeler.matrix_dtype``): storage, growth, the dtype self-test, and
labels within a stated tolerance of float32 (pure logic: numpy and torch on CPU, no broker).

Tolerances, and why: a bfloat16 keeps 8 significant bits, so a stored unit vector's entries move by
at most 2^-9 relative, and the GEMM's (m, K) result is rounded to bfloat16 once more (float32
accumulation inside). A cosine then moves by at most ~4e-3 (two roundings of a value <= 1); the
pseudo-label p = sigmoid((s - c) / T) by at most max|p'| * 4e-3 = 4e-3 / (4 T) (1.25e-2 at the
default T = 0.08); a calibrator's probability by its slope on the similarity features.
"""

from __future__ import annotations

import sys

import numpy as np
import orjson
import pytest

from gpl.bench.labeler import fast, max_label_difference, synthetic
from workers.labeler.item_matrix import ItemMatrix
from workers.labeler.matching import choose_dtype, from_bf16, time_dtypes, to_bf16

COS_TOL = 4e-3
LABEL_TOL = 1.25e-2


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_bf16_bits_round_to_nearest_and_back_exactly() -> None:
    x = np.array([[1.0, -2.5, 1.0 + 2**-8, 1.0 + 3 * 2**-9, 3.0e-20]], np.float32)
    got = from_bf16(to_bf16(x))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[0, :2], [1.0, -2.5])  # representable: unchanged
    assert got[0, 2] == 1.0 + 2**-7 or got[0, 2] == 1.0  # a tie: rounds to even
    assert abs(got[0, 3] - x[0, 3]) <= 2**-8
    np.testing.assert_allclose(got, x, rtol=2**-8)


def test_bf16_matrix_stores_half_the_bytes_and_matches_float32() -> None:
    rng = np.random.default_rng(3)
    ids = np.arange(5, 3005, dtype=np.int64)  # > the initial capacity of 1,024 rows: the matrix grows
    vecs = rng.standard_normal((ids.size, 64)).astype(np.float32)
    m32 = ItemMatrix(dtype="float32")
    m16 = ItemMatrix(dtype="bfloat16")
    for chunk in np.array_split(np.arange(ids.size), 5):  # several adds: the torch view follows regrowth
        m32.add(ids[chunk], vecs[chunk])
        m16.add(ids[chunk], vecs[chunk])
    assert m16.dtype == "bfloat16" and m16._mat.dtype == np.uint16 and m16._mat.nbytes * 2 == m32._mat.nbytes
    rows32, miss32 = m32.lookup(ids[::-1])
    rows16, miss16 = m16.lookup(ids[::-1])
    assert not miss16.any() and (rows16 == rows32).all()
    np.testing.assert_allclose(m16.gather(rows16), m32.gather(rows32), atol=2**-9)
    np.testing.assert_allclose(m16.matrix, m32.matrix, atol=2**-9)
    anchors = _unit(rng, 8, 64)
    centroid = _unit(rng, 1, 64)[0]
    s32, c32 = m32.similarities(rows32, anchors, centroid)
    s16, c16 = m16.similarities(rows16, anchors, centroid)
    assert s16.dtype == np.float32 and s16.shape == (ids.size, 8) and c16 is not None and c16.shape == (ids.size,)
    assert np.abs(s16 - s32).max() <= COS_TOL and c32 is not None and np.abs(c16 - c32).max() <= COS_TOL
    v = m32.gather(rows32)  # float32: the historical arithmetic, bit for bit
    np.testing.assert_array_equal(s32, v @ anchors.T)
    np.testing.assert_array_equal(c32, v @ centroid)
    again, none = m16.similarities(rows16, anchors)  # the prepared anchors are reused, without the centroid
    np.testing.assert_allclose(again, s16, atol=COS_TOL)
    assert none is None
    np.testing.assert_allclose(m16.best(rows16, anchors), s32.max(axis=1), atol=COS_TOL)
    few = rows16[:40]  # the drawn candidates of the shipped policy: widened to float32, not a bfloat16 GEMM
    s_few, c_few = m16.similarities(few, anchors, centroid)
    np.testing.assert_array_equal(s_few, m16.gather(few) @ anchors.T)
    assert c_few is not None and np.abs(c_few - c32[:40]).max() <= COS_TOL
    assert np.abs(s_few - s32[:40]).max() <= COS_TOL
    # replacing an item's vector replaces its bfloat16 row too
    m16.add(ids[:1], -vecs[:1])
    np.testing.assert_allclose(m16.gather(m16.lookup(ids[:1])[0]), -m32.gather(m32.lookup(ids[:1])[0]), atol=2**-9)


def test_dtype_self_test_and_explicit_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_dtype("float32", 384) == "float32"
    assert choose_dtype("bfloat16", 384) == "bfloat16"
    assert choose_dtype("auto", 64, timings=(1.0e-4, 0.5e-4)) == "bfloat16"  # clearly faster: taken
    assert choose_dtype("auto", 64, timings=(1.0e-4, 0.95e-4)) == "float32"  # within 10%: not worth it
    assert choose_dtype("auto", 64, timings=(1.0e-4, 2.0e-4)) == "float32"  # emulated bfloat16: slower
    f32, b16 = time_dtypes(64, n=200, repeats=3)
    assert f32 > 0 and b16 > 0
    assert choose_dtype("auto", 64, n=200) in ("float32", "bfloat16")
    auto = ItemMatrix(dtype="auto")
    assert auto.dtype == "float32" and auto.requested_dtype == "auto"  # nothing stored yet: not settled
    auto.add(np.arange(3, dtype=np.int64), np.eye(3, 16, dtype=np.float32))
    assert auto.dtype in ("float32", "bfloat16") and len(auto) == 3
    monkeypatch.setitem(sys.modules, "torch", None)  # no torch: float32, never an import error at run time
    assert choose_dtype("auto", 384) == "float32"


@pytest.mark.parametrize("label_source", ["map", "calibrator"])
def test_bf16_labels_within_tolerance_of_float32(label_source: str) -> None:
    """Same requests, same draws, same sample ids; labels and similarities within the stated bounds."""
    ref, raws = synthetic(candidates=300, k=8, dim=384, batches=30, items=3000, users=8, label_source=label_source,
                          dtype="float32")
    bf, _ = synthetic(candidates=300, k=8, dim=384, batches=0, items=3000, users=8, label_source=label_source,
                      dtype="bfloat16")
    assert bf.items.dtype == "bfloat16" and ref.items.dtype == "float32"
    diff = max_label_difference(bf, ref, raws)
    assert diff["similarity"] <= COS_TOL
    assert diff["label"] <= LABEL_TOL
    assert diff["similarity"] > 0  # it is bfloat16 that was compared, not float32 twice
    same = total = 0
    for raw in raws:
        a, b = orjson.loads(fast(bf)(raw)), orjson.loads(fast(ref)(raw))
        assert [s["sample_id"] for s in a["samples"]] == [s["sample_id"] for s in b["samples"]]
        assert (a["candidates_total"], a["sampled_out"]) == (b["candidates_total"], b["sampled_out"])
        same += sum(x["matched_anchor"] == y["matched_anchor"] for x, y in zip(a["samples"], b["samples"], strict=True))
        total += len(a["samples"])
    assert total > 0 and same / total >= 0.95  # the matched anchor flips only on near-ties
