"""Unit-length rows: the one normalisation of the frozen space (items, anchors, profiles, centroids).

Cosine similarity is a dot product only between unit vectors, so every vector that enters the space goes
through :func:`normalize`. A zero row stays zero (its norm is treated as 1) instead of becoming NaN: a
vector with no direction matches nothing, which is what callers expect of an empty profile.
"""

from __future__ import annotations

import numpy as np


def normalize(v: np.ndarray, axis: int = -1) -> np.ndarray:
    """``v`` scaled to unit L2 norm along ``axis`` (float32; zero vectors left at zero)."""
    a = np.asarray(v, dtype=np.float32)
    norms = np.linalg.norm(a, axis=axis, keepdims=True)
    return (a / np.where(norms == 0, 1.0, norms)).astype(np.float32, copy=False)
