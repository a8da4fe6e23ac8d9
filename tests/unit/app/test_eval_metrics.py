"""gpl/eval/metrics.py against brute-force definitions (loops over requests and pairs)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from gpl.eval import metrics as M


def _ragged(rng: np.random.Generator, n_req: int, lo: int = 1, hi: int = 12) -> np.ndarray:
    sizes = rng.integers(lo, hi, n_req)
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _scores(rng: np.random.Generator, n: int) -> np.ndarray:
    # a coarse grid so that ties happen often
    return np.round(rng.random(n) * 8) / 8


def brute_auc(s: np.ndarray, y: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return math.nan
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def brute_order(s: np.ndarray) -> list[int]:
    """Descending score, ties by position."""
    return sorted(range(len(s)), key=lambda i: (-s[i], i))


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_gauc_match_pairwise_counting(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    s, y = _scores(rng, n), (rng.random(n) < 0.3).astype(int)
    g = rng.integers(0, 12, n)
    assert M.auc(s, y) == pytest.approx(brute_auc(s, y))
    num = den = 0.0
    for grp in np.unique(g):
        m = g == grp
        a = brute_auc(s[m], y[m])
        if not math.isnan(a):
            num += a * m.sum()
            den += m.sum()
    assert M.gauc(s, y, g) == pytest.approx(num / den)


def test_auc_edge_cases() -> None:
    assert math.isnan(M.auc(np.array([0.1, 0.2]), np.array([1, 1])))
    assert M.auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert M.auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert math.isnan(M.gauc(np.zeros(0), np.zeros(0), np.zeros(0)))


@pytest.mark.parametrize("seed", range(5))
def test_ranking_metrics_match_loops(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ptr = _ragged(rng, 40)
    n = int(ptr[-1])
    s, rel = _scores(rng, n), rng.random(n) < 0.25
    ranks = M.segment_ranks(s, ptr)
    for k in (1, 3, 5, 10):
        hits = denom = 0
        nd: list[float] = []
        top = M.topk(s, ptr, k)
        for r in range(len(ptr) - 1):
            a, b = ptr[r], ptr[r + 1]
            order = brute_order(s[a:b])
            for rank, i in enumerate(order):
                assert ranks[a + i] == rank
            assert [int(x) - a for x in top[r] if x >= 0] == order[:k]
            n_rel = int(rel[a:b].sum())
            if n_rel == 0:
                continue
            got = [rel[a + i] for i in order[:k]]
            hits += sum(got)
            denom += min(k, n_rel)
            dcg = sum(1 / math.log2(j + 2) for j, g in enumerate(got) if g)
            idcg = sum(1 / math.log2(j + 2) for j in range(min(k, n_rel)))
            nd.append(dcg / idcg)
        assert M.hit_rate(s, rel, ptr, k) == pytest.approx(hits / denom)
        assert M.ndcg(s, rel, ptr, k) == pytest.approx(float(np.mean(nd)))


def test_reliability_and_ece_match_loops() -> None:
    rng = np.random.default_rng(7)
    p, y = rng.random(500), (rng.random(500) < 0.4).astype(float)
    p[:5] = [0.0, 1.0, 0.1, 0.0999999, 0.95]
    mp, my, cnt = M.reliability(p, y, 10)
    total = 0.0
    for b in range(10):
        m = np.array([min(int(x * 10), 9) == b for x in p])
        assert cnt[b] == m.sum()
        if m.any():
            assert mp[b] == pytest.approx(p[m].mean())
            assert my[b] == pytest.approx(y[m].mean())
            total += m.sum() * abs(p[m].mean() - y[m].mean())
    assert M.ece(p, y, 10) == pytest.approx(total / len(p))
    assert M.ece(np.full(4, 0.25), np.array([0, 0, 0, 1])) == pytest.approx(0.0)


def test_top10_diversity_and_tail_match_loops() -> None:
    rng = np.random.default_rng(3)
    ptr = _ragged(rng, 30, 1, 25)
    n = int(ptr[-1])
    s = _scores(rng, n)
    cat = rng.integers(0, 6, n)
    tail = rng.random(n) < 0.4
    vec = rng.normal(size=(n, 5)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    top = M.topk(s, ptr, 10)
    cov, share, ild = [], [], []
    for r in range(len(ptr) - 1):
        a, b = ptr[r], ptr[r + 1]
        idx = [a + i for i in brute_order(s[a:b])[:10]]
        cov.append(len({int(cat[i]) for i in idx}))
        share.append(float(np.mean([tail[i] for i in idx])))
        if len(idx) >= 2:
            d = [1 - float(vec[i] @ vec[j]) for i, j in itertools.combinations(idx, 2)]
            ild.append(float(np.mean(d)))
    assert M.category_coverage(top, cat) == pytest.approx(float(np.mean(cov)))
    assert M.tail_share(top, tail) == pytest.approx(float(np.mean(share)))
    assert M.intra_list_distance(top, vec) == pytest.approx(float(np.mean(ild)), rel=1e-5)


def test_label_fidelity_is_rank_correlation_and_top_overlap_per_request() -> None:
    from gpl.eval.metrics import label_fidelity

    rng = np.random.default_rng(0)
    y = rng.random(60)
    g = np.repeat(np.arange(3), 20)
    same = label_fidelity(y * 5 - 1, y, g)  # a monotone map of the labels: perfect fidelity
    assert same["spearman"] == pytest.approx(1.0) and same["overlap@10"] == pytest.approx(1.0)
    rev = label_fidelity(-y, y, g)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["overlap@10"] == pytest.approx(0.0)
    # by hand, one request: scores order 2 of 3 pairs right
    one = label_fidelity(np.array([1.0, 3.0, 2.0]), np.array([0.1, 0.2, 0.3]), np.zeros(3, np.int64), k=1)
    assert one["spearman"] == pytest.approx(0.5)
    assert one["overlap@1"] == pytest.approx(0.0)  # the label's best (row 2) is not the student's best (row 1)
    flat = label_fidelity(np.ones(3), np.array([0.1, 0.2, 0.3]), np.zeros(3, np.int64))
    assert np.isnan(flat["spearman"])
