"""The collaborative frozen space (runtime/collab_space.py): co-clicked items end up together, an item
without clicks is placed by its content, the fit is deterministic and versioned, too little data says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.collab_space import CollabConfig, CollabSpace, fit_collab_space


def _world(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two taste groups: users 0-59 click items 0-39, users 60-119 items 40-79; items 80-89 are never
    clicked but READ like group A (their content vectors), items 90-99 like group B."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(120):
        pool = np.arange(0, 40) if u < 60 else np.arange(40, 80)
        for i in rng.choice(pool, 12, replace=False):
            users.append(u)
            items.append(int(i))
    a, b = rng.standard_normal(16), rng.standard_normal(16)
    content = np.stack([(a if (i < 40 or 80 <= i < 90) else b) + 0.3 * rng.standard_normal(16) for i in range(100)])
    return np.asarray(users), np.asarray(items), content


def test_co_clicked_items_are_close_and_the_two_groups_apart() -> None:
    u, i, c = _world()
    sp = fit_collab_space(u, i, 100, c, CollabConfig(dim=4, min_clicks=3))
    v = sp.vectors
    assert v.shape == (100, 4) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    within = float((v[:40] @ v[:40].T).mean())
    across = float((v[:40] @ v[40:80].T).mean())
    assert within > across + 0.5


def test_an_item_without_clicks_is_placed_by_its_content() -> None:
    u, i, c = _world()
    v = fit_collab_space(u, i, 100, c, CollabConfig(dim=4, min_clicks=3)).vectors
    centre_a, centre_b = v[:40].mean(0), v[40:80].mean(0)
    assert ((v[80:90] @ centre_a) > (v[80:90] @ centre_b)).all()
    assert ((v[90:100] @ centre_b) > (v[90:100] @ centre_a)).all()


def test_the_fit_is_deterministic_versioned_and_round_trips(tmp_path: Path) -> None:
    u, i, c = _world()
    cfg = CollabConfig(dim=8, min_clicks=3)
    a, b = fit_collab_space(u, i, 100, c, cfg), fit_collab_space(u, i, 100, c, cfg)
    assert a.version == b.version and np.array_equal(a.vectors, b.vectors)
    assert a.name == f"collab-svd8-{a.version}"
    other = fit_collab_space(u[:-5], i[:-5], 100, c, cfg)
    assert other.version != a.version  # other clicks: another space, another name
    back = CollabSpace.load(a.save(tmp_path / "space.npz"))
    assert back.version == a.version and back.config == cfg and np.array_equal(back.vectors, a.vectors)


def test_too_few_clicks_for_the_dimension_is_an_error_that_says_what_to_do() -> None:
    u, i, c = _world()
    with pytest.raises(ValueError, match="lower the dimension"):
        fit_collab_space(u[:20], i[:20], 100, c, CollabConfig(dim=64))
