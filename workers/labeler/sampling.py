"""Which candidates of a request get a pseudo-label: the most similar plus a seeded uniform draw.

The draw is seeded by ``(labeler.seed, request_id)`` (:class:`RequestRng`), so a replay labels the same
items.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- sampling

class RequestRng:
    """The random generator of a request: state derived from (settings seed, request id).

    A replay of the request draws the same sample. One PCG64 is reused and its 128-bit state and
    stream increment are set from a blake2b digest of (seed, request): ~2 µs, where building a
    ``Generator`` from an integer seed (through SeedSequence) costs ~10 µs per request. The returned
    generator is the same object on every call: use it before asking for the next request's.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._bits = np.random.PCG64(0)
        self._gen = np.random.Generator(self._bits)

    def __call__(self, request_id: str) -> np.random.Generator:
        h = hashlib.blake2b(f"{self.seed}\x1f{request_id}".encode(), digest_size=32).digest()
        self._bits.state = {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
                            "state": {"state": int.from_bytes(h[:16], "big"),
                                      "inc": int.from_bytes(h[16:], "big") | 1}}
        return self._gen


def reads_scores(top_n: int, cap: int) -> bool:
    """Whether :func:`sample` reads the scores: only for a top part. Without one the draw is the same
    whatever the scores, so the labeler draws first and scores only the candidates drawn."""
    return min(top_n, cap) > 0


def sample(sim: np.ndarray | int, top_n: int, random_n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the kept candidates: top-N by similarity (best first), then uniform picks of the rest.

    At most ``cap`` in all; the random part is cut first. The first ``min(top_n, cap, len(sim))``
    entries are the top part. Deterministic for a given ``rng`` state. ``sim`` may be just the number
    of candidates when there is no top part (:func:`reads_scores` is False): the draw is then the same.
    """
    n = sim if isinstance(sim, int) else int(sim.shape[0])
    t = min(top_n, cap, n)
    if t == 0:
        top = np.zeros(0, np.int64)
    elif isinstance(sim, int):
        raise ValueError("a top part needs the scores, not only their count")
    elif t == n:
        top = (-sim).argsort(kind="stable")
    else:  # methods, not np.argpartition & co.: their Python wrappers cost ~1 µs a call
        top = (-sim).argpartition(t - 1)[:t]
        top = top[(-sim[top]).argsort(kind="stable")]
    r = min(random_n, cap - t, n - t)
    if r <= 0:
        return top.astype(np.int64, copy=False)
    if t == 0:  # the same draw as from the pool below, which would be every position
        return rng.choice(n, r, replace=False).astype(np.int64, copy=False)
    rest = np.ones(n, bool)
    rest[top] = False
    pool = rest.nonzero()[0]
    picked = pool[rng.choice(pool.size, r, replace=False)]
    return np.concatenate([top, picked]).astype(np.int64, copy=False)
