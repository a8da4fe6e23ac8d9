"""Which of a user's positives an anchor generator (and the pre-ranker's history input) reads: the last ``n``
distinct ones, most recent last.

One rule for the streaming anchors worker and for ``gpl eval``, so the offline anchors are made from the
same kind of history the stream would use. Distinct because a re-clicked item says nothing new and
would crowd others out of a short prompt; most recent last because that is how the prompt lists them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


def recent_distinct(items: Iterable[int], n: int) -> list[int]:
    """The last ``n`` distinct items of ``items`` (oldest first), keeping each item's latest position."""
    newest_first = list(dict.fromkeys(reversed(list(items))))[:n]
    return newest_first[::-1]


def history_profile(vectors: np.ndarray) -> np.ndarray:
    """The pre-ranker's history input: the L2-normalised mean of the history items' frozen vectors
    ((k, d) -> (d,)); all zeros for an empty history (a user without clicks has no direction)."""
    v = np.asarray(vectors, np.float32)
    if not len(v):
        return np.zeros(v.shape[1] if v.ndim == 2 else 0, np.float32)
    m = v.mean(axis=0)
    n = float(np.linalg.norm(m))
    return (m / n).astype(np.float32) if n > 1e-12 else np.zeros_like(m)


def profile_of(items: Iterable[int], vectors: Mapping[int, np.ndarray], dim: int) -> np.ndarray:
    """:func:`history_profile` of ``items`` looked up in ``vectors``; an item without a vector (gone from
    the index) is left out. One rule for the trainer, its publishing gate and the demo's held-out scoring."""
    found = [vectors[i] for i in items if i in vectors]
    return history_profile(np.stack(found) if found else np.zeros((0, dim), np.float32))
