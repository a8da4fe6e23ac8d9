"""The listwise rank term of the pre-ranker's objective (workers/model.py) and the eval's request-grouped steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpl.eval.context import Rows
from gpl.eval.methods import _chunks
from workers.model import Batch, ModelConfig, PreRanker, RankTerm, listwise_kl, make_optimizer, train_step


def _kl_by_hand(f: np.ndarray, y: np.ndarray, t: float) -> float:
    q = np.exp(np.log(y / (1 - y)) / t)
    q /= q.sum()
    s = np.exp(f / t)
    s /= s.sum()
    return float((q * np.log(q / s)).sum() * t * t)


def test_listwise_kl_matches_the_definition_per_group_and_skips_singletons() -> None:
    f = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.1, 7.0])
    y = torch.tensor([0.05, 0.2, 0.01, 0.3, 0.02, 0.9])
    g = torch.tensor([4, 4, 4, 9, 9, 1])  # group 1 has one row: no order to learn
    got = float(listwise_kl(f, y, g, 2.0))
    want = (_kl_by_hand(f[:3].numpy(), y[:3].numpy(), 2.0) + _kl_by_hand(f[3:5].numpy(), y[3:5].numpy(), 2.0)) / 2
    assert got == pytest.approx(want, rel=1e-5)
    assert float(listwise_kl(f[5:], y[5:], g[5:], 1.0)) == 0.0


def test_listwise_kl_is_blind_to_level_and_zero_at_the_labels_order() -> None:
    y = torch.tensor([0.02, 0.04, 0.08, 0.5])
    g = torch.zeros(4, dtype=torch.int64)
    exact = torch.logit(y) - 3.0  # any shift per request: same order, same softmax
    assert float(listwise_kl(exact, y, g, 1.0)) == pytest.approx(0.0, abs=1e-6)
    reversed_ = torch.logit(y).flip(0)
    assert float(listwise_kl(reversed_, y, g, 1.0)) > 0.1


def test_the_rank_term_orders_a_request_the_pointwise_loss_barely_moves() -> None:
    """Two candidates of one request labeled 0.02 and 0.06: after the same steps the rank term has put
    the higher label clearly ahead, the pointwise loss alone much less so."""
    cfg = ModelConfig(hash_buckets=64, id_dim=4, hidden=8, content_dim=3)
    vecs = np.eye(3, dtype=np.float32)[[0, 1]]

    def gap(rank: RankTerm | None) -> float:
        m = PreRanker(cfg)
        opt = make_optimizer(m.parameters(), 1e-2)
        b = Batch(["u", "u"], np.array([1, 2]), vecs, np.array([0.02, 0.06], np.float32), np.ones(2, np.float32),
                  np.ones(2, bool), group=np.zeros(2, np.int64))
        for _ in range(30):
            parts = train_step(m, opt, b, 1.0, rank)
        assert (parts["rank"] == parts["rank"]) is (rank is not None)
        s = m.score(["u", "u"], np.array([1, 2]), vecs)
        return float(np.log(s[1] / (1 - s[1])) - np.log(s[0] / (1 - s[0])))

    target = float(np.log(0.06 / 0.94) - np.log(0.02 / 0.98))
    with_rank, pointwise = gap(RankTerm(weight=1.0)), gap(None)
    assert abs(with_rank - target) < abs(pointwise - target)
    assert with_rank > 0.5 * target


def test_eval_steps_keep_a_requests_rows_together_for_the_rank_term() -> None:
    req = np.repeat(np.arange(50), 7)
    z = np.zeros(len(req))
    extra = Rows(z.astype(np.int64), np.arange(len(req)), req, z.astype(np.float32), z.astype(np.float32),
                 np.ones(len(req), bool))
    chunks = _chunks(extra, 6, np.random.default_rng(0), by_request=True)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(req)))
    owner = {}
    for s, c in enumerate(chunks):
        for r in set(req[c].tolist()):
            assert owner.setdefault(r, s) == s  # never split over two steps
    assert all(len(c) for c in chunks)
    rows = _chunks(extra, 6, np.random.default_rng(0), by_request=False)
    assert any(len(set(req[c].tolist())) > 12 for c in rows)  # the plain split scatters requests


def test_the_residual_target_ranks_what_the_priors_do_not_explain() -> None:
    """With the priors' part as offset: a constant residual (priors-only labels) carries no order and adds
    nothing; otherwise the optimum is still the labels' own logits (up to a constant)."""
    y = torch.tensor([0.02, 0.04, 0.08, 0.5])
    g = torch.zeros(4, dtype=torch.int64)
    prior = torch.logit(y)  # the labels ARE their priors: no residual
    f = torch.tensor([3.0, -1.0, 0.0, 2.0], requires_grad=True)
    term = listwise_kl(f, y, g, 1.0, prior)
    assert float(term.detach()) == 0.0
    term.backward()
    assert f.grad is not None and float(f.grad.abs().sum()) == 0.0
    half = 0.5 * torch.logit(y)  # the priors explain half of each logit
    assert float(listwise_kl(torch.logit(y) + 1.0, y, g, 1.0, half)) == pytest.approx(0.0, abs=1e-6)
    assert float(listwise_kl(torch.logit(y).flip(0), y, g, 1.0, half)) > 0.1


def test_a_residual_rank_term_without_prior_logits_is_refused() -> None:
    cfg = ModelConfig(hash_buckets=64, id_dim=4, hidden=8, content_dim=3)
    m = PreRanker(cfg)
    b = Batch(["u", "u"], np.array([1, 2]), np.eye(3, dtype=np.float32)[[0, 1]], np.array([0.1, 0.2], np.float32),
              np.ones(2, np.float32), np.ones(2, bool), group=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="prior logit"):
        train_step(m, make_optimizer(m.parameters(), 1e-2), b, 1.0, RankTerm(1.0, 1.0, "residual"))
