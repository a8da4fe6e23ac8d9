"""Anchor sources that produce vectors, not texts: the seam, and the content (k-means) source.

The text backends (``workers/anchors/generators/``) write anchor *phrases* that the anchors worker embeds with
the frozen encoder. Some routes produce the anchor *vectors* directly, already in the frozen space:

* semantic IDs (``workers/anchors/sid/``, the paper's own route): a decoded code's centroid;
* content (:class:`ContentAnchorSource`, no model at all): clusters of the user's own positives.

They share :class:`VectorAnchorSource`: per user the recent history item ids and their frozen vectors
(from the item collection, the worker reads them with the item texts) in, K (vector, log-prob, label)
out, for a whole micro-batch at once. The label is for lineage and debugging (the ``text`` of the
published ``Anchor``), never embedded. ``model`` and ``prompt_hash`` fill the same lineage fields as
a text backend's. A vector source is a deterministic function of (history, its artifacts), so the
worker keeps no replay cache for it: a replay recomputes the same anchors.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class VectorAnchors:
    """One user's anchors: ``vectors`` (k, dim) unit rows, best first, with log-probs and labels.

    Empty (k = 0) when the source has nothing to say about the user; ``detail`` then says why (the
    worker dead-letters the request with it).
    """

    vectors: np.ndarray
    logprobs: list[float]
    labels: list[str]
    detail: str = ""

    def __len__(self) -> int:
        return len(self.labels)


@runtime_checkable
class VectorAnchorSource(Protocol):
    model: str
    prompt_hash: str

    def anchor_vectors(self, histories: Sequence[Sequence[int]], vectors: Sequence[np.ndarray], k: int
                       ) -> list[VectorAnchors]:
        """One :class:`VectorAnchors` per user, in order.

        ``histories[i]``: item ids, most recent last; ``vectors[i]``: their frozen unit vectors
        (len(histories[i]), dim). Never raises for an unusual history (empty answers instead).
        """
        ...


# ------------------------------------------------------------------------------------- content route


def cluster_count(n: int, k: int) -> int:
    """Clusters for n history items and K anchors: min(K, ceil(n / 2)), so a cluster has ~2+ items.

    A cluster of one item is that item: with few positives, fewer and broader anchors say more about
    the user than copies of single items.
    """
    return max(0, min(k, math.ceil(n / 2)))


def spherical_kmeans(x: np.ndarray, k: int, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic spherical k-means of unit rows ``x`` (n, dim): (unit centres (c, dim), assignment (n,)).

    Initialisation is farthest-point, starting from the *last* row (the most recent item: the newest
    interest is always represented), each next centre the row least similar to every centre so far
    (ties: the more recent row). No randomness, so the same history always gives the same anchors.
    Fewer than ``k`` centres come back when the rows have fewer distinct directions (duplicates).
    Assignment is by cosine (dot product); a centre is the normalised sum of its rows; an emptied
    centre keeps its place; iteration stops when the assignment no longer changes.
    """
    n = len(x)
    if n == 0 or k <= 0:
        return np.zeros((0, x.shape[1] if x.ndim == 2 else 0), np.float32), np.zeros(0, np.int64)
    x = np.asarray(x, np.float64)
    chosen = [n - 1]
    best = x @ x[n - 1]  # similarity of each row to its nearest centre so far
    while len(chosen) < min(k, n):
        far = int(n - 1 - np.argmin(best[::-1]))  # least similar; ties -> the more recent row
        if best[far] > 1.0 - 1e-9:  # every row coincides with a centre: no new direction left
            break
        chosen.append(far)
        best = np.maximum(best, x @ x[far])
    centres = x[chosen]
    assign = np.full(n, -1, np.int64)
    for _ in range(max(1, iters)):
        new = np.argmax(x @ centres.T, axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        sums = np.zeros_like(centres)
        np.add.at(sums, assign, x)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centres = np.where(norms > 1e-12, sums / np.maximum(norms, 1e-12), centres)
    return centres.astype(np.float32), assign


class ContentAnchorSource:
    """Anchors = cluster centres of the user's recent positives in the frozen space (no LLM, no training).

    Per user: spherical k-means (:func:`spherical_kmeans`) with :func:`cluster_count` clusters over the
    history vectors; each anchor is a unit centre. Anchors come largest cluster first (ties: the cluster
    holding the more recent item). ``logprob`` = log(cluster share), the log-probability that a random
    history item belongs to the cluster: it plays the part of a generation probability in the
    confidence weight (an anchor backed by most of the history is trusted more than a one-item
    cluster). Label: ``"cluster 2 of 4 (3 items)"``.
    """

    VERSION = 1

    def __init__(self, iters: int = 10) -> None:
        self.iters = iters
        spec = json.dumps({"route": "content-kmeans", "v": self.VERSION, "iters": iters,
                           "k": "min(K, ceil(n/2))", "init": "farthest-point from most recent"}, sort_keys=True)
        self.prompt_hash = hashlib.blake2b(spec.encode(), digest_size=8).hexdigest()
        self.model = f"content-kmeans-{self.prompt_hash[:8]}"

    def anchor_vectors(self, histories: Sequence[Sequence[int]], vectors: Sequence[np.ndarray], k: int
                       ) -> list[VectorAnchors]:
        return [self.one(np.asarray(v, np.float32), k) for v in vectors]

    def one(self, x: np.ndarray, k: int) -> VectorAnchors:
        """One user's anchors from history vectors (n, dim), most recent last."""
        n = len(x)
        dim = x.shape[1] if x.ndim == 2 else 0
        if n == 0:
            return VectorAnchors(np.zeros((0, dim), np.float32), [], [], detail="empty history")
        norms = np.linalg.norm(x, axis=1)
        keep = norms > 1e-12
        if not keep.any():
            return VectorAnchors(np.zeros((0, dim), np.float32), [], [], detail="history vectors are all zero")
        x = x[keep] / norms[keep, None]
        centres, assign = spherical_kmeans(x, cluster_count(len(x), k), self.iters)
        sizes = np.bincount(assign, minlength=len(centres))
        last = np.full(len(centres), -1)
        np.maximum.at(last, assign, np.arange(len(x)))  # most recent member of each cluster
        order = [c for c in np.lexsort((-last, -sizes)) if sizes[c] > 0]
        m = len(order)
        return VectorAnchors(
            centres[order],
            [float(np.log(sizes[c] / len(x))) for c in order],
            [f"cluster {j + 1} of {m} ({sizes[c]} item{'s' if sizes[c] != 1 else ''})" for j, c in enumerate(order)],
        )
