"""The pre-ranker's anchor cross feature: how close a candidate is to the user's current interest anchors.

COLD-style: a real pre-ranker reads cheap user x item cross features beside its ids. GPL's anchors are the
user's interests in the frozen space, so the cross feature a serving team can compute online for every
candidate is the candidate's cosine to them. Two numbers per candidate (:data:`ANCHOR_CROSS_DIM`):

* ``best``: max_k cos(a_k, v) — close to one interest (what the labeler's ``s1`` is);
* ``top2``: the mean of the two best cosines (``best`` again for a set of one anchor) — close to one interest
  only, or between two.

One definition (:func:`anchor_cross`) for the labeler's emission (``Sample.anchor_cross`` of pseudo
samples), the trainer's derivation for the real-label samples (:class:`AnchorLookup`, from the anchors
collection that serving reads too), ``gpl eval`` and the export's feature spec. A user without anchors
gets zeros, online and in training alike.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from runtime.vectors.index import VectorIndex
from workers.anchors.policy import anchor_point_id

log = logging.getLogger(__name__)

ANCHOR_CROSS_DIM = 2
ANCHOR_CROSS_INPUT = "anchor_cross"
LOOKUP_TTL_S = 60.0  # how long the trainer trusts a user's anchor set fetched from the collection
LOOKUP_MAX_USERS = 100_000  # users whose anchor sets the trainer keeps (least recently used dropped)


def anchor_cross(sims: np.ndarray) -> np.ndarray:
    """(m, 2) float32 [best, mean of the top two] of (m, K) cosines to the user's K anchors (K >= 1);
    (m, 2) zeros when K = 0 (a user without anchors).

    Column by column over a contiguous (K, m) copy (K is a few anchors): ~2 numpy calls per anchor on the
    labeler's hot path, where ``np.partition`` along the short axis pays a per-row setup (~30 µs for 40 x 3)."""
    s = np.asarray(sims, np.float32)
    m = int(s.shape[0])
    out = np.zeros((m, ANCHOR_CROSS_DIM), np.float32)
    if s.ndim != 2 or s.shape[1] == 0:
        return out
    t = np.ascontiguousarray(s.T)
    best = t[0].copy()
    second = best.copy() if len(t) == 1 else np.full(m, -np.inf, np.float32)
    for col in t[1:]:
        np.maximum(second, np.minimum(best, col), out=second)
        np.maximum(best, col, out=best)
    out[:, 0] = best
    out[:, 1] = (best + second) * np.float32(0.5)
    return out


def cross_of(anchors: np.ndarray | None, vectors: np.ndarray) -> np.ndarray:
    """:func:`anchor_cross` of unit item ``vectors`` (m, d) against unit ``anchors`` (K, d); None: zeros."""
    v = np.asarray(vectors, np.float32)
    if anchors is None or not len(anchors):
        return np.zeros((v.shape[0], ANCHOR_CROSS_DIM), np.float32)
    return anchor_cross(v @ np.asarray(anchors, np.float32).T)


def newest_set(ids: np.ndarray, vectors: np.ndarray, payloads: Sequence[dict[str, object]]) -> np.ndarray | None:
    """The anchor vectors of the newest set among a user's slot points (a reader may see old and new slots
    for a moment: the anchors worker upserts before it deletes; ``generated_at`` tells them apart)."""
    if not len(ids):
        return None
    stamps = [_stamp(p.get("generated_at")) for p in payloads] if len(payloads) == len(ids) else [0] * len(ids)
    newest = max(stamps)
    keep = [j for j, t in enumerate(stamps) if t == newest]
    return np.asarray(vectors, np.float32)[keep]


def _stamp(v: object) -> int:
    return v if isinstance(v, int) else 0


class AnchorLookup:
    """The users' current anchor sets, read from the anchors collection (``qdrant.anchors_collection``), cached.

    What the trainer uses for samples that come without ``anchor_cross`` (the real labels the streams stage
    writes: it holds no anchors): the same collection a serving team reads for the feature, so training and
    serving compute it from one source. A set is trusted for ``ttl_s`` seconds, then read again.
    """

    def __init__(self, index: VectorIndex, collection: str, slots: int, *, ttl_s: float = LOOKUP_TTL_S,
                 max_users: int = LOOKUP_MAX_USERS) -> None:
        self.index, self.collection, self.slots = index, collection, slots
        self.ttl_s, self.max_users = ttl_s, max_users
        self._sets: OrderedDict[str, tuple[float, np.ndarray | None]] = OrderedDict()

    def anchors(self, user_id: str) -> np.ndarray | None:
        """(K, d) unit anchors of the user's newest set, None for a user without anchors."""
        now = time.monotonic()
        got = self._sets.get(user_id)
        if got is not None and now - got[0] < self.ttl_s:
            self._sets.move_to_end(user_id)
            return got[1]
        ids = np.asarray([anchor_point_id(user_id, s) for s in range(self.slots)], np.int64)
        try:
            pts = self.index.retrieve(self.collection, ids, with_payload=True)
            found = newest_set(pts.ids, pts.vectors, pts.payloads)
        except KeyError:  # no anchors collection yet: nobody has anchors
            found = None
        self._sets[user_id] = (now, found)
        self._sets.move_to_end(user_id)
        while len(self._sets) > self.max_users:
            self._sets.popitem(last=False)
        return found

    def cross(self, user_id: str, vectors: np.ndarray) -> np.ndarray:
        """(m, 2) anchor cross feature of ``vectors`` for ``user_id`` (zeros without anchors)."""
        return cross_of(self.anchors(user_id), vectors)
