"""Per user the newest anchor set in array form (:class:`UserAnchors`), refusing sets from another space.

Anchors embedded under another encoder than the items live in another space: cosine across spaces is
noise that would still look like a similarity, so such sets are refused, never scored.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from runtime.vectors.normalize import normalize
from schemas.events import AnchorSet
from workers.labeler.confidence import coherence_of, consistency_of
from workers.labeler.features import anchor_weights
from workers.labeler.item_matrix import ItemMatrix

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- anchors

@dataclass
class UserAnchors:
    """A user's current anchor set as arrays (what scoring and lineage need, nothing per-anchor)."""

    user_id: str
    version: int
    vectors: np.ndarray  # (K, dim) float32, normalised
    logprobs: np.ndarray  # (K,) float32
    model: str
    prompt_hash: str
    encoder: str
    generated_at: int
    fallback: bool
    history: np.ndarray  # int64 item ids the anchors were generated from
    coherence: float
    consistency: float | None = None  # computed on first use, once all history vectors are known
    texts: tuple[str, ...] = ()  # the anchors' own texts (SIDs for semantic-ID anchors), for reports
    centroid: np.ndarray | None = None  # unit mean of the history vectors (computed on first use, like consistency)
    weights: np.ndarray | None = None  # the anchors' mixture weights (computed on first use)

    def anchor_weights(self) -> np.ndarray:
        """:func:`~workers.labeler.features.anchor_weights` of the log-probs, once per set (not per request)."""
        if self.weights is None:
            self.weights = anchor_weights(self.logprobs)
        return self.weights

    @classmethod
    def of(cls, vectors: np.ndarray, logprobs: np.ndarray, *, history: np.ndarray, user_id: str = "",
           version: int = 0, model: str = "", prompt_hash: str = "", encoder: str = "", generated_at: int = 0,
           fallback: bool = False, texts: tuple[str, ...] = ()) -> UserAnchors:
        """Anchors from raw vectors: normalised, contiguous, with their coherence computed once."""
        vecs = np.ascontiguousarray(normalize(vectors))
        return cls(user_id=user_id, version=version, vectors=vecs, logprobs=np.asarray(logprobs, np.float32),
                   model=model, prompt_hash=prompt_hash, encoder=encoder, generated_at=generated_at,
                   fallback=fallback, history=np.asarray(history, np.int64), coherence=coherence_of(vecs),
                   texts=tuple(texts))


def no_anchors(user_id: str, dim: int, encoder: str) -> UserAnchors:
    """The stand-in anchor set of a user without anchors, for calibrators that read no similarity: one zero
    vector (version 0, model ``none``), so lineage and sample ids stay well defined."""
    return UserAnchors.of(np.zeros((1, dim), np.float32), np.zeros(1, np.float32), history=np.zeros(0, np.int64),
                          user_id=user_id, model="none", prompt_hash="-", encoder=encoder)


class AnchorBook:
    """Per user the newest AnchorSet, refusing sets from another space.

    Only a newer set (``generated_at``) replaces an older one (a replayed or re-ordered message cannot roll a user
    back). A set whose ``encoder`` is not the item collection's encoder is refused with
    ``encoder_mismatch``: its vectors live in another space, and cosine across spaces is noise that
    would still look like a similarity. ``dim_mismatch`` and ``bad_vectors`` (non-finite or zero)
    are refused too. :meth:`put` returns the outcome; :attr:`counts` counts them.
    """

    ACCEPTED = "accepted"
    STALE = "stale"
    REFUSALS = frozenset({"encoder_mismatch", "dim_mismatch", "bad_vectors"})

    def __init__(self, encoder: str, items: ItemMatrix | None = None) -> None:
        self.encoder = encoder
        self.items = items
        self._users: dict[str, UserAnchors] = {}
        self.counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def get(self, user_id: str) -> UserAnchors | None:
        return self._users.get(user_id)

    def drop(self, user_id: str) -> bool:
        """Forget a user (a tombstone on the compacted ``anchors`` topic)."""
        return self._users.pop(user_id, None) is not None

    def put(self, aset: AnchorSet) -> str:
        """Take the set if it is newer and from our space: ``accepted``, ``stale`` or a refusal reason."""
        outcome = self._check(aset)
        self.counts[outcome] += 1
        return outcome

    def _check(self, aset: AnchorSet) -> str:
        if aset.encoder != self.encoder:
            return "encoder_mismatch"
        cur = self._users.get(aset.user_id)
        # the version names the content (anchors worker); generated_at orders a user's sets
        if cur is not None and aset.generated_at <= cur.generated_at:
            return self.STALE
        try:
            vecs = np.asarray([a.vector for a in aset.anchors], dtype=np.float32)
        except ValueError:
            return "dim_mismatch"  # anchors of different lengths
        if vecs.ndim != 2 or vecs.shape[1] == 0:
            return "dim_mismatch"
        dim = self.items.dim if self.items is not None else None
        if dim is not None and vecs.shape[1] != dim:
            return "dim_mismatch"
        norms = np.linalg.norm(vecs, axis=1)
        if not np.isfinite(vecs).all() or (norms == 0).any():
            return "bad_vectors"
        self._users[aset.user_id] = UserAnchors.of(
            vecs, np.asarray([a.logprob for a in aset.anchors], np.float32), history=np.asarray(aset.history),
            user_id=aset.user_id, version=aset.version, model=aset.model, prompt_hash=aset.prompt_hash,
            encoder=aset.encoder, generated_at=aset.generated_at, fallback=aset.fallback,
        )
        return self.ACCEPTED

    def _history_vectors(self, entry: UserAnchors) -> tuple[np.ndarray, bool]:
        """The vectors of the entry's history items that have one, and whether all of them do."""
        items, ids = self.items, entry.history
        assert items is not None
        rows, missing = items.lookup(ids)
        if missing.any():
            items.fetch(ids[missing])
            rows, missing = items.lookup(ids)
        return items.gather(rows[~missing]), not bool(missing.any())

    def consistency(self, entry: UserAnchors) -> float:
        """The entry's consistency term, cached once every history item has a vector."""
        if entry.consistency is not None:
            return entry.consistency
        if self.items is None or entry.history.size == 0:
            entry.consistency = 1.0
            return 1.0
        vecs, complete = self._history_vectors(entry)
        value = consistency_of(entry.vectors, vecs)
        if complete:
            entry.consistency = value
        return value

    def centroid(self, entry: UserAnchors) -> np.ndarray:
        """The unit centroid of the entry's history vectors (zero without history), cached once complete."""
        if entry.centroid is not None:
            return entry.centroid
        dim = entry.vectors.shape[1]
        if self.items is None or entry.history.size == 0:
            entry.centroid = np.zeros(dim, np.float32)
            return entry.centroid
        vecs, complete = self._history_vectors(entry)
        value = normalize(vecs.mean(axis=0)) if len(vecs) else np.zeros(dim, np.float32)
        if complete:
            entry.centroid = value
        return value
