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
import pybase64

from schemas.codec import DecodeError, decode
from schemas.events import (
    MAX_EPOCH_MS,
    MAX_ID_CHARS,
    PACKED_IDS,
    RECALL_SCHEMA_VERSION,
    SCHEMA_VERSION,
    SECONDS_HIGH,
    SECONDS_LOW,
    UNEXPOSED_SCHEMA_VERSION,
    ExposureEvent,
    RecallEvent,
)
from schemas.ids import sample_id

# UnexposedBatch's packed id forms (schemas.events.PACKED_IDS): little-endian whatever this machine's byte order
_LE32, _LE64 = (np.dtype(PACKED_IDS[f][1]) for f in ("item_ids_le32", "item_ids_le64"))
_U32_MAX = int(np.iinfo(_LE32).max)

# kind byte of a join-table record: waiting for its partner (RECALL, EXPOSURE), a recall held until the
# indexer knows its candidates (HELD, may already carry its exposure), or a marker kept after the request
# was joined (DONE) or expired (EXPIRED) to tell duplicates and late partners from re-reads
RECALL, EXPOSURE, HELD, DONE, EXPIRED = b"R", b"E", b"H", b"D", b"X"
PENDING_RECALL, PENDING_EXPOSURE = RECALL, EXPOSURE  # the names streams/app.py uses (its RECALL is a topic)
# every final outcome of an input message besides ``dlq:<reason>`` (streams/app.py counts them)
OUTCOMES = ("joined", "expired", "expired_memory_guard", "exposure_only", "exposure_only_memory_guard",
            "late_exposure", "late_recall", "reread")
WAITING = (RECALL, EXPOSURE, HELD)
# kind, event ts ms, wall-clock deadline ms, partition, recall offset, exposure offset, len(user_id), has arrays
_HEAD = struct.Struct("<cqqHqqH?")
NO_OFFSET = -1


@dataclass(frozen=True)
class Pending:
    """One record of the join table, keyed by request id.

    ``deadline_ms`` is wall clock: the memory guard of a waiting request, the end of a hold, or when a marker
    is forgotten at the latest. The join itself expires by event time (streams/clock.py). The offsets of the
    recall and exposure that made the record tell a re-read after a restart (same offset: already done)
    from a duplicate (another offset).
    """

    kind: bytes
    ts: int
    deadline_ms: int
    user_id: str
    partition: int = 0
    recall_offset: int = NO_OFFSET
    exposure_offset: int = NO_OFFSET
    item_ids: np.ndarray | None = None  # RECALL/HELD: candidates (int64)
    scores: np.ndarray | None = None  # RECALL/HELD: recall scores (float32)
    exposure: bytes | None = None  # EXPOSURE/HELD: the raw exposure event, joined when its recall arrives

    @property
    def waiting_inputs(self) -> int:
        """How many input messages this record holds back from an outcome."""
        if self.kind not in WAITING:
            return 0
        return int(self.recall_offset != NO_OFFSET) + int(self.exposure_offset != NO_OFFSET)

    def pack(self) -> bytes:
        user = self.user_id.encode()
        arrays = self.item_ids is not None and self.kind in (RECALL, HELD)
        head = _HEAD.pack(self.kind, self.ts, self.deadline_ms, self.partition, self.recall_offset,
                          self.exposure_offset, len(user), arrays) + user
        if arrays:
            assert self.item_ids is not None and self.scores is not None
            n = struct.pack("<I", len(self.item_ids))
            head += n + self.item_ids.astype("<i8").tobytes() + self.scores.astype("<f4").tobytes()
        if self.kind in (EXPOSURE, HELD):
            head += self.exposure or b""
        return head

    @staticmethod
    def unpack(raw: bytes) -> Pending:
        kind, ts, deadline, part, r_off, e_off, ulen, arrays = _HEAD.unpack_from(raw)
        off = _HEAD.size
        user = raw[off : off + ulen].decode()
        off += ulen
        ids = scores = None
        if arrays:
            (n,) = struct.unpack_from("<I", raw, off)
            off += 4
            ids = np.frombuffer(raw, dtype="<i8", count=n, offset=off)
            scores = np.frombuffer(raw, dtype="<f4", count=n, offset=off + 8 * n)
            off += 12 * n
        exposure = bytes(raw[off:]) if kind in (EXPOSURE, HELD) and off < len(raw) else None
        return Pending(kind, ts, deadline, user, part, r_off, e_off, item_ids=ids, scores=scores, exposure=exposure)


