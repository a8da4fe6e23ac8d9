"""Pure logic of the recall × exposure join: compact state records and the join itself.

Kept apart from the Faust app so it is tested without a broker. State is bytes, not objects: a recall
of 1,000 candidates is stored as one int64 array (+ float32 recall scores), because every table write
also goes to the changelog topic.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import orjson

from schemas.codec import DecodeError, decode
from schemas.events import SCHEMA_VERSION, ExposureEvent, RecallEvent, Sample, SampleBatch, UnexposedBatch
from schemas.ids import sample_id

# kind byte of a pending-table record
RECALL, EXPOSURE, DONE, EXPIRED = b"R", b"E", b"D", b"X"
_HEAD = struct.Struct("<cqqHH")  # kind, event ts ms, deadline ms (wall clock), partition, len(user_id)


@dataclass(frozen=True)
class Pending:
    """One record of the join table, keyed by request id."""

    kind: bytes
    ts: int
    deadline_ms: int
    user_id: str
    partition: int = 0
    item_ids: np.ndarray | None = None  # RECALL: candidates (int64)
    scores: np.ndarray | None = None  # RECALL: recall scores (float32)
    exposure: bytes | None = None  # EXPOSURE: the raw exposure event, joined when its recall arrives

    def pack(self) -> bytes:
        user = self.user_id.encode()
        head = _HEAD.pack(self.kind, self.ts, self.deadline_ms, self.partition, len(user)) + user
        if self.kind == RECALL:
            assert self.item_ids is not None and self.scores is not None
            n = struct.pack("<I", len(self.item_ids))
            return head + n + self.item_ids.astype("<i8").tobytes() + self.scores.astype("<f4").tobytes()
        if self.kind == EXPOSURE:
            return head + (self.exposure or b"")
        return head

    @staticmethod
    def unpack(raw: bytes) -> Pending:
        kind, ts, deadline, part, ulen = _HEAD.unpack_from(raw)
        off = _HEAD.size
        user = raw[off : off + ulen].decode()
        off += ulen
        if kind == RECALL:
            (n,) = struct.unpack_from("<I", raw, off)
            off += 4
            ids = np.frombuffer(raw, dtype="<i8", count=n, offset=off)
            scores = np.frombuffer(raw, dtype="<f4", count=n, offset=off + 8 * n)
            return Pending(kind, ts, deadline, user, part, item_ids=ids, scores=scores)
        if kind == EXPOSURE:
            return Pending(kind, ts, deadline, user, part, exposure=bytes(raw[off:]))
        return Pending(kind, ts, deadline, user, part)


@dataclass(frozen=True)
class Recall:
    """A decoded recall event in array form (the fast path: no per-candidate objects)."""

    request_id: str
    user_id: str
    ts: int
    item_ids: np.ndarray  # int64
    scores: np.ndarray  # float32


def decode_recall(raw: bytes | None, max_candidates: int) -> Recall:
    """Parse a RecallEvent without building 1,000 pydantic objects; any doubt falls back to the
    pydantic contract so the error message (and DLQ reason) is the contract's own."""
    try:
        obj = orjson.loads(raw)  # type: ignore[arg-type]  # None: the contract below says 'empty'
        cands = obj["candidates"]
        ids = np.array([c["item_id"] for c in cands], dtype=np.int64)
        scores = np.array([c.get("score", 0.0) for c in cands], dtype=np.float32)
        rid, uid, ts, ver = obj["request_id"], obj["user_id"], obj["ts"], obj.get("schema_version", 1)
        ok = (isinstance(rid, str) and isinstance(uid, str) and type(ts) is int and ts >= 0 and rid and uid
              and ver == SCHEMA_VERSION and all(type(c["item_id"]) is int for c in cands)
              and (len(ids) == 0 or ids.min() >= 0))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError, AttributeError):
        ok = False
    if not ok:
        ev = decode(raw, RecallEvent)  # raises DecodeError with the contract's reason
        ids = np.array([c.item_id for c in ev.candidates], dtype=np.int64)
        scores = np.array([c.score for c in ev.candidates], dtype=np.float32)
        rid, uid, ts = ev.request_id, ev.user_id, ev.ts
    if len(ids) == 0:
        raise DecodeError("empty_candidates", f"recall {rid} has no candidates")
    if len(ids) > max_candidates:
        raise DecodeError("oversized", f"recall {rid} has {len(ids)} candidates > max {max_candidates}")
    return Recall(rid, uid, ts, ids, scores)


def pending_recall(ev: Recall, deadline_ms: int, partition: int) -> Pending:
    return Pending(RECALL, ev.ts, deadline_ms, ev.user_id, partition, item_ids=ev.item_ids, scores=ev.scores)


def pending_exposure(ev: ExposureEvent, raw: bytes, deadline_ms: int, partition: int) -> Pending:
    return Pending(EXPOSURE, ev.ts, deadline_ms, ev.user_id, partition, exposure=raw)


def marker(kind: bytes, user_id: str, ts: int, forget_at_ms: int, partition: int) -> Pending:
    """Remembered after a request is joined (DONE) or expired (EXPIRED), to catch duplicates and late
    events; purged at ``forget_at_ms``."""
    return Pending(kind, ts, forget_at_ms, user_id, partition)


def real_samples(exposure: ExposureEvent) -> SampleBatch:
    """Every exposed item gets exactly one real label: 1 if clicked, else an exposed negative."""
    samples = [
        Sample(
            sample_id=sample_id(exposure.request_id, it.item_id),
            item_id=it.item_id,
            label=1.0 if it.clicked else 0.0,
            weight=1.0,
            source="click" if it.clicked else "exposed-negative",
            position=it.position,
        )
        for it in exposure.items
    ]
    return SampleBatch(request_id=exposure.request_id, user_id=exposure.user_id, ts=exposure.ts,
                       samples=samples, candidates_total=len(samples))


def unexposed(recall_ids: np.ndarray, recall_scores: np.ndarray, exposure: ExposureEvent,
              request_id: str, user_id: str, ts: int) -> UnexposedBatch | None:
    """recall − exposure, in recall order; None when everything recalled was shown."""
    shown = np.fromiter((it.item_id for it in exposure.items), dtype=np.int64, count=len(exposure.items))
    keep = ~np.isin(recall_ids, shown)
    if not keep.any():
        return None
    return UnexposedBatch(request_id=request_id, user_id=user_id, ts=ts,
                          item_ids=recall_ids[keep].tolist(),
                          recall_scores=np.round(recall_scores[keep].astype(np.float64), 6).tolist())


def encode_unexposed(b: UnexposedBatch) -> bytes:
    """Fast path for the biggest message: orjson straight from the lists, no pydantic dump."""
    return orjson.dumps({"schema_version": b.schema_version, "request_id": b.request_id, "user_id": b.user_id,
                         "ts": b.ts, "item_ids": b.item_ids, "recall_scores": b.recall_scores})
