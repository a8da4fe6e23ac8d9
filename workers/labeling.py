"""Pure logic of the labeler: match unexposed candidates to a user's anchors, pseudo-label, weight, sample.

No Kafka here (``workers/labeler.py`` owns the loop); everything is arrays, so the hot path is a handful
of vectorised numpy calls per request instead of per-candidate Python.

Frozen space
    Item vectors ``v_i`` come from the item collection ``items__<encoder>`` (kept in a dense in-process
    :class:`ItemMatrix`: a hash index of int64 ids over one float32 matrix; a retrieve from the vector
    engine costs ~12 ms per 1,000 vectors, a lookup + gather from the matrix ~0.1 ms). Anchors ``a_k``
    come from the ``anchors`` topic (:class:`AnchorCache`). Both are L2-normalised, so cosine is a dot
    product. Anchors embedded under another encoder than the items live in another space and are
    refused, never scored.

Matching
    ``s(u,i) = max_k cos(a_k, v_i)``; ``matched = argmax_k`` (which interest explained the candidate).

Pseudo-label (the map the paper leaves open; ours)
    ``p = sigmoid((s - center) / temperature)`` with ``labeler.label_center`` and
    ``labeler.label_temperature``. A logistic map because the quantity it stands for is a click
    probability, and a 1-D logistic regression of real labels on ``s`` has exactly this form:
    :func:`fit_label_map` fits ``center`` and ``temperature`` on exposed samples (real clicks and
    exposed negatives scored against the same user's anchors, see :func:`score_exposed`), so the
    defaults can be replaced by calibrated values. The map is monotone in ``s``.

Confidence (the weight ``w`` of a pseudo-label in the loss ``λ · w · BCE(f, p)``)
    ``w = coherence · consistency · generation · margin``; every term lies in [0, 1] and each is
    switched off (replaced by 1) by its ``labeler.use_<term>`` flag, for ablations:

    * ``coherence = (1 + mean_{j<k} cos(a_j, a_k)) / 2`` — anchors that agree with each other are a
      sharper picture of the user; 1 for a single anchor. Per anchor set.
    * ``consistency = (1 + cos(mean_k a_k, mean_h v_h)) / 2`` — the anchors' centroid against the
      centroid of the user's history items (the ones the anchors were generated from), both
      re-normalised; anchors that wandered away from what the user did weigh less. 1 (neutral, as if
      switched off) when no history item has a vector. Per anchor set.
    * ``generation = exp(logprob of the matched anchor)`` — the generator's mean token probability of
      the very anchor that produced this label (not the set's mean: a label rests on one anchor).
      Clipped to [0, 1]; sets without log-probs (logprob 0) give 1.
    * ``margin = |2p - 1|`` — how decisive the pseudo-label is. Chosen over the top-1/top-2 anchor gap:
      a candidate near two interests equally is not an uncertain label, while a candidate whose ``s``
      sits at ``center`` (p ≈ 0.5) is one the map cannot tell apart, and its soft target would only
      pull the pre-ranker towards 0.5.

    Every sample carries the four values actually used (1.0 for a disabled term) in ``confidence``;
    ``weight`` is their product.

Sampling (per request)
    The ``top_n`` most similar candidates plus ``random_n`` drawn uniformly without replacement from the
    rest, at most ``cap`` in all (the random part is cut first). The top part holds the likely
    positives (and the hardest negatives); the random part keeps the long tail, mostly confident
    negatives, in the training distribution.
    The generator's state comes from ``(labeler.seed, request_id)`` (:class:`RequestRng`), so a replay
    labels the same items.

Counting
    ``candidates_total = len(samples) + sampled_out + no_vector``: ``sampled_out`` (in the SampleBatch)
    are the candidates the policy did not keep, including repeats of an item already labeled for the
    request (``duplicate`` in the stats); ``no_vector`` the candidates whose item has no vector yet.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import orjson

from gpl.settings import LabelerSettings
from gpl.vectors import VectorIndex
from schemas.codec import DecodeError, decode
from schemas.events import SCHEMA_VERSION, AnchorSet, SampleBatch, UnexposedBatch
from schemas.ids import sample_id

log = logging.getLogger(__name__)

TERMS = ("coherence", "consistency", "generation", "margin")
_MAX_ID_LEN = 256


# --------------------------------------------------------------------------------------- item vectors

class ItemMatrix:
    """Dense cache of the item collection: int64 ids → rows of one float32 matrix (normalised).

    Why: a vector-engine retrieve turns every record into a Python list (~12 ms per 1,000 vectors);
    a vectorised id → row lookup plus one ``take`` on this matrix is ~0.1 ms. Rows are appended
    (capacity doubling), so adding items never re-sorts or copies the matrix per call.

    The id → row index is an open-addressing hash table (linear probing, Fibonacci hashing, load
    ≤ 1/4) probed for all candidates at once, a few vectorised rounds per batch. It replaced a
    ``searchsorted`` over the sorted ids: on a 20k-item catalogue and fresh random candidates, the
    binary search's unpredictable branches cost ~90 µs per 1,000 ids, the hash ~30 µs (measured with
    ``gpl.bench``; with the same ids repeated the branch predictor hides this, so micro-benchmarks that
    reuse one query array mislead).

    ``load`` scrolls the collection once at start; ``fetch`` retrieves misses from the index later
    (items indexed after the labeler started). An id that the index did not have is not asked for
    again within ``retry_s`` seconds, so a stream of unknown items does not turn every request into a
    12 ms round trip.
    """

    _EMPTY = -1  # item ids are >= 0
    _MULT = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: spreads sequential ids too

    def __init__(self, index: VectorIndex | None = None, collection: str = "", encoder: str = "", *,
                 retry_s: float = 30.0) -> None:
        self.index = index
        self.collection = collection
        self.encoder = encoder
        self.retry_s = retry_s
        self._row_ids = np.zeros(0, np.int64)  # id of each matrix row (capacity)
        self._mat = np.zeros((0, 0), np.float32)  # capacity rows; the first _n are used
        self._n = 0
        self._dim: int | None = None
        self._bits = 0
        self._keys = np.zeros(0, np.int64)  # hash slots: item id or _EMPTY
        self._slot_rows = np.zeros(0, np.int32)  # hash slots: matrix row
        self._rehash(1024)
        self._absent: dict[int, float] = {}  # id -> monotonic time the index last did not have it

    def __len__(self) -> int:
        return self._n

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def matrix(self) -> np.ndarray:
        """The used rows (a view); row numbers are those :meth:`lookup` returns."""
        return self._mat[: self._n]

    @property
    def ids(self) -> np.ndarray:
        """The item id of each matrix row (a view)."""
        return self._row_ids[: self._n]

    def load(self, batch: int = 4096) -> int:
        """Scroll the whole collection into the matrix; a missing collection leaves it empty."""
        if self.index is None:
            return 0
        n = 0
        try:
            for pts in self.index.scroll(self.collection, batch):
                n += self.add(pts.ids, pts.vectors)
        except KeyError:
            log.warning("item collection %s does not exist yet; vectors will be fetched on demand",
                        self.collection)
        return n

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Insert or replace vectors (normalised here); rows with non-finite values are skipped.

        Returns how many ids were new.
        """
        ids = np.asarray(ids, dtype=np.int64).ravel()
        vecs = np.asarray(vectors, dtype=np.float32)
        if ids.size == 0:
            return 0
        if vecs.ndim != 2 or vecs.shape[0] != ids.size:
            raise ValueError(f"vectors of shape {vecs.shape} for {ids.size} ids")
        if (ids < 0).any():
            raise ValueError("item ids must be >= 0")
        if self._dim is None:
            self._dim = int(vecs.shape[1])
            self._mat = np.zeros((0, self._dim), np.float32)
        elif vecs.shape[1] != self._dim:
            raise ValueError(f"item vectors have dim {self._dim}, got {vecs.shape[1]}")
        ok = np.isfinite(vecs).all(axis=1)
        if not ok.all():
            log.warning("%d item vectors with non-finite values skipped", int((~ok).sum()))
            ids, vecs = ids[ok], vecs[ok]
        # the last occurrence of an id wins (as in an upsert)
        uniq, first_in_reversed = np.unique(ids[::-1], return_index=True)
        keep = ids.size - 1 - first_in_reversed
        ids, vecs = uniq, _normalise(vecs[keep])
        rows, missing = self.lookup(ids)
        known = ~missing
        if known.any():
            self._mat[rows[known]] = vecs[known]
        new_ids = ids[missing]
        m = int(new_ids.size)
        if m:
            self._reserve(self._n + m)
            self._mat[self._n : self._n + m] = vecs[missing]
            self._row_ids[self._n : self._n + m] = new_ids
            new_rows = np.arange(self._n, self._n + m, dtype=np.int64)
            self._n += m
            if 4 * self._n > self._keys.size:
                self._rehash(4 * self._n)  # re-inserts every row, the new ones included
            else:
                self._insert(new_ids, new_rows)
            if self._absent:
                for i in new_ids.tolist():
                    self._absent.pop(i, None)
        return m

    def _reserve(self, n: int) -> None:
        if n <= self._mat.shape[0]:
            return
        cap = max(n, 2 * self._mat.shape[0], 1024)
        grown = np.zeros((cap, self._dim or 0), np.float32)
        grown[: self._n] = self._mat[: self._n]
        self._mat = grown
        row_ids = np.zeros(cap, np.int64)
        row_ids[: self._n] = self._row_ids[: self._n]
        self._row_ids = row_ids

    def _slot(self, ids: np.ndarray) -> np.ndarray:
        """Home slot of each id: the top ``bits`` bits of id × 2^64/φ (wrapping uint64 arithmetic)."""
        return ((ids.view(np.uint64) * self._MULT) >> np.uint64(64 - self._bits)).astype(np.int64)

    def _rehash(self, min_slots: int) -> None:
        self._bits = max(10, int(min_slots - 1).bit_length())
        self._keys = np.full(1 << self._bits, self._EMPTY, np.int64)
        self._slot_rows = np.zeros(1 << self._bits, np.int32)
        if self._n:
            self._insert(self._row_ids[: self._n].copy(), np.arange(self._n, dtype=np.int64))

    def _insert(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Place ids that are not in the table yet, all at once: per round, each id tries its current
        slot; of several wanting one free slot the first wins; the rest move one slot on."""
        mask = self._keys.size - 1
        pos = self._slot(ids)
        todo = np.arange(ids.size)
        while todo.size:
            p = pos[todo]
            free = self._keys[p] == self._EMPTY
            slots, first = np.unique(p[free], return_index=True)
            winners = todo[free][first]
            self._keys[slots] = ids[winners]
            self._slot_rows[slots] = rows[winners]
            placed = np.zeros(ids.size, bool)
            placed[winners] = True
            todo = todo[~placed[todo]]
            pos[todo] = (pos[todo] + 1) & mask

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, missing): vectorised id → row. Rows of missing ids are meaningless; mask them out."""
        ids = np.asarray(ids, dtype=np.int64)  # no copy when it already is (the hash reads the bits)
        keys, slot_rows = self._keys, self._slot_rows
        pos = self._slot(ids)
        k = keys[pos]
        rows = slot_rows[pos]
        hit = k == ids
        missing = ~hit
        if hit.all():
            return rows, missing
        mask = keys.size - 1
        todo = np.flatnonzero(missing & (k != self._EMPTY))  # slot taken by another id: probe on
        while todo.size:
            p = (pos[todo] + 1) & mask
            pos[todo] = p
            kt = keys[p]
            found = kt == ids[todo]
            rows[todo[found]] = slot_rows[p[found]]
            missing[todo[found]] = False
            todo = todo[~found & (kt != self._EMPTY)]
        return rows, missing

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` (one copy; ``take`` is faster than fancy indexing)."""
        return np.take(self._mat, rows, axis=0)

    def fetch(self, ids: np.ndarray) -> int:
        """Retrieve ids from the index, except those it lacked in the last ``retry_s``; returns how many."""
        if self.index is None or ids.size == 0:
            return 0
        now = time.monotonic()
        absent = self._absent
        wanted = [i for i in dict.fromkeys(ids.tolist()) if now - absent.get(i, -math.inf) >= self.retry_s]
        if not wanted:
            return 0
        try:
            pts = self.index.retrieve(self.collection, wanted)
        except KeyError:
            pts = None
        found = set(pts.ids.tolist()) if pts is not None and len(pts) else set()
        for i in wanted:
            if i not in found:
                self._absent[i] = now
        if len(self._absent) > 1_000_000:  # bound the negative cache; worst case we ask again
            self._absent.clear()
        if pts is not None and len(pts):
            self.add(pts.ids, pts.vectors)
        return len(found)

    def vectors_of(self, ids: np.ndarray, *, fetch: bool = True) -> np.ndarray:
        """The vectors of the ids that have one (fetching misses first when ``fetch``)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        rows, missing = self.lookup(ids)
        if fetch and missing.any():
            self.fetch(ids[missing])
            rows, missing = self.lookup(ids)
        return self.gather(rows[~missing])


def _normalise(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.where(norms == 0, 1.0, norms)).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------- anchors

@dataclass
class AnchorEntry:
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


class AnchorCache:
    """Per user the newest AnchorSet, refusing sets from another space.

    Only a newer ``version`` replaces an older one (a replayed or re-ordered message cannot roll a user
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
        self._users: dict[str, AnchorEntry] = {}
        self.counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def get(self, user_id: str) -> AnchorEntry | None:
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
        if cur is not None and aset.version <= cur.version:
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
        vecs = _normalise(vecs)
        self._users[aset.user_id] = AnchorEntry(
            user_id=aset.user_id, version=aset.version, vectors=np.ascontiguousarray(vecs),
            logprobs=np.asarray([a.logprob for a in aset.anchors], np.float32), model=aset.model,
            prompt_hash=aset.prompt_hash, encoder=aset.encoder, generated_at=aset.generated_at,
            fallback=aset.fallback, history=np.asarray(aset.history, np.int64), coherence=coherence_of(vecs),
        )
        return self.ACCEPTED

    def consistency(self, entry: AnchorEntry) -> float:
        """The entry's consistency term, cached once every history item has a vector."""
        if entry.consistency is not None:
            return entry.consistency
        if self.items is None or entry.history.size == 0:
            entry.consistency = 1.0
            return 1.0
        items, ids = self.items, entry.history
        rows, missing = items.lookup(ids)
        if missing.any():
            items.fetch(ids[missing])
            rows, missing = items.lookup(ids)
        value = consistency_of(entry.vectors, items.gather(rows[~missing]))
        if not missing.any():
            entry.consistency = value
        return value


# -------------------------------------------------------------------------------- scoring and labels

def _row_max(s: np.ndarray) -> np.ndarray:
    """Max of each row of an (m, K) array with K small: K-1 vectorised column maximums.

    numpy's ``max(axis=1)`` pays a per-row setup on a short contiguous axis (~45 µs for 1,000 x 8);
    this is ~10 µs. It is also why the hot path multiplies (m, dim) x (dim, K): BLAS does that shape
    ~15% faster than (K, dim) x (dim, m), which would allow a contiguous reduction instead.
    """
    out = s[:, 0].copy()
    for k in range(1, s.shape[1]):
        np.maximum(out, s[:, k], out=out)
    return out


def score(anchors: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sim, matched): max cosine of each vector over the anchors and the index of that anchor.

    Both inputs normalised: (K, dim) and (N, dim). The same arithmetic as the hot path of
    :func:`label_decoded` (one (N, K) matmul, see :func:`_row_max`), so its values match the labels'.
    """
    s = vectors @ anchors.T
    return _row_max(s), s.argmax(axis=1)


@dataclass(frozen=True)
class LabelMap:
    """``p = sigmoid((s - center) / temperature)``: similarity to a click probability (monotone)."""

    center: float
    temperature: float

    @classmethod
    def from_settings(cls, cfg: LabelerSettings) -> LabelMap:
        return cls(cfg.label_center, cfg.label_temperature)

    def __call__(self, sim: np.ndarray) -> np.ndarray:
        z = (np.asarray(sim, np.float64) - self.center) / self.temperature
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # = sigmoid(z), without overflow for large |z|

    def describe(self) -> str:
        return f"sigmoid((s-{self.center:.6g})/{self.temperature:.6g})"


def label_map(sim: np.ndarray, cfg: LabelerSettings) -> np.ndarray:
    """The pseudo-label of each similarity under the configured map."""
    return LabelMap.from_settings(cfg)(sim)


def fit_label_map(sims: np.ndarray, labels: np.ndarray, *, l2: float = 1e-6, iters: int = 50) -> LabelMap:
    """Calibrate the map: 1-D logistic regression ``y ~ sigmoid(a + b·s)`` by Newton steps.

    ``center = -a/b`` and ``temperature = 1/b``. ``labels`` are real labels (0/1, or soft) of exposed
    items, ``sims`` their similarity to the same user's anchors (:func:`score_exposed`). A small ridge
    ``l2`` keeps the Hessian invertible when the data are separable. Raises ValueError when ``s`` does
    not rank clicks above non-clicks (b <= 0): no monotone map would be calibrated.
    """
    s = np.asarray(sims, np.float64).ravel()
    y = np.asarray(labels, np.float64).ravel()
    if s.size != y.size or s.size < 2:
        raise ValueError(f"need matching sims and labels (got {s.size} and {y.size})")
    x = np.stack([np.ones_like(s), s], axis=1)
    mean = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    w = np.array([math.log(mean / (1 - mean)), 0.0])
    reg = l2 * s.size
    for _ in range(iters):
        p = 0.5 * (1.0 + np.tanh(0.5 * (x @ w)))
        grad = x.T @ (p - y) + reg * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    a, b = float(w[0]), float(w[1])
    if not b > 0:
        raise ValueError(f"similarity does not separate the labels (slope {b:.4g}); keep the configured map")
    return LabelMap(center=-a / b, temperature=1.0 / b)


def score_exposed(batch: SampleBatch, cache: AnchorCache, items: ItemMatrix) -> tuple[np.ndarray, np.ndarray]:
    """(sims, labels) of a real-label SampleBatch against the user's anchors, for :func:`fit_label_map`."""
    entry = cache.get(batch.user_id)
    real = [s for s in batch.samples if s.source != "pseudo"]
    if entry is None or not real:
        return np.zeros(0), np.zeros(0)
    ids = np.asarray([s.item_id for s in real], np.int64)
    labels = np.asarray([s.label for s in real], np.float64)
    rows, missing = items.lookup(ids)
    sim, _ = score(entry.vectors, items.gather(rows[~missing]))
    return sim.astype(np.float64), labels[~missing]


# ------------------------------------------------------------------------------------- confidence

def coherence_of(anchors: np.ndarray) -> float:
    """``(1 + mean pairwise cos) / 2`` of normalised anchors; 1 for a single anchor."""
    k = anchors.shape[0]
    if k < 2:
        return 1.0
    g = anchors @ anchors.T
    mean_off = (float(g.sum()) - float(np.trace(g))) / (k * (k - 1))
    return float(np.clip((1.0 + mean_off) / 2.0, 0.0, 1.0))


def consistency_of(anchors: np.ndarray, history: np.ndarray) -> float:
    """``(1 + cos(anchor centroid, history centroid)) / 2``; 1 without history vectors."""
    if history.shape[0] == 0:
        return 1.0
    ca, ch = anchors.mean(axis=0), history.mean(axis=0)
    na, nh = float(np.linalg.norm(ca)), float(np.linalg.norm(ch))
    if na == 0 or nh == 0:
        return 0.5  # a centroid at the origin points nowhere: neither agreeing nor disagreeing
    return float(np.clip((1.0 + float(ca @ ch) / (na * nh)) / 2.0, 0.0, 1.0))


def confidence(*, coherence: float, consistency: float, logprobs: np.ndarray, matched: np.ndarray,
               p: np.ndarray, cfg: LabelerSettings) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(weights, terms): the per-sample product of the enabled terms and each term's values.

    See the module docstring for the formula. A disabled term is 1 for every sample (so lineage shows
    what the weight was made of).
    """
    t = np.ones((len(TERMS), int(p.shape[0])))  # rows in TERMS order; a disabled term stays 1
    if cfg.use_coherence:
        t[0] = coherence
    if cfg.use_consistency:
        t[1] = consistency
    if cfg.use_generation:
        np.minimum(np.exp(logprobs[matched].astype(np.float64)), 1.0, out=t[2])
    if cfg.use_margin:
        np.abs(2.0 * p - 1.0, out=t[3])
    return t.prod(axis=0), dict(zip(TERMS, t, strict=True))


def describe_weight(cfg: LabelerSettings) -> str:
    enabled = [t for t in TERMS if getattr(cfg, f"use_{t}")]
    return "*".join(enabled) if enabled else "1"


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


def sample(sim: np.ndarray, top_n: int, random_n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the kept candidates: top-N by similarity (best first), then uniform picks of the rest.

    At most ``cap`` in all; the random part is cut first. The first ``min(top_n, cap, len(sim))``
    entries are the top part. Deterministic for a given ``rng`` state.
    """
    n = int(sim.shape[0])
    t = min(top_n, cap, n)
    if t == n:
        top = np.argsort(-sim, kind="stable")
    elif t > 0:
        top = np.argpartition(-sim, t - 1)[:t]
        top = top[np.argsort(-sim[top], kind="stable")]
    else:
        top = np.zeros(0, np.int64)
    r = min(random_n, cap - t, n - t)
    if r <= 0:
        return top.astype(np.int64, copy=False)
    rest = np.ones(n, bool)
    rest[top] = False
    pool = np.flatnonzero(rest)
    picked = pool[rng.choice(pool.size, r, replace=False)]
    return np.concatenate([top, picked]).astype(np.int64, copy=False)


# ------------------------------------------------------------------------------------ the fast path

class NoAnchors(LookupError):
    """The batch's user has no anchors in the cache (the worker defers such batches)."""


@dataclass(frozen=True, slots=True)
class Unexposed:
    """A decoded UnexposedBatch in array form (no per-candidate objects)."""

    request_id: str
    user_id: str
    ts: int
    item_ids: np.ndarray  # int64


def decode_unexposed(raw: bytes | None) -> Unexposed:
    """Parse an UnexposedBatch straight into arrays; anything unusual goes through the pydantic contract.

    The fast path accepts only what the contract accepts (ints ≥ 0 that fit int64, a known schema
    version, non-empty ids of bounded length); doubt falls back to :func:`schemas.codec.decode`, whose
    DecodeError carries the reason the DLQ records. ``sum`` over the id list is the cheap type check:
    it is an ``int`` only when every element is (bools count as ints, as in pydantic's lax mode).
    """
    ok = False
    if raw is not None:
        try:
            obj = orjson.loads(raw)
            rid, uid, ts, ids_l = obj["request_id"], obj["user_id"], obj["ts"], obj["item_ids"]
            ver = obj.get("schema_version", 1)
            rs = obj.get("recall_scores", ())
            ok = (type(rid) is str and type(uid) is str and 0 < len(rid) <= _MAX_ID_LEN
                  and 0 < len(uid) <= _MAX_ID_LEN and type(ts) is int and ts >= 0 and type(ver) is int
                  and 1 <= ver <= SCHEMA_VERSION and type(ids_l) is list and len(ids_l) > 0
                  and type(sum(ids_l)) is int and (rs == () or (type(rs) is list and _numbers(rs))))
            if ok:
                ids = np.array(ids_l, dtype=np.int64)
                ok = int(ids.min()) >= 0
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError, AttributeError):
            ok = False
    if not ok:
        ev = decode(raw, UnexposedBatch)  # raises DecodeError with the contract's reason
        rid, uid, ts = ev.request_id, ev.user_id, ev.ts
        ids = np.asarray(ev.item_ids, dtype=np.int64)
    return Unexposed(rid, uid, ts, ids)


def _numbers(xs: list[object]) -> bool:
    return type(sum(xs)) in (int, float)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class LabelStats:
    """Where a batch's candidates went, and the anchor set that labeled them."""

    request_id: str
    user_id: str
    ts: int
    candidates: int
    labeled: int
    sampled_out: int  # not kept by the policy
    duplicate: int  # repeats of an item already kept for this request
    no_vector: int
    anchor_version: int
    anchor_age_ms: int


@dataclass
class Labeling:
    """Everything :func:`label_decoded` needs besides the batch: caches and settings, built once."""

    cache: AnchorCache
    items: ItemMatrix
    cfg: LabelerSettings
    collection: str = ""
    label: LabelMap = field(init=False)
    map_text: str = field(init=False)
    rng: RequestRng = field(init=False)

    def __post_init__(self) -> None:
        self.label = LabelMap.from_settings(self.cfg)
        self.rng = RequestRng(self.cfg.seed)
        self.map_text = f"p={self.label.describe()}; w={describe_weight(self.cfg)}"
        if not self.collection:
            self.collection = self.items.collection


def label_decoded(b: Unexposed, ctx: Labeling) -> tuple[bytes, LabelStats]:
    """Label one decoded batch: lookup → gather → matmul → sample → SampleBatch bytes (orjson).

    Raises :class:`NoAnchors` when the user has no anchors. No pydantic object is built per sample;
    the output validates as :class:`schemas.events.SampleBatch` (tested).
    """
    entry = ctx.cache.get(b.user_id)
    if entry is None:
        raise NoAnchors(b.user_id)
    cfg, items, ids = ctx.cfg, ctx.items, b.item_ids
    n = int(ids.shape[0])
    rows, missing = items.lookup(ids)
    if n and missing.any() and items.index is not None:
        items.fetch(ids[missing])
        rows, missing = items.lookup(ids)
    if n and missing.any():
        found = np.flatnonzero(~missing)
        rows, found_ids = rows[found], ids[found]
    else:
        found_ids = ids
    m = int(found_ids.shape[0])
    samples: list[dict[str, object]] = []
    duplicate = 0
    kept = 0
    if m:
        s_all = items.gather(rows) @ entry.vectors.T  # (m, K)
        sim = _row_max(s_all)
        sel = sample(sim, cfg.top_n, cfg.random_n, cfg.cap, ctx.rng(b.request_id))
        kept = int(sel.shape[0])
        sel_items = found_ids[sel].tolist()
        if len(set(sel_items)) != kept:  # an item recalled twice: label it once
            first = dict.fromkeys(sel_items)
            keep_pos = [i for i, it in enumerate(sel_items) if first.pop(it, 0) is None]
            sel = sel[keep_pos]
            sel_items = found_ids[sel].tolist()
            duplicate = kept - len(sel_items)
        matched = s_all[sel].argmax(axis=1)
        s = sim[sel].astype(np.float64)
        p = ctx.label(s)
        consistency = ctx.cache.consistency(entry) if cfg.use_consistency else 1.0
        w, terms = confidence(coherence=entry.coherence, consistency=consistency, logprobs=entry.logprobs,
                              matched=matched, p=p, cfg=cfg)
        rid, ver = b.request_id, entry.version
        # one rounding pass for every float column (6 decimals: well below any effect, shorter JSON)
        floats = np.round(np.vstack([p, w, s, *(terms[t] for t in TERMS)]), 6).tolist()
        cols = zip(sel_items, *floats[:3], matched.tolist(), *floats[3:], strict=True)
        samples = [
            {"sample_id": sample_id(rid, item, ver), "item_id": item, "label": lab, "weight": wt,
             "source": "pseudo", "similarity": sm, "matched_anchor": k,
             "confidence": {"coherence": c1, "consistency": c2, "generation": c3, "margin": c4}}
            for item, lab, wt, sm, k, c1, c2, c3, c4 in cols
        ]
    labeled = len(samples)
    age = b.ts - entry.generated_at
    out = {
        "schema_version": SCHEMA_VERSION, "request_id": b.request_id, "user_id": b.user_id, "ts": b.ts,
        "samples": samples,
        "lineage": {"anchor_version": entry.version, "anchor_model": entry.model,
                    "prompt_hash": entry.prompt_hash, "encoder": entry.encoder, "collection": ctx.collection,
                    "anchor_age_ms": age, "label_map": ctx.map_text, "fallback": entry.fallback},
        "candidates_total": n,
        "sampled_out": m - labeled,
    }
    stats = LabelStats(b.request_id, b.user_id, b.ts, n, labeled, m - kept, duplicate, n - m, entry.version,
                       age)
    return orjson.dumps(out), stats


def label_batch(batch_raw: bytes, cache: AnchorCache, items: ItemMatrix, settings: LabelerSettings,
                *, collection: str = "") -> tuple[bytes, LabelStats]:
    """Decode, score and sample one UnexposedBatch: (SampleBatch bytes, stats).

    Raises DecodeError (bad input: DLQ) or :class:`NoAnchors` (defer). Building the :class:`Labeling`
    context per call is cheap, but a hot loop should build it once and call :func:`label_decoded`.
    """
    return label_decoded(decode_unexposed(batch_raw), Labeling(cache, items, settings, collection))


__all__ = [
    "TERMS", "ItemMatrix", "AnchorEntry", "AnchorCache", "score", "LabelMap", "label_map", "fit_label_map",
    "score_exposed", "coherence_of", "consistency_of", "confidence", "RequestRng", "sample", "NoAnchors",
    "Unexposed", "decode_unexposed", "LabelStats", "Labeling", "label_decoded", "label_batch", "DecodeError",
]
