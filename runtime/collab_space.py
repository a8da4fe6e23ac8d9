"""A collaborative frozen space: item vectors from who clicked what, for items the clicks never reached
a content adapter.

Why: the shipped frozen space is a text encoder of titles and genres. A user's anchors in it say "films
that read like the ones you clicked", which carries little of what makes people click the same things.
Real pre-ranking stacks match in a behaviour space (item2vec, factorised co-clicks); this module builds
one from the training period's clicks, so anchors, the calibrator's similarity features and the SID
tokenizer can work where the collaborative signal lives. It stays *frozen* like the content space: fitted
once on a period, versioned by a digest of what went in, never updated by the stream it labels.

Method (a normalised PureSVD, Cremonesi et al. 2010; Nikolakopoulos et al. 2019):

* ``X`` is the binary user × item click matrix; each user's row is scaled by 1/√(their clicks) (a heavy
  clicker should not define the space) and each item's column by count^(β − 1), β = ``popularity_beta``
  (β = 1 keeps raw co-clicks, which the most popular items dominate; β = 0.5 is the usual choice);
* the item vectors are the top ``dim`` right singular vectors times √σ, L2-normalised, so the cosine of
  two items follows how the same users clicked both;
* an item with few clicks gets its content vector's *translation*: a ridge map content → collaborative
  space fitted on the items with at least ``min_clicks`` clicks, blended with its own SVD vector by
  n / (n + ``min_clicks``) (n its clicks): a new item is placed where similar-reading items sit, an item
  with a history where its clickers put it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

KIND = "collab-svd"


@dataclass(frozen=True)
class CollabConfig:
    """How the space is fitted (stored with it: the same config and clicks give the same vectors)."""

    dim: int = 64
    popularity_beta: float = 0.5
    min_clicks: int = 5
    ridge: float = 1.0
    seed: int = 0


@dataclass
class CollabSpace:
    """Unit item vectors (float32, items × dim) in the order of ``item_ids``, and what made them."""

    item_ids: np.ndarray
    vectors: np.ndarray
    config: CollabConfig
    version: str
    adapter: np.ndarray  # (content dim, dim): content vector → this space, for items the fit never saw
    content_id: str = ""  # the encoder whose vectors the adapter reads
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The collection-style name: the kind, the size and the version, like ``items__<encoder>``."""
        return f"{KIND}{self.config.dim}-{self.version}"

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        c = self.config
        np.savez(tmp, item_ids=self.item_ids, vectors=self.vectors, version=self.version, adapter=self.adapter,
                 content_id=self.content_id,
                 config=np.asarray([c.dim, c.popularity_beta, c.min_clicks, c.ridge, c.seed], np.float64))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> CollabSpace:
        with np.load(path) as z:
            c = z["config"].tolist()
            cfg = CollabConfig(int(c[0]), float(c[1]), int(c[2]), float(c[3]), int(c[4]))
            return cls(z["item_ids"].astype(np.int64), z["vectors"].astype(np.float32), cfg, str(z["version"]),
                       z["adapter"].astype(np.float32), str(z["content_id"]))

    def place(self, content: np.ndarray) -> np.ndarray:
        """Unit vectors in this space for content vectors (n, content dim): the adapter, for new items and
        for text anchors, which have no clicks."""
        return _unit(np.asarray(content, np.float64) @ self.adapter)

    def lookup(self, item_ids: np.ndarray, content: np.ndarray) -> np.ndarray:
        """The fitted vector of each known item, the adapter's placement of the others."""
        ids = np.asarray(item_ids, np.int64)
        order = np.argsort(self.item_ids)
        at = np.minimum(np.searchsorted(self.item_ids, ids, sorter=order), max(len(order) - 1, 0))
        pos = order[at] if len(order) else np.zeros(len(ids), np.int64)
        known = self.item_ids[pos] == ids if len(order) else np.zeros(len(ids), bool)
        out = self.place(content) if (~known).any() else np.zeros((len(ids), self.vectors.shape[1]), np.float32)
        out[known] = self.vectors[pos[known]]
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n > 0, n, 1.0)).astype(np.float32)


def fit_collab_space(user: np.ndarray, item: np.ndarray, n_items: int, content: np.ndarray,
                     cfg: CollabConfig | None = None, item_ids: np.ndarray | None = None,
                     content_id: str = "") -> CollabSpace:
    """Fit the space from click pairs (dense user index, dense item index < ``n_items``) and the items'
    content vectors (``n_items`` × content dim, the adapter's input).

    Raises ValueError when the clicks cannot support ``dim`` factors (fewer distinct users or items
    than dim + 1): say so instead of returning a space of noise.
    """
    cfg = cfg or CollabConfig()
    user, item = np.asarray(user, np.int64), np.asarray(item, np.int64)
    if len(user) != len(item):
        raise ValueError("user and item arrays of the click pairs differ in length")
    ids = np.arange(n_items, dtype=np.int64) if item_ids is None else np.asarray(item_ids, np.int64)
    _, u = np.unique(user, return_inverse=True)
    x = sp.csr_matrix((np.ones(len(u)), (u, item)), shape=(int(u.max()) + 1 if len(u) else 0, n_items))
    x.data[:] = 1.0  # duplicates summed by the constructor: a click is a click
    users, clicked = x.shape[0], int((np.asarray(x.sum(0)).ravel() > 0).sum())
    if min(users, clicked) <= cfg.dim:
        raise ValueError(f"collaborative space: {users} users and {clicked} clicked items cannot support "
                         f"{cfg.dim} factors; lower the dimension or fit on a longer period")
    count = np.asarray(x.sum(0)).ravel()
    per_user = np.asarray(x.sum(1)).ravel()
    row_scale = sp.diags(1.0 / np.sqrt(np.maximum(per_user, 1.0)))
    col_scale = sp.diags(np.where(count > 0, np.maximum(count, 1.0) ** (cfg.popularity_beta - 1.0), 0.0))
    xs = (row_scale @ x @ col_scale).tocsc()
    rng = np.random.default_rng(cfg.seed)
    _, s, vt = svds(xs, k=cfg.dim, v0=rng.standard_normal(min(xs.shape)), random_state=cfg.seed)
    order = np.argsort(-s)
    own = vt[order].T * np.sqrt(s[order])[None, :]  # items × dim
    own = _unit(own)
    content = np.asarray(content, np.float64)
    train = count >= cfg.min_clicks
    if train.sum() < cfg.dim:  # too few well-clicked items to fit a map: the content side stays empty
        w = np.zeros((content.shape[1], cfg.dim))
    else:
        a = content[train]
        w = np.linalg.solve(a.T @ a + cfg.ridge * np.eye(a.shape[1]), a.T @ own[train])
    mapped = _unit(content @ w)
    share = (count / (count + cfg.min_clicks))[:, None]
    vectors = _unit(share * own + (1.0 - share) * mapped)
    digest = hashlib.blake2b(digest_size=6)
    digest.update(np.ascontiguousarray(np.stack([user, item])).tobytes())
    digest.update(repr(cfg).encode())
    digest.update(np.ascontiguousarray(content, np.float32).tobytes())
    info = {"users": users, "items": n_items, "clicked_items": clicked, "clicks": int(x.nnz),
            "adapted_items": int((count < cfg.min_clicks).sum()), "singular_values_top3": s[order][:3].tolist()}
    return CollabSpace(ids, vectors, cfg, digest.hexdigest(), w.astype(np.float32), content_id, info)


__all__ = ["CollabConfig", "CollabSpace", "KIND", "fit_collab_space"]
