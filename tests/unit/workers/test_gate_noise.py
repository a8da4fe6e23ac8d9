"""The publication gate knows its noise (issue 22, item 6): a paired bootstrap on the held-out rows.

A difference the slice cannot see (two equally good models, one a little lower on this slice by chance)
is published; a model worse beyond the noise is refused, with the interval in the reason; the weighted
AUC the bootstrap rests on equals the plain AUC, ties and repeated rows included.
"""

from __future__ import annotations

import numpy as np

from workers.labeler.calibrator import binary_auc
from workers.trainer.gate import Scores, decide, gauc
from workers.trainer.gate_noise import paired_bootstrap, weighted_aucs

MARGIN, NEED = 0.005, 200


def slice_of(seed: int, n: int = 1200, users: int = 120) -> tuple[np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(np.float32)
    return y, [f"u{i % users}" for i in range(n)], rng.normal(size=n) + 0.8 * y  # the signal both models see


def scores(p: np.ndarray, y: np.ndarray, users: list[str]) -> Scores:
    g, k = gauc(p, y, users)
    return Scores(binary_auc(p, y), g, len(y), int(y.sum()), k)


def test_weighted_auc_is_the_auc_of_the_drawn_rows() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.3).astype(np.float32)
    s = np.round(rng.normal(size=300) + y, 1)  # many ties
    assert np.isclose(weighted_aucs(s, y, np.ones((1, 300)))[0], binary_auc(s, y))
    counts = rng.integers(0, 3, size=(4, 300))
    for c in counts:
        assert np.isclose(weighted_aucs(s, y, c[None, :])[0], binary_auc(np.repeat(s, c), np.repeat(y, c)))


def test_a_difference_within_the_noise_is_published_one_beyond_it_refused() -> None:
    found = published = 0
    for seed in range(40):  # equally good models: on some slices the candidate is lower by chance
        y, users, signal = slice_of(seed)
        rng = np.random.default_rng(1000 + seed)
        cand, pub = signal + 0.5 * rng.normal(size=len(y)), signal + 0.5 * rng.normal(size=len(y))
        c, p = scores(cand, y, users), scores(pub, y, users)
        if c.gauc >= p.gauc - MARGIN:
            continue
        found += 1
        assert decide(c, p, MARGIN, NEED)[0] == "refused"  # the point rule: refused for noise
        paired = paired_bootstrap(cand, pub, y, users, seed=seed)
        lo, hi = paired.interval("GAUC")
        assert lo < c.gauc - p.gauc < hi
        published += decide(c, p, MARGIN, NEED, paired)[0] == "published"
    # a 95 % one-sided bound per metric: chance alone refuses at most a few of them
    assert found >= 5 and published >= 0.8 * found, (found, published)

    y, users, signal = slice_of(7)
    rng = np.random.default_rng(7)
    pub, worse = signal + 0.5 * rng.normal(size=len(y)), rng.normal(size=len(y))  # worse: no signal at all
    paired = paired_bootstrap(worse, pub, y, users, seed=7)
    outcome, reason = decide(scores(worse, y, users), scores(pub, y, users), MARGIN, NEED, paired)
    assert outcome == "refused" and "interval up to" in reason and paired.interval("AUC")[1] < -MARGIN
    assert paired.to_json()["gauc"][2] < -MARGIN and paired.to_json()["resamples"] == paired.resamples


def test_the_bootstrap_is_reproducible_from_its_seed() -> None:
    y, users, signal = slice_of(1)
    a, b = signal, signal[::-1].copy()
    assert paired_bootstrap(a, b, y, users, seed=5) == paired_bootstrap(a, b, y, users, seed=5)