def event_due(rec: Pending, join_wait_ms: int, dedup_ms: int) -> int | None:
    """Event time at which the record is due: a waiting request expires, a marker is forgotten. A held recall
    has no event-time due: it waits for the indexer, bounded by its wall-clock hold."""
    if rec.kind in (RECALL, EXPOSURE):
        return rec.ts + join_wait_ms
    if rec.kind in (DONE, EXPIRED):
        return rec.ts + dedup_ms
    return None


@dataclass(frozen=True)
class Recall:
    """A decoded recall event in array form (the fast path: no per-candidate objects)."""

    request_id: str
    user_id: str
    ts: int
    item_ids: np.ndarray  # int64
    scores: np.ndarray  # float32
    unique: bool = False  # every item id once (version 2 guarantees it; version 1 may repeat one)



def decode_recall(raw: bytes | None, max_candidates: int) -> Recall:
    """Parse a RecallEvent straight into arrays; any doubt falls back to the pydantic contract so the
    error message (and DLQ reason) is the contract's own.

    Version 2 (columns) never builds a per-candidate Python object: orjson gives lists, numpy infers
    one dtype per list in C (int64 only when every id is an int that fits, so floats, strings, bools
    alone and out-of-range ids all fall back), and ``"".join`` type-checks the sources. Version 1
    (candidate objects) still decodes, one dict per candidate, as before. ``None`` (a tombstone) goes
    to the contract, which calls it 'empty'.
    """
    try:
        obj = orjson.loads(raw)  # type: ignore[arg-type]
        rid, uid, ts = obj["request_id"], obj["user_id"], obj["ts"]
        ok = (type(rid) is str and type(uid) is str and 0 < len(rid) <= MAX_ID_CHARS
              and 0 < len(uid) <= MAX_ID_CHARS and type(ts) is int and 0 <= ts <= MAX_EPOCH_MS
              and not SECONDS_LOW <= ts < SECONDS_HIGH)  # seconds? the contract says so
        if ok and "candidates" not in obj:
            ids, scores, ok = _columns(obj)
        elif ok:
            ids, scores, ok = _candidates(obj)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError, AttributeError):
        ok = False
    unique = ok and "candidates" not in obj  # the version 2 fast path rejected repeats
    if not ok:
        ev = decode(raw, RecallEvent)  # raises DecodeError with the contract's reason
        unique = False  # a version 1 recall arrives here converted to columns, repeats and all
        ids = np.asarray(ev.item_ids, dtype=np.int64)
        scores = (np.zeros(len(ids), np.float32) if ev.scores is None else np.asarray(ev.scores, dtype=np.float32))
        rid, uid, ts = ev.request_id, ev.user_id, ev.ts
    if len(ids) == 0:
        raise DecodeError("empty_candidates", f"recall {rid} has no candidates")
    if len(ids) > max_candidates:
        raise DecodeError("oversized", f"recall {rid} has {len(ids)} candidates > max {max_candidates}")
    return Recall(rid, uid, ts, ids, scores, unique)


_NO_ARRAYS = (np.zeros(0, np.int64), np.zeros(0, np.float32), False)


def _columns(obj: dict[str, object]) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids, scores, ok) of a version 2 recall; ok is False whenever the contract must judge."""
    ids_l, scores_l, sources = obj["item_ids"], obj.get("scores"), obj.get("sources")
    if obj.get("schema_version", RECALL_SCHEMA_VERSION) != RECALL_SCHEMA_VERSION or type(ids_l) is not list:
        return _NO_ARRAYS
    n = len(ids_l)
    ids = np.array(ids_l)
    if ids.dtype != np.int64 or ids.ndim != 1 or (n and int(ids.min()) < 0):
        return _NO_ARRAYS
    if n > 1:
        srt = np.sort(ids)
        if (srt[1:] == srt[:-1]).any():
            return _NO_ARRAYS  # a repeated item: the contract names the error
    if scores_l is None:
        scores = np.zeros(n, np.float32)
    else:
        if type(scores_l) is not list or len(scores_l) != n:
            return _NO_ARRAYS
        sc = np.array(scores_l)
        if n and (sc.ndim != 1 or sc.dtype.kind not in "if"):
            return _NO_ARRAYS
        scores = sc.astype(np.float32)
    if sources is not None and (type(sources) is not list or len(sources) != n or type("".join(sources)) is not str):
        return _NO_ARRAYS
    return ids, scores, True


def _candidates(obj: dict[str, object]) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids, scores, ok) of a version 1 recall (candidate objects): one dict per candidate, as v1 costs."""
    cands = obj["candidates"]
    if obj.get("schema_version", 1) != 1 or "item_ids" in obj or type(cands) is not list:
        return _NO_ARRAYS
    ids = np.array([c["item_id"] for c in cands], dtype=np.int64)
    scores = np.array([c.get("score", 0.0) for c in cands], dtype=np.float32)
    ok = all(type(c["item_id"]) is int for c in cands) and (len(ids) == 0 or int(ids.min()) >= 0)
    return ids, scores, ok


