"""Per-user interest state and drift detection (pure logic, tested without a broker).

State: the recent positives (clicked items, most recent last), the sum of their frozen-space vectors
(so the profile updates in O(dim) per click instead of re-reading all positives), and the profile at
the last anchor request. All decisions use *event time*, so replaying a topic makes the same requests.

Triggers, in priority order (0 served first):
  0 ``cold_start``     the user never had anchors and has ``cold_start_min_positives`` positives;
  1 ``drift``          1 − cos(profile, profile at last request) > ``drift_threshold``;
  2 ``new_positives``  ``new_positives_trigger`` positives since the last request;
  3 ``expiry``         the last request is older than ``anchor_max_age_s``.
Debounce: apart from cold start, no request within ``debounce_s`` of the previous one, so one very
active user cannot flood ``anchor-requests``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import numpy as np

from runtime.settings import StreamsSettings
from runtime.vectors.normalize import normalize
from schemas.events import AnchorReason, AnchorRequest

_HEAD = struct.Struct("<qiiHH?")  # last_request_ms, positives_since, requests, n_recent, dim, has_gen
PRIORITY: dict[str, int] = {"cold_start": 0, "drift": 1, "new_positives": 2, "expiry": 3}


@dataclass(frozen=True)
class Interest:
    recent: np.ndarray  # int64 item ids, most recent last
    profile_sum: np.ndarray  # float32 (dim,) sum of the recent positives' vectors
    gen_profile: np.ndarray | None  # float32 (dim,) normalised profile at the last anchor request
    last_request_ms: int = 0
    positives_since: int = 0
    requests: int = 0

    @staticmethod
    def empty(dim: int) -> Interest:
        return Interest(np.zeros(0, np.int64), np.zeros(dim, np.float32), None)

    @property
    def profile(self) -> np.ndarray:
        return normalize(self.profile_sum)

    def drift(self) -> float:
        if self.gen_profile is None or not self.profile_sum.any():
            return 0.0
        return float(1.0 - np.dot(self.profile, self.gen_profile))

    def pack(self) -> bytes:
        dim = self.profile_sum.shape[0]
        has_gen = self.gen_profile is not None
        head = _HEAD.pack(self.last_request_ms, self.positives_since, self.requests, len(self.recent), dim, has_gen)
        body = self.recent.astype("<i8").tobytes() + self.profile_sum.astype("<f4").tobytes()
        if has_gen:
            assert self.gen_profile is not None
            body += self.gen_profile.astype("<f4").tobytes()
        return head + body

    @staticmethod
    def unpack(raw: bytes) -> Interest:
        last, since, reqs, n, dim, has_gen = _HEAD.unpack_from(raw)
        off = _HEAD.size
        recent = np.frombuffer(raw, "<i8", n, off).copy()
        off += 8 * n
        psum = np.frombuffer(raw, "<f4", dim, off).copy()
        off += 4 * dim
        gen = np.frombuffer(raw, "<f4", dim, off).copy() if has_gen else None
        return Interest(recent, psum, gen, last, since, reqs)


def add_positives(state: Interest, item_ids: np.ndarray, vectors: np.ndarray) -> Interest:
    """Append clicked items not already among the recent positives and add their vectors to the sum.

    Call :func:`trim` afterwards when ``recent`` grew past its bound.
    """
    if len(item_ids) == 0:
        return state
    fresh = ~np.isin(item_ids, state.recent)
    ids, vecs = item_ids[fresh], vectors[fresh]
    recent = np.concatenate([state.recent, ids])
    psum = state.profile_sum + vecs.sum(axis=0).astype(np.float32)
    return replace(state, recent=recent, profile_sum=psum, positives_since=state.positives_since + len(ids))


def trim(state: Interest, keep: int, vectors_of: dict[int, np.ndarray]) -> Interest:
    """Keep the ``keep`` most recent positives; the profile sum is recomputed from ``vectors_of``."""
    if len(state.recent) <= keep:
        return state
    recent = state.recent[-keep:]
    psum = np.sum([vectors_of[int(i)] for i in recent if int(i) in vectors_of], axis=0).astype(np.float32)
    return replace(state, recent=recent, profile_sum=psum)


def decide(state: Interest, now_ms: int, cfg: StreamsSettings) -> AnchorReason | None:
    """Which trigger fires now, if any (debounced)."""
    if state.requests == 0:
        return "cold_start" if len(state.recent) >= cfg.cold_start_min_positives else None
    if now_ms - state.last_request_ms < cfg.debounce_s * 1000:
        return None
    if state.drift() > cfg.drift_threshold:
        return "drift"
    if state.positives_since >= cfg.new_positives_trigger:
        return "new_positives"
    if now_ms - state.last_request_ms > cfg.anchor_max_age_s * 1000:
        return "expiry"
    return None


def request_anchors(state: Interest, user_id: str, reason: AnchorReason, now_ms: int,
                    cfg: StreamsSettings) -> tuple[Interest, AnchorRequest]:
    req = AnchorRequest(user_id=user_id, reason=reason, ts=now_ms, history=state.recent.tolist(),
                        priority=PRIORITY[reason], drift=round(state.drift(), 6))
    after = replace(state, gen_profile=state.profile.astype(np.float32), last_request_ms=now_ms,
                    positives_since=0, requests=state.requests + 1)
    return after, req