def pending_recall(ev: Recall, deadline_ms: int, partition: int, offset: int, kind: bytes = RECALL,
                   exposure: Pending | None = None) -> Pending:
    """A recall waiting for its exposure (RECALL) or for its items (HELD, with the exposure if it came)."""
    e_off, e_raw = (exposure.exposure_offset, exposure.exposure) if exposure is not None else (NO_OFFSET, None)
    return Pending(kind, ev.ts, deadline_ms, ev.user_id, partition, offset, e_off, item_ids=ev.item_ids,
                   scores=ev.scores, exposure=e_raw)


def pending_exposure(ev: ExposureEvent, raw: bytes, deadline_ms: int, partition: int, offset: int) -> Pending:
    return Pending(EXPOSURE, ev.ts, deadline_ms, ev.user_id, partition, exposure_offset=offset, exposure=raw)


def marker(kind: bytes, rec: Pending, ts: int, forget_at_ms: int, *, recall_offset: int | None = None,
           exposure_offset: int | None = None) -> Pending:
    """Remembered after a request is joined (DONE) or expired (EXPIRED), to catch duplicates and late
    partners and to recognise re-reads; forgotten by event time, or at ``forget_at_ms`` at the latest."""
    return Pending(kind, ts, forget_at_ms, rec.user_id, rec.partition,
                   rec.recall_offset if recall_offset is None else recall_offset,
                   rec.exposure_offset if exposure_offset is None else exposure_offset)


def encode_real_samples(exposure: ExposureEvent) -> bytes:
    """The real labels of a request as SampleBatch JSON: every exposed item exactly once, 1 if clicked, else
    an exposed negative. Written by orjson from plain dicts (the contract's own encoding, field for field,
    tested), since pydantic objects per exposed item were a tenth of the streams stage's time."""
    rid = exposure.request_id
    samples = [{"sample_id": sample_id(rid, it.item_id), "item_id": it.item_id, "label": 1.0 if it.clicked else 0.0,
                "weight": 1.0, "source": "click" if it.clicked else "exposed-negative", "position": it.position}
               for it in exposure.items]
    return orjson.dumps({"schema_version": SCHEMA_VERSION, "request_id": rid, "user_id": exposure.user_id,
                         "ts": exposure.ts, "samples": samples, "candidates_total": len(samples), "sampled_out": 0})


def unexposed(recall_ids: np.ndarray, recall_scores: np.ndarray, exposure: ExposureEvent
              ) -> tuple[np.ndarray, np.ndarray] | None:
    """recall − exposure as (item ids, recall scores), in recall order; None when everything recalled was shown."""
    shown = np.sort(np.fromiter((it.item_id for it in exposure.items), dtype=np.int64, count=len(exposure.items)))
    if shown.size:  # binary search in the few shown ids: a quarter of np.isin's time, which sorts both sides
        at = np.minimum(np.searchsorted(shown, recall_ids), shown.size - 1)
        keep = shown[at] != recall_ids
    else:
        keep = np.ones(recall_ids.shape[0], bool)
    if not keep.any():
        return None
    return recall_ids[keep], recall_scores[keep]


def encode_unexposed(request_id: str, user_id: str, ts: int, item_ids: np.ndarray,
                     recall_scores: np.ndarray | None, *, version: int = UNEXPOSED_SCHEMA_VERSION) -> bytes:
    """The biggest message as UnexposedBatch JSON, orjson straight from the arrays (no list, no pydantic).

    ``version`` 2 (the default) packs the ids: base64 of little-endian ``item_ids_le32`` when every id
    fits 32 unsigned bits, else ``item_ids_le64``. Version 1 writes them as a JSON list, for labelers
    of an older release during a rolling upgrade. Scores
    (unless None: the contract's default, no scores) are rounded to 6 decimals as float64 (what the
    contract's float round-trips).
    """
    out: dict[str, object] = {"schema_version": version, "request_id": request_id, "user_id": user_id, "ts": ts}
    if version >= 2:  # the narrowest packed form that holds every id
        narrow = item_ids.shape[0] == 0 or int(item_ids.max()) <= _U32_MAX
        ids = np.ascontiguousarray(item_ids, dtype=_LE32 if narrow else _LE64)
        out["item_ids_le32" if narrow else "item_ids_le64"] = pybase64.b64encode(ids.tobytes()).decode("ascii")
    else:
        out["item_ids"] = np.ascontiguousarray(item_ids, dtype=np.int64)
    if recall_scores is not None:
        out["recall_scores"] = np.round(recall_scores.astype(np.float64), 6)
    return orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)
